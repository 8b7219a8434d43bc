"""Block conjugate gradient: the right-hand sides of a solve share one Krylov subspace.

O'Leary's block CG ("The block conjugate gradient algorithm and related
methods", 1980), made breakdown-free as in Ji and Li ("A breakdown-free
block conjugate gradient method", 2017): every iteration searches a block
of directions built from all residuals, and each system takes the best step
in the whole block. Gradients of one model share the top of the curvature's
spectrum, so a block of ``k`` systems converges in several times fewer
iterations than ``k`` independent runs, each iteration costing one
curvature product of at most ``k`` vectors.

The search block is rank-revealing and shrinks: directions at rounding
level (duplicated or combined right-hand sides) are dropped, and converged
systems leave it. Only directions that are dependent to the precision of
the dtype are dropped: in float32, dropping nearly dependent ones as well
(relative singular values up to 1e-2) tripled the iterations on trained
networks, whose late residuals are nearly dependent yet each carry what
their system still lacks.

Vectors are rows, as in :mod:`skinfl._curvature`. The big products run in
the rows' dtype on their device; the small ``m x m`` problems (Gram
matrices, eigendecompositions) in float64.
"""

from __future__ import annotations

import torch

from .._progress import NO_PROGRESS
from .cg import BREAKDOWN, CONVERGED, MAX_ITER, NEGATIVE_CURVATURE, STALLED, CgReport, UnitSystems, report_iteration

# Directions whose squared singular value, relative to the largest, is below
# this many times (rows x float64 eps + dtype eps**2) are dependent: what
# rounding of the rows (eps**2) and of their float64 Gram matrix leaves.
_DEPENDENCE = 100.0
# A system whose true residual misses the tolerance after a restart, and did
# not shrink by at least this factor since the previous check, has reached
# the accuracy the dtype allows: it is not restarted again.
_RESTART_PROGRESS = 0.5


def block_conjugate_gradient(apply_matrix, rhs, *, rtol, atol, max_iter, preconditioner=None,
                             progress=NO_PROGRESS):
    """Solve ``A X = B`` for all rows ``b_i`` of ``rhs`` with one shared Krylov subspace.

    Stopping, per system: ``||r_i|| <= max(rtol * ||b_i||, atol)`` with
    ``r_i`` the true residual ``b_i - A x_i``: recurrences drift, so the
    residuals of converged systems are recomputed at the end, and systems
    that missed the tolerance restart from there. A system that cannot get
    there after a restart (the accuracy the dtype allows) is ``STALLED``
    with its true residual, unless the solve ran out of iterations
    (``MAX_ITER``). ``A`` that is not positive definite on the search
    block (``P^T A P`` has an eigenvalue ``<= 0``) stops every running system
    with ``NEGATIVE_CURVATURE``; non-finite values with ``BREAKDOWN`` (NaN
    solutions).

    As in :func:`~skinfl._linalg.cg.batched_conjugate_gradient`, the systems
    are solved for the unit vectors ``b_i / ||b_i||`` and scaled back; a zero
    right-hand side has the zero solution.

    Parameters
    ----------
    apply_matrix : callable
        ``(m, n) -> (m, n)`` rows ``A v``, ``A`` symmetric.
    rhs : torch.Tensor of shape (k, n)
    rtol, atol : float
    max_iter : int
        Most iterations (curvature products of the search block).
    preconditioner : object with ``apply(rows) -> rows``, optional
        Applies an approximation of ``A^-1`` (symmetric positive definite).
    progress : bar from :func:`skinfl._progress.progress`, optional
        Steps once per iteration, showing the worst relative residual.

    Returns
    -------
    solution : torch.Tensor of shape (k, n)
    report : CgReport
        ``n_iter`` counts iterations (the final residual check is one more
        product, not an iteration); ``relative_residuals`` are true residuals
        except for systems that broke down or met negative curvature.
    """
    systems = UnitSystems.of(rhs, rtol, atol)
    unit, threshold = systems.unit, systems.threshold
    status = systems.initial_status()
    residual_norms = systems.solvable.to(unit.dtype)
    solution = torch.zeros_like(unit)
    residual = unit.clone()
    checked = status != MAX_ITER  # true residual known: x = 0 for the systems not to solve
    missed = torch.full_like(residual_norms, float("inf"))  # true residual at the last failed check

    running = status == MAX_ITER
    n_iter = 0
    while bool(running.any()) and n_iter < max_iter:
        n_iter = _iterate(apply_matrix, solution, residual, residual_norms, status, threshold, running, n_iter,
                          max_iter, preconditioner, progress)
        running = _check_true_residuals(apply_matrix, unit, solution, residual, residual_norms, status, threshold,
                                        checked, missed, out_of_iterations=n_iter >= max_iter)
    return (systems.scaled_back(solution, status == BREAKDOWN),
            CgReport(n_iter, status, residual_norms))


def _iterate(apply_matrix, solution, residual, residual_norms, status, threshold, running, n_iter, max_iter,
             preconditioner, progress):
    """Block CG on the ``running`` systems, from their current residuals.

    Updates ``solution``, ``residual``, ``residual_norms`` and ``status`` in
    place (systems still running at ``max_iter`` keep ``MAX_ITER``); returns
    the iteration count.
    """
    rows = running.nonzero().squeeze(1)
    # The running systems, compacted: rows leave as they converge, so every product is smaller.
    x, r, bound = solution[rows], residual[rows], threshold[rows]
    previous = None  # (W, A W, (W A W^T)^-1) of the last block: the next is made A-conjugate to it

    def retire(leaving, new_status):
        nonlocal rows, x, r, bound
        solution[rows[leaving]] = x[leaving]
        residual[rows[leaving]] = r[leaving]
        status[rows[leaving]] = new_status
        staying = ~leaving
        rows, x, r, bound = rows[staying], x[staying], r[staying], bound[staying]

    while len(rows) and n_iter < max_iter:
        block = _search_block(r, preconditioner, previous)
        if block is None and previous is not None:  # everything left lies in the last block: rounding
            previous = None
            block = _search_block(r, preconditioner, None)
        if block is None:  # residuals at rounding level: the true-residual check decides
            break
        n_iter += 1
        products = apply_matrix(block)
        gram = _symmetric(_gram64(block, products))
        if not bool(torch.isfinite(gram).all()):
            retire(torch.ones_like(rows, dtype=torch.bool), BREAKDOWN)
            break
        curvatures, vectors = torch.linalg.eigh(gram)
        if float(curvatures[0]) <= 0:
            retire(torch.ones_like(rows, dtype=torch.bool), NEGATIVE_CURVATURE)
            break
        inverse = (vectors / curvatures) @ vectors.T  # (W A W^T)^-1
        # The step minimising each system's error in the A-norm over the block.
        steps = (_gram64(r, block) @ inverse).to(r.dtype)
        x += steps @ block
        r -= steps @ products
        norms = torch.linalg.vector_norm(r, dim=1)
        residual_norms[rows] = norms.to(residual_norms.dtype)
        broken = ~torch.isfinite(norms)
        if bool(broken.any()):
            retire(broken, BREAKDOWN)
            norms = norms[~broken]
        done = norms <= bound
        if bool(done.any()):
            retire(done, CONVERGED)
        report_iteration(progress, residual_norms, status == MAX_ITER)
        previous = (block, products, inverse)

    solution[rows], residual[rows] = x, r  # out of iterations: still MAX_ITER
    return n_iter


def _search_block(residual, preconditioner, previous):
    """Orthonormal rows spanning the next directions to search, or None if there are none.

    The preconditioned residuals, made A-conjugate to the previous block
    (block CG's ``beta``), with dependent directions removed.
    """
    block = residual if preconditioner is None else preconditioner.apply(residual)
    if previous is not None:
        last, last_products, inverse = previous
        block = block - (_gram64(block, last_products) @ inverse).to(block.dtype) @ last
    return _independent_rows(block)


def _independent_rows(rows):
    """Orthonormal rows spanning the same space, numerically dependent directions removed; None if none is left.

    An eigendecomposition of the Gram matrix of the normalised rows drops
    the directions at rounding level and orthonormalises the others; where
    nearly dependent directions were kept, the orthonormality this loses is
    restored by a second pass (Cholesky-QR2 in spirit).
    """
    norms = torch.linalg.vector_norm(rows, dim=1)
    nonzero = norms > 0
    if not bool(nonzero.any()):
        return None
    rows, norms = rows[nonzero], norms[nonzero]
    basis = rows / norms[:, None]
    floor = _DEPENDENCE * (len(rows) * torch.finfo(torch.float64).eps + torch.finfo(rows.dtype).eps ** 2)
    for _ in range(2):
        # In float64: a Gram matrix in float32 cannot tell a direction at 1e-4 of the others from rounding.
        values, vectors = torch.linalg.eigh(_symmetric(basis.double() @ basis.double().T))
        independent = values > values[-1] * floor
        values, vectors = values[independent], vectors[:, independent]
        basis = (vectors / values.sqrt()).T.to(rows.dtype) @ basis
        # The rows are now orthonormal to about eps * (largest / smallest) of the values.
        if float(values[0]) >= float(values[-1]) * torch.finfo(rows.dtype).eps ** 0.5:
            break
    return basis


def _check_true_residuals(apply_matrix, unit, solution, residual, residual_norms, status, threshold, checked, missed,
                          out_of_iterations):
    """Replace the recurrence residuals of finished systems by true ones; return the systems to restart.

    Systems that stopped as converged or out of iterations are checked (one
    product). One that meets its threshold is converged. A converged one
    whose true residual misses it runs again from there, unless it missed at
    a previous check too and has not improved by ``_RESTART_PROGRESS`` since:
    that is the accuracy the dtype allows. A system that misses and does not
    run again is ``MAX_ITER`` when the solve is ``out_of_iterations``, else
    ``STALLED``: it stopped improving with iterations left.
    """
    restart = torch.zeros_like(checked)
    finished = (status == CONVERGED) | (status == MAX_ITER)
    rows = (finished & ~checked).nonzero().squeeze(1)
    if not len(rows):
        return restart
    true = unit[rows] - apply_matrix(solution[rows])
    norms = torch.linalg.vector_norm(true, dim=1)
    residual[rows] = true
    residual_norms[rows] = norms
    checked[rows] = True
    broken = ~torch.isfinite(norms)
    met = ~broken & (norms <= threshold[rows])
    missed_now = ~broken & ~met
    again = missed_now & (status[rows] == CONVERGED) & (norms < _RESTART_PROGRESS * missed[rows])
    status[rows[broken]] = BREAKDOWN
    status[rows[met]] = CONVERGED
    status[rows[missed_now]] = MAX_ITER if out_of_iterations else STALLED
    status[rows[again]] = MAX_ITER  # running again
    missed[rows[missed_now]] = norms[missed_now]
    restart[rows[again]] = True
    checked[rows[again]] = False
    return restart


def _gram64(left, right):
    """``left @ right.T`` as float64; the product itself runs in the rows' dtype (it is the costly part,
    and measured as good as float64 for the iterations)."""
    return (left @ right.T).double()


def _symmetric(matrix):
    return (matrix + matrix.T) / 2
