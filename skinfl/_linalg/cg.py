"""Conjugate gradient on many right-hand sides at once, sharing the matrix products."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._progress import NO_PROGRESS

# Why a system stopped (CgReport.status).
CONVERGED, MAX_ITER, NEGATIVE_CURVATURE, BREAKDOWN, STALLED = 0, 1, 2, 3, 4


@dataclass
class CgReport:
    """What one batched solve did (for diagnostics and warnings).

    Attributes
    ----------
    n_iter : int
        Iterations run (the largest over the systems).
    status : torch.Tensor of int, shape (k,)
        Per system: ``CONVERGED``, ``MAX_ITER`` (ran out of iterations),
        ``NEGATIVE_CURVATURE`` (met a direction ``p`` with ``p^T A p <= 0``:
        ``A`` is not positive definite), ``BREAKDOWN`` (non-finite values) or
        ``STALLED`` (stopped improving before ``max_iter``, at the accuracy
        the dtype allows: more iterations cannot help).
    relative_residuals : torch.Tensor of shape (k,)
        ``||r_i|| / ||b_i||`` at the end (0 for a zero right-hand side).
    """

    n_iter: int
    status: torch.Tensor
    relative_residuals: torch.Tensor

    @property
    def converged(self):
        return self.status == CONVERGED


@dataclass
class UnitSystems:
    """Right-hand sides ``b_i`` scaled to unit norm, with what it takes to scale solutions back.

    Solving for ``b_i / ||b_i||`` keeps a tiny right-hand side from
    underflowing or stopping on a curvature that rounds to zero; a zero one
    has the zero solution and runs no iteration.

    Attributes
    ----------
    unit : torch.Tensor of shape (k, n)
        ``b_i / ||b_i||``; zero rows for zero (or non-finite) ``b_i``.
    solvable : torch.Tensor of bool, shape (k,)
        Rows with a nonzero ``b_i`` (non-finite ones included: they break down).
    finite : torch.Tensor of bool, shape (k,)
    threshold : torch.Tensor of shape (k,)
        The stopping residual in units of ``||b_i||``: ``max(rtol, atol / ||b_i||)``.
    """

    unit: torch.Tensor
    solvable: torch.Tensor
    finite: torch.Tensor
    threshold: torch.Tensor
    largest: torch.Tensor
    scaled_norms: torch.Tensor

    @classmethod
    def of(cls, rhs, rtol, atol):
        # ||b_i|| without underflow: squaring the entries of a 1e-25 gradient gives 0 in float32, so
        # each row is divided by its largest entry first. The scale is kept as two factors.
        largest = rhs.abs().amax(dim=1)
        solvable = largest > 0
        scaled = rhs / torch.where(solvable, largest, torch.ones_like(largest))[:, None]
        scaled_norms = torch.linalg.vector_norm(scaled, dim=1)
        unit = scaled / torch.where(solvable, scaled_norms, torch.ones_like(scaled_norms))[:, None]
        norms = largest.double() * scaled_norms.double()  # float64: the true size, even when tiny
        # In units of ||b_i||: rtol, or atol relative to this right-hand side.
        threshold = torch.clamp(atol / torch.where(solvable, norms, torch.ones_like(norms)), min=rtol)
        finite = torch.isfinite(largest)
        unit = torch.where(finite[:, None], unit, torch.zeros_like(unit))
        return cls(unit, solvable, finite, threshold.to(rhs.dtype), largest, scaled_norms)

    def initial_status(self):
        """``MAX_ITER`` for the systems to solve; ``CONVERGED`` for zero ones, ``BREAKDOWN`` for non-finite ones."""
        status = torch.full((len(self.unit),), MAX_ITER, dtype=torch.int64, device=self.unit.device)
        status[~self.solvable | (self.threshold >= 1)] = CONVERGED  # zero is already close enough
        status[~self.finite] = BREAKDOWN  # a non-finite gradient: nothing to solve
        return status

    def scaled_back(self, solution, failed):
        """Solutions of the unit systems times ``||b_i||``, in place; NaN rows where ``failed`` (a system broke
        down or diverged)."""
        solution *= torch.where(self.solvable, self.scaled_norms, torch.zeros_like(self.scaled_norms))[:, None]
        solution *= torch.where(self.solvable, self.largest, torch.zeros_like(self.largest))[:, None]
        solution[failed] = float("nan")  # never a silent number for a failed system
        return solution


def report_iteration(progress, residual_norms, running):
    """One iteration on ``progress``, with the worst relative residual of the systems still running."""
    progress.update()
    if progress.enabled and bool(running.any()):
        progress.note(f"worst residual {float(residual_norms[running].max()):.2e}, {int(running.sum())} running")


def batched_conjugate_gradient(apply_matrix, rhs, *, rtol, atol, max_iter, preconditioner=None,
                               progress=NO_PROGRESS):
    """Solve ``A x_i = b_i`` for every row ``b_i`` of ``rhs`` together.

    Each system keeps its own step sizes, so this is ``k`` independent CG
    runs; only the matrix products are shared, one ``apply_matrix`` call per
    iteration on the rows still running. A system stops when
    ``||r_i|| <= max(rtol * ||b_i||, atol)``, or when it meets a direction of
    non-positive curvature (``A`` not positive definite), or non-finite
    values; the report says which.

    The systems are solved for the unit vectors ``b_i / ||b_i||`` and scaled
    back, so that a tiny right-hand side neither underflows nor stops on a
    curvature that rounds to zero; a zero right-hand side has the zero
    solution and runs no iteration.

    Parameters
    ----------
    apply_matrix : callable
        ``(m, n) -> (m, n)`` rows ``A v``.
    rhs : torch.Tensor of shape (k, n)
    rtol, atol : float
    max_iter : int
    preconditioner : object with ``apply(rows) -> rows``, optional
        Applies an approximation of ``A^-1`` (symmetric positive definite).
    progress : bar from :func:`skinfl._progress.progress`, optional
        Steps once per iteration, showing the worst relative residual.

    Returns
    -------
    solution : torch.Tensor of shape (k, n)
    report : CgReport
    """
    systems = UnitSystems.of(rhs, rtol, atol)
    unit, solvable, threshold = systems.unit, systems.solvable, systems.threshold

    def precondition(vectors):
        return vectors if preconditioner is None else preconditioner.apply(vectors)

    solution = torch.zeros_like(unit)
    residual = unit
    direction = precondition(residual).clone()  # updated in place: must not alias residual
    residual_dot = (residual * direction).sum(dim=1)
    residual_norm = solvable.to(unit.dtype)
    status = systems.initial_status()
    active = status == MAX_ITER

    # Iterate on a working set of rows that shrinks only when fewer than half of it still runs:
    # converged rows ride along (unchanged) until then. Shapes then change about log2(k) times
    # per solve, the same ones every chunk, so the allocator reuses its blocks; a new shape at
    # every iteration fragments the heap and inflates the process's memory several times over.
    working = active.nonzero().squeeze(1)
    n_iter = 0
    while n_iter < max_iter and bool(active.any()):
        n_iter += 1
        running = active[working]
        if 2 * int(running.sum()) < len(working):
            working = working[running]
            running = active[working]
        p = direction[working]
        ap = apply_matrix(p)
        curvature = (p * ap).sum(dim=1)
        dot = residual_dot[working]
        broken = running & (~torch.isfinite(curvature) | ~torch.isfinite(dot))
        negative = running & ~broken & (curvature <= 0)
        status[working[broken]] = BREAKDOWN
        status[working[negative]] = NEGATIVE_CURVATURE
        running = running & ~broken & ~negative
        active[working] = running
        step = torch.where(running, dot / torch.where(running, curvature, torch.ones_like(curvature)),
                           torch.zeros_like(curvature))
        solution[working] += step[:, None] * p
        r = residual[working] - step[:, None] * ap
        residual[working] = r
        norms_now = torch.linalg.vector_norm(r, dim=1)
        residual_norm[working] = torch.where(running, norms_now, residual_norm[working])
        z = precondition(r)
        new_dot = (r * z).sum(dim=1)
        beta = torch.where(running, new_dot / torch.where(running, dot, torch.ones_like(dot)), torch.zeros_like(dot))
        direction[working] = torch.where(running[:, None], z + beta[:, None] * p, p)
        residual_dot[working] = torch.where(running, new_dot, dot)
        done = running & (norms_now <= threshold[working])
        status[working[done]] = CONVERGED
        active[working] = running & ~done
        report_iteration(progress, residual_norm, active)

    return systems.scaled_back(solution, status == BREAKDOWN), CgReport(n_iter, status, residual_norm)
