"""CgInfluence: conjugate gradient on all right-hand sides of a call at once."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import torch

from .._curvature import _MAX_VECTOR_BLOCK
from .._deprecation import DEPRECATED
from .._docs import shared_docs
from .._gradients import batch_slices
from .._cotangents import resolve_target_draws
from .._kronecker import EkfacInverse, compute_ekfac_factors, plan_layers
from .._linalg.block_cg import block_conjugate_gradient
from .._linalg.cg import BREAKDOWN, CONVERGED, MAX_ITER, NEGATIVE_CURVATURE, STALLED, batched_conjugate_gradient
from .._linalg.nystroem import nystroem_sketch
from .._memory import release_freed_memory
from .._validation import Hidden, Interval, StrOptions
from ..base import BaseInfluence
from ..exceptions import CgConvergenceWarning


@dataclass
class JacobiPreconditioner:
    """Divides by ``diag(C_GN) + lambda``, the Gauss-Newton diagonal (exact for a few outputs, else estimated)."""

    diagonal: torch.Tensor

    @staticmethod
    def compute_factors(curvature, rank, generator, output_shape):
        if curvature.fmodel.loss.kind == "custom":
            raise ValueError(
                "preconditioner='jacobi' takes the Gauss-Newton diagonal from the loss's curvature in the "
                "outputs, which needs loss='cross_entropy', 'bce_with_logits', 'mse' or NLLLoss (or their "
                "torch.nn modules); with a custom loss use preconditioner='nystroem' or None."
            )
        return {"diagonal": curvature.gauss_newton_diagonal(output_shape, generator)}

    @classmethod
    def build(cls, factors, regularization, fmodel):
        diagonal = factors["diagonal"] + regularization
        # Parameters with no curvature at all (dead units) would divide by zero.
        floor = float(diagonal.mean()) * torch.finfo(diagonal.dtype).eps ** 0.5
        return cls(torch.clamp(diagonal, min=max(floor, torch.finfo(diagonal.dtype).tiny)))

    def apply(self, rows):
        return rows / self.diagonal


@dataclass
class NystroemPreconditioner:
    """Inverse of a rank-``r`` Nystroem approximation of ``C + lambda I``.

    ``P^-1 = U diag((s_r + lambda) / (s + lambda)) U^T + (I - U U^T)`` with
    ``s`` the sketch's eigenvalues (Frangella, Tropp and Udell, "Randomized
    Nystroem preconditioning", 2023): the top ``r`` eigenvalues are brought
    down to about ``s_r + lambda``, which is what slows CG on curvature with
    a fast-decaying spectrum.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def compute_factors(curvature, rank, generator, output_shape):
        sketch = nystroem_sketch(_sketched_curvature(curvature), rank, generator)
        return {"eigenvalues": sketch.eigenvalues, "eigenvectors": sketch.eigenvectors}

    @classmethod
    def build(cls, factors, regularization, fmodel):
        eigenvalues = factors["eigenvalues"]
        floor = eigenvalues[-1] if len(eigenvalues) else eigenvalues.new_zeros(())
        scale = (floor + regularization) / (eigenvalues + regularization)
        return cls(eigenvalues, factors["eigenvectors"], scale)

    def apply(self, rows):
        coordinates = rows @ self.eigenvectors
        return rows + (coordinates * (self.scale - 1)) @ self.eigenvectors.T


@dataclass
class EkfacPreconditioner:
    """Inverse of the EK-FAC approximation of ``C_GN + lambda I`` (see :class:`EkfacInfluence`).

    Its factors come from two passes of gradients over the training data:
    CG then refines the block-diagonal Kronecker inverse towards the exact
    one, and needs fewest iterations where EK-FAC is already close. The
    Fisher is that of ``EkfacInfluence(n_target_draws="auto")``: the exact
    expectation over the predictive distribution for a few outputs per
    sample, else one drawn target. Without sampling noise CG needs fewer
    iterations (on the digits MLP and CNN of the benchmarks, 58 instead of
    73 and 48 instead of 52).
    """

    inverse: EkfacInverse

    @staticmethod
    def compute_factors(curvature, rank, generator, output_shape):
        n_target_draws = resolve_target_draws("auto", output_shape, curvature.fmodel.loss)
        return compute_ekfac_factors(curvature, "true", n_target_draws, True, generator)

    @classmethod
    def build(cls, factors, regularization, fmodel):
        return cls(EkfacInverse(plan_layers(fmodel), factors, regularization, singular="clamp"))

    def apply(self, rows):
        return self.inverse.apply(rows)


_PRECONDITIONERS = {"jacobi": JacobiPreconditioner, "nystroem": NystroemPreconditioner, "ekfac": EkfacPreconditioner}
_SOLVERS = {"block": block_conjugate_gradient, "independent": batched_conjugate_gradient}


def _sketched_curvature(curvature):
    """The curvature the Nystroem preconditioner sketches: always the Gauss-Newton matrix.

    A Hessian sketch keeps only the non-negative part of its core, and where
    the Hessian has eigenvalues of both signs (near any minimum with weight
    decay, whose loss Hessian alone is indefinite) the kept part overstates
    the top eigenvalues several times, so that the preconditioner slows CG
    down. The Gauss-Newton matrix is positive semi-definite and close to the
    Hessian near a minimum.
    """
    if curvature.second_order == "gauss_newton":
        return curvature
    return curvature.with_second_order("gauss_newton")


def _convergence_message(reports, max_iter, preconditioner, second_order, rtol, dtype):
    """One message for the solves of a call, whose advice fits why systems stopped; None if all converged."""
    status = torch.cat([report.status.cpu() for report in reports])
    residuals = torch.cat([report.relative_residuals.cpu() for report in reports])
    failed = status != CONVERGED
    n_failed = int(failed.sum())
    if n_failed == 0:
        return None
    n_iter = max(report.n_iter for report in reports)
    worst = float(residuals[failed].nan_to_num(nan=float("inf")).max())
    parts = [
        f"Conjugate gradient did not converge for {n_failed} of {len(status)} systems "
        f"(stopped after {n_iter} of at most {max_iter} iterations; worst relative residual {worst:.3g})."
    ]
    n_max_iter = int((status == MAX_ITER).sum())
    if n_max_iter:
        advice = [f"raise max_iter (now {max_iter})", "raise regularization"]
        if preconditioner is None:
            advice.append("use preconditioner='nystroem'")
        parts.append(f"{n_max_iter} ran out of iterations; to converge: " + ", ".join(advice) + ".")
    stalled = status == STALLED
    if bool(stalled.any()):
        reached = float(residuals[stalled].max())
        advice = "use a float64 model and data (model.double())" if dtype != torch.float64 else ""
        advice += (" or " if advice else "use ") + f"rtol >= {reached:.2g} (now {rtol:g})"
        parts.append(
            f"{int(stalled.sum())} stalled with iterations left: their residuals stopped falling at about "
            f"{reached:.2g}, the accuracy {str(dtype).replace('torch.', '')} allows for this curvature, so more "
            f"iterations cannot help; {advice}."
        )
    n_negative = int((status == NEGATIVE_CURVATURE).sum())
    if n_negative:
        parts.append(
            f"{n_negative} met negative curvature: the {second_order} plus regularization is not positive "
            "definite (the model is not at a minimum), so more iterations cannot help; raise regularization "
            "or use second_order='gauss_newton'."
        )
    n_broken = int((status == BREAKDOWN).sum())
    if n_broken:
        parts.append(
            f"{n_broken} broke down on non-finite values (their inverse-curvature gradients are NaN): check "
            "the model and data for overflow, or raise regularization."
        )
    return " ".join(parts)


@shared_docs(
    progress="the preconditioner's curvature products, every conjugate-gradient solve (iterations, with the "
             "worst relative residual and the systems still running)",
    memory="the preconditioner's sketch, diagonal or Kronecker factors",
    max_iter=("iterations per solve", "one (block) curvature product over the fitted data"),
    random_state="the Nystroem test matrix and the targets drawn for the Jacobi diagonal and the EK-FAC "
                 "factors",
    unpenalized_parameters="left out",
)
class CgInfluence(BaseInfluence):
    """Influence with conjugate gradient, matrix-free.

    Solves ``(C + lambda I) u = g`` for every gradient ``g`` of a call with
    conjugate gradient, using batched curvature-vector products over the
    fitted data: each iteration is one pass over the data for all the
    systems still running. Memory is that of the gradients, never
    ``n_params**2``.

    By default the gradients of a call are solved by block conjugate
    gradient, up to 128 at a time: they share one Krylov subspace, so the
    directions one system explores serve all, and a block converges in
    several times fewer iterations than the same systems solved one by one.
    The search block drops directions that are dependent or that no system
    still needs, and converged systems leave it, so products shrink as the
    solve goes on.

    Parameters
    ----------
    {model}
    {loss}
    {parameters}
    {regularization}
        ``lambda >= 0`` added as ``lambda * I`` to the curvature. Conjugate
        gradient needs ``C + lambda I`` positive definite.
    {second_order}
    rtol : float, default=1e-4
        Relative tolerance: system ``i`` stops when
        ``||r_i|| <= max(rtol * ||g_i||, atol)``.
    atol : float, default=0.0
        Absolute tolerance on the residual norm.
    {max_iter}
        A system that has not converged by then gives a
        :class:`~skinfl.exceptions.CgConvergenceWarning`.
    preconditioner : {None, "jacobi", "nystroem", "ekfac"}, default="nystroem"
        Built once in ``fit``. ``"nystroem"``: a randomised rank
        ``preconditioner_rank`` Nystroem approximation of the Gauss-Newton
        matrix (one batched product of ``preconditioner_rank`` vectors),
        which removes the large eigenvalues that slow CG down; usually
        several times fewer iterations. It sketches the Gauss-Newton matrix
        even with ``second_order="hessian"``: it is positive semi-definite
        and close to the Hessian near a minimum, whereas a sketch of a
        Hessian with negative eigenvalues (usual with weight decay)
        overstates the top of its spectrum and slows CG down. ``"jacobi"``: divides by the diagonal of
        the Gauss-Newton matrix plus ``lambda``, which helps when parameters
        have very different curvature scales; the diagonal comes from
        per-sample gradients of the loss's output curvature, exactly when a
        sample's output has at most 16 values, else from targets drawn from
        the model's predictive distribution (at least 1024 draws), so it
        needs a built-in loss or its torch module. ``"ekfac"``: the EK-FAC approximation of the
        Gauss-Newton matrix plus ``lambda`` (see :class:`EkfacInfluence`;
        two passes of gradients over the data, with the exact expectation
        over the predictive distribution when a sample's output has at most
        16 values, else one target drawn per sample; a built-in loss), which
        already captures most of each layer's curvature: CG refines it
        towards the exact inverse. None: plain CG.
    preconditioner_rank : int, default=100
        Rank of the ``"nystroem"`` preconditioner (capped at ``n_params``).
    solver : {"auto", "block", "independent"}, default="auto"
        ``"block"``: block conjugate gradient, the gradients of a call
        solved together in blocks of up to 128 sharing one Krylov subspace;
        each system still stops at its own tolerance, and the residuals of
        converged systems are recomputed at the end (one more product), so
        that converged means converged. A block of one gradient runs plain
        conjugate gradient. ``"independent"``: one conjugate gradient per
        gradient, sharing only the curvature products; a gradient's solution
        then does not depend on which others are solved with it (bitwise,
        whatever the chunking), at the cost of more iterations.
        ``"auto"``: ``"block"``, the faster on every problem measured.
    {batch_size}
    {device}
    {progress}
    {memory}
    {random_state}
        Results agree to ``rtol`` whatever the seed; fix it for bitwise
        reproducibility.
    method : {"auto", "block", "independent"}, default="deprecated"
        Former name of ``solver``.

        .. deprecated:: 0.2
           ``method`` was renamed ``solver`` in 0.2 and will be removed in
           0.4.

    Attributes
    ----------
    {fitted_attributes}
    preconditioner_ : object or None
        The fitted preconditioner: ``JacobiPreconditioner`` (its
        ``diagonal``) or ``NystroemPreconditioner`` (its ``eigenvalues`` and
        ``eigenvectors``), or None.
    solver_ : {"block", "independent"}
        The solver ``solver`` resolved to.
    n_iter_ : int
        Conjugate-gradient iterations, each one (block) curvature product:
        0 after ``fit``, which solves nothing, then those of the last call
        that solved systems (``transform``, ``influences``,
        ``self_influence``, ``top_influences``, ``score``), the most any of
        its solves took.
    relative_residuals_ : torch.Tensor of shape (n_systems,)
        ``||g_i - (C + lambda I) u_i|| / ||g_i||`` of each system the last
        call solved, in the order solved (float64, on the host; 0 for a zero
        gradient, NaN where a system broke down). Set by those calls, not by
        ``fit``.

    See Also
    --------
    DirectInfluence : The exact inverse, for small models.

    Examples
    --------
    >>> import torch
    >>> from skinfl import CgInfluence
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    >>> est = CgInfluence(model, loss="cross_entropy", regularization=0.1).fit(X, y)
    >>> est.self_influence(X[:4], y[:4]).shape
    torch.Size([4])
    """

    _parameter_constraints = {
        **BaseInfluence._parameter_constraints,
        "rtol": [Interval(Real, 0, None, closed="left")],
        "atol": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "preconditioner": [StrOptions(set(_PRECONDITIONERS)), None],
        "preconditioner_rank": [Interval(Integral, 1, None, closed="left")],
        "solver": [StrOptions(set(_SOLVERS) | {"auto"})],
        "method": [StrOptions(set(_SOLVERS) | {"auto"}), Hidden(StrOptions({DEPRECATED}))],
    }
    _renamed_parameters = {"method": "solver"}
    _renamed_attributes = {"method_": "solver_"}
    _factor_parameters = ("preconditioner", "preconditioner_rank", "random_state")
    _inverse_reads_data = True  # solves run against the training data

    def __init__(
        self,
        model,
        *,
        loss="auto",
        parameters=None,
        regularization=1e-3,
        second_order="hessian",
        rtol=1e-4,
        atol=0.0,
        max_iter=1000,
        preconditioner="nystroem",
        preconditioner_rank=100,
        solver="auto",
        batch_size=512,
        device=None,
        progress=False,
        memory=None,
        random_state=None,
        method=DEPRECATED,
    ):
        self.model = model
        self.loss = loss
        self.parameters = parameters
        self.regularization = regularization
        self.second_order = second_order
        self.rtol = rtol
        self.atol = atol
        self.max_iter = max_iter
        self.preconditioner = preconditioner
        self.preconditioner_rank = preconditioner_rank
        self.solver = solver
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.memory = memory
        self.random_state = random_state
        self.method = method

    def _compute_factors(self, curvature):
        if self.preconditioner is None:
            return {}, {}
        factors = _PRECONDITIONERS[self.preconditioner].compute_factors(
            curvature, self.preconditioner_rank, self._generator(), self.output_shape_
        )
        return factors, {}

    def _build_inverse(self):
        self.preconditioner_ = None
        if self.preconditioner is not None:
            self.preconditioner_ = _PRECONDITIONERS[self.preconditioner].build(
                self._factors, self.regularization_, self._functional_model())
        solver = self._parameter("solver")
        self.solver_ = "block" if solver == "auto" else solver
        self._regularization_diagonal = self._regularization_terms()  # once, not per solve
        self._record_fit_iterations(0)

    @property
    def n_iter_(self):
        """Iterations of the solves of the last call (the largest over its blocks of systems).

        0 after ``fit``, which solves nothing; then set by each call that
        solves systems (:meth:`transform`, :meth:`influences`,
        :meth:`self_influence`, ...).
        """
        return self._last_solve_value("n_iter")

    @property
    def relative_residuals_(self):
        """``||g_i - (C + lambda I) u_i|| / ||g_i||`` of each system solved by the last call, in order.

        A float64 tensor on the host; 0 for a zero gradient. Set by each call
        that solves systems, not by ``fit``.
        """
        return self._last_solve_value("relative_residuals")

    def _solve_summary(self, reports):
        residuals = torch.cat([report.relative_residuals.double().cpu() for report in reports])
        return {**super()._solve_summary(reports), "relative_residuals": residuals}

    def _apply_inverse(self, gradients):
        curvature = self._curvature()
        regularization = self._regularization_diagonal

        def apply_matrix(vectors):
            return curvature.matmat(vectors) + regularization * vectors

        # Systems are solved one product block at a time: the products cost the same per system
        # (they run in blocks of this many vectors anyway), and CG's state, some ten copies of the
        # right-hand sides, stays small.
        solution = torch.empty_like(gradients)
        reports = []
        for rows in batch_slices(len(gradients), _MAX_VECTOR_BLOCK):
            # One system alone: block CG is CG, without the small eigenproblems.
            solver = "independent" if rows.stop - rows.start == 1 else self.solver_
            desc = f"{solver} CG, {rows.stop - rows.start} systems"
            with self._progress(desc, total=self.max_iter, unit="iteration") as bar:
                solution[rows], report = _SOLVERS[solver](
                    apply_matrix,
                    gradients[rows],
                    rtol=self.rtol,
                    atol=self.atol,
                    max_iter=self.max_iter,
                    preconditioner=self.preconditioner_,
                    progress=bar,
                )
            reports.append(report)
        self._report_solves(reports)
        release_freed_memory()  # the solves' temporaries, before the next chunk allocates them again
        return solution

    def _solve_warning(self, reports):
        message = _convergence_message(reports, self.max_iter, self.preconditioner, self.second_order, self.rtol,
                                       self._dtype())
        return None if message is None else (message, CgConvergenceWarning)
