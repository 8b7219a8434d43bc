"""CgInfluence: conjugate gradient on all right-hand sides of a call at once."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from numbers import Integral, Real

import torch

from sklearn.utils import check_random_state

from .._sketch import nystroem_sketch
from .._validation import Interval, StrOptions
from ..base import BaseInfluence
from ..exceptions import CgConvergenceWarning


@dataclass
class CgReport:
    """What one batched solve did (for diagnostics and the warning)."""

    n_iter: int
    n_systems: int
    converged: torch.Tensor
    relative_residuals: torch.Tensor
    indefinite: torch.Tensor


def batched_conjugate_gradient(apply_matrix, rhs, *, rtol, atol, max_iter, preconditioner=None):
    """Solve ``A x_i = b_i`` for every row ``b_i`` of ``rhs`` together.

    Each system keeps its own step sizes, so this is ``k`` independent CG
    runs; only the matrix products are shared, one ``apply_matrix`` call per
    iteration on the rows still running. A system stops when
    ``||r_i|| <= max(rtol * ||b_i||, atol)``, or when it meets a direction of
    non-positive curvature (``A`` not positive definite), which is reported.

    Parameters
    ----------
    apply_matrix : callable
        ``(m, n) -> (m, n)`` rows ``A v``.
    rhs : torch.Tensor of shape (k, n)
    rtol, atol : float
    max_iter : int
    preconditioner : object with ``apply(rows) -> rows``, optional
        Applies an approximation of ``A^-1`` (symmetric positive definite).

    Returns
    -------
    solution : torch.Tensor of shape (k, n)
    report : CgReport
    """
    n_systems = len(rhs)
    solution = torch.zeros_like(rhs)
    residual = rhs.clone()
    rhs_norm = torch.linalg.vector_norm(rhs, dim=1)
    threshold = torch.clamp(rtol * rhs_norm, min=atol)

    def precondition(vectors):
        return vectors if preconditioner is None else preconditioner.apply(vectors)

    direction = precondition(residual).clone()  # updated in place: must not alias residual
    residual_dot = (residual * direction).sum(dim=1)
    residual_norm = rhs_norm.clone()
    active = residual_norm > threshold
    indefinite = torch.zeros(n_systems, dtype=torch.bool, device=rhs.device)

    n_iter = 0
    while n_iter < max_iter and bool(active.any()):
        n_iter += 1
        rows = active.nonzero().squeeze(1)
        p = direction[rows]
        ap = apply_matrix(p)
        curvature = (p * ap).sum(dim=1)
        bad = curvature <= 0
        if bool(bad.any()):
            indefinite[rows[bad]] = True
            active[rows[bad]] = False
            keep = ~bad
            rows, p, ap, curvature = rows[keep], p[keep], ap[keep], curvature[keep]
        step = residual_dot[rows] / curvature
        solution[rows] += step[:, None] * p
        r = residual[rows] - step[:, None] * ap
        residual[rows] = r
        residual_norm[rows] = torch.linalg.vector_norm(r, dim=1)
        z = precondition(r)
        new_dot = (r * z).sum(dim=1)
        direction[rows] = z + (new_dot / residual_dot[rows])[:, None] * p
        residual_dot[rows] = new_dot
        active[rows] = residual_norm[rows] > threshold[rows]

    converged = (residual_norm <= threshold) & ~indefinite
    relative = residual_norm / torch.clamp(rhs_norm, min=torch.finfo(rhs.dtype).tiny)
    return solution, CgReport(n_iter, n_systems, converged, relative, indefinite)


@dataclass
class JacobiPreconditioner:
    """Divides by ``diag(C_GN) + lambda``, the exact Gauss-Newton diagonal."""

    diagonal: torch.Tensor

    @classmethod
    def fit(cls, curvature, regularization, rank, generator):
        diagonal = curvature.gauss_newton_diagonal() + regularization
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

    @classmethod
    def fit(cls, curvature, regularization, rank, generator):
        sketch = nystroem_sketch(curvature, rank, generator)
        floor = sketch.eigenvalues[-1] if len(sketch.eigenvalues) else sketch.eigenvalues.new_zeros(())
        scale = (floor + regularization) / (sketch.eigenvalues + regularization)
        return cls(sketch.eigenvalues, sketch.eigenvectors, scale)

    def apply(self, rows):
        coordinates = rows @ self.eigenvectors
        return rows + (coordinates * (self.scale - 1)) @ self.eigenvectors.T


_PRECONDITIONERS = {"jacobi": JacobiPreconditioner, "nystroem": NystroemPreconditioner}


def _warn_if_unconverged(report, max_iter, preconditioner, second_order):
    n_failed = int((~report.converged).sum())
    if n_failed == 0:
        return
    n_indefinite = int(report.indefinite.sum())
    worst = float(report.relative_residuals[~report.converged].max())
    advice = [f"raise max_iter (now {max_iter})", "raise regularization"]
    if preconditioner is None:
        advice.append("use preconditioner='nystroem'")
    message = (
        f"Conjugate gradient did not converge for {n_failed} of {report.n_systems} systems "
        f"after {report.n_iter} iterations; worst relative residual {worst:.3g}. "
    )
    if n_indefinite:
        message += (
            f"{n_indefinite} met negative curvature: the {second_order} plus regularization is "
            "not positive definite (the model is not at a minimum); raise regularization or use "
            "second_order='gauss_newton'. "
        )
    message += "To converge: " + ", ".join(advice) + "."
    warnings.warn(message, CgConvergenceWarning, stacklevel=4)


class CgInfluence(BaseInfluence):
    """Influence with conjugate gradient, matrix-free.

    Solves ``(C + lambda I) u = g`` for every gradient ``g`` of a call with
    conjugate gradient, using batched curvature-vector products over the
    fitted data: each iteration is one pass over the data for all the
    systems still running. Memory is that of the gradients, never
    ``n_params**2``.

    Parameters
    ----------
    model : torch.nn.Module
        The trained model. It is copied in ``fit`` and evaluated in eval mode;
        influence is taken with respect to its parameters that require gradients.
    loss : {"cross_entropy", "mse", "bce_with_logits"}, torch.nn loss module or callable, default="cross_entropy"
        The training loss. A callable takes ``(output, target)`` and returns the
        scalar mean loss of a batch, and must be picklable to save the estimator.
    regularization : float, default=1e-3
        ``lambda >= 0`` added as ``lambda * I`` to the curvature. Conjugate
        gradient needs ``C + lambda I`` positive definite.
    second_order : {"hessian", "gauss_newton"}, default="hessian"
        Which curvature to invert.
    rtol : float, default=1e-4
        Relative tolerance: system ``i`` stops when
        ``||r_i|| <= max(rtol * ||g_i||, atol)``.
    atol : float, default=0.0
        Absolute tolerance on the residual norm.
    max_iter : int, default=1000
        Iterations before giving up with a
        :class:`~skinfl.exceptions.CgConvergenceWarning`.
    preconditioner : {None, "jacobi", "nystroem"}, default="nystroem"
        Built once in ``fit``. ``"nystroem"``: a randomised rank
        ``preconditioner_rank`` Nystroem approximation of the curvature
        (one batched product of ``preconditioner_rank`` vectors), which
        removes the large eigenvalues that slow CG down; usually several
        times fewer iterations. ``"jacobi"``: divides by the exact diagonal of
        the Gauss-Newton matrix plus ``lambda``, which helps when parameters
        have very different curvature scales. None: plain CG.
    preconditioner_rank : int, default=100
        Rank of the ``"nystroem"`` preconditioner (capped at ``n_params``).
    batch_size : int, default=512
        Samples per batched pass over the data.
    device : str or torch.device, default=None
        Where the work runs; None uses the model's device.
    progress : bool, default=False
        Show tqdm progress bars.
    random_state : int, RandomState instance or None, default=None
        Seeds the Nystroem test matrix. Results agree to ``rtol`` whatever
        the seed; fix it for bitwise reproducibility.

    Attributes
    ----------
    n_params_ : int
        Number of trainable parameters.
    n_samples_fit_ : int
        Number of fitted training samples.
    n_features_in_ : int
        Number of input values per sample.
    input_shape_ : tuple of int
        Per-sample input shape.
    output_shape_ : tuple of int
        Per-sample output shape of the model.
    device_ : torch.device
        Device the estimator computes on.
    model_ : torch.nn.Module
        The evaluation copy of the model.
    loss_ : object
        The resolved loss.
    trainable_parameters_ : list of str
        Names of the parameters influence is taken with respect to.
    preconditioner_ : object or None
        The fitted preconditioner: ``JacobiPreconditioner`` (its
        ``diagonal``) or ``NystroemPreconditioner`` (its ``eigenvalues`` and
        ``eigenvectors``), or None.

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
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        model,
        *,
        loss="cross_entropy",
        regularization=1e-3,
        second_order="hessian",
        rtol=1e-4,
        atol=0.0,
        max_iter=1000,
        preconditioner="nystroem",
        preconditioner_rank=100,
        batch_size=512,
        device=None,
        progress=False,
        random_state=None,
    ):
        self.model = model
        self.loss = loss
        self.regularization = regularization
        self.second_order = second_order
        self.rtol = rtol
        self.atol = atol
        self.max_iter = max_iter
        self.preconditioner = preconditioner
        self.preconditioner_rank = preconditioner_rank
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.random_state = random_state

    def _fit_curvature(self, curvature):
        self.preconditioner_ = None
        if self.preconditioner is not None:
            seed = check_random_state(self.random_state).randint(2**31 - 1)
            generator = torch.Generator().manual_seed(int(seed))
            self.preconditioner_ = _PRECONDITIONERS[self.preconditioner].fit(
                curvature, self.regularization, self.preconditioner_rank, generator
            )

    def _solve(self, gradients):
        curvature = self._curvature_over(self._fit_X, self._fit_y)
        regularization = self.regularization

        def apply_matrix(vectors):
            return curvature.matmat(vectors) + regularization * vectors

        solution, report = batched_conjugate_gradient(
            apply_matrix,
            gradients,
            rtol=self.rtol,
            atol=self.atol,
            max_iter=self.max_iter,
            preconditioner=self.preconditioner_,
        )
        _warn_if_unconverged(report, self.max_iter, self.preconditioner, self.second_order)
        return solution
