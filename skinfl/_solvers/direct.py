"""DirectInfluence: the explicit curvature matrix, factorised once."""

from __future__ import annotations

from numbers import Integral

import torch

from .._docs import shared_docs
from .._validation import Interval, StrOptions
from .._warnings import warn
from ..base import BaseInfluence
from ..exceptions import NotPositiveDefiniteWarning

_BYTES_PER_FLOAT64 = 8


def _factorize_cholesky(curvature, regularization):
    """Lower Cholesky factor of ``curvature + diag(regularization)`` in float64, column-major (a float
    regularization is added to the whole diagonal); None if the matrix is not positive definite."""
    system = curvature.to(torch.float64, copy=True)
    system.diagonal().add_(regularization.double() if isinstance(regularization, torch.Tensor) else regularization)
    info = torch.empty((), dtype=torch.int32, device=system.device)
    torch.linalg.cholesky_ex(system, upper=True, out=(system, info))  # in place: U with C = U^T U
    return system.mT if int(info) == 0 else None  # L = U^T, a column-major view


@shared_docs(
    progress="the passes building the curvature matrix, its factorization",
    memory="the curvature matrix (``8 * n_params**2`` bytes on disk)",
    unpenalized_parameters="left out",
)
class DirectInfluence(BaseInfluence):
    """Influence with the explicit curvature matrix, factorised once in ``fit``.

    Builds ``C``, the ``(n_params, n_params)`` Hessian or Gauss-Newton matrix
    of the mean training loss, from batched curvature products, adds
    ``regularization * I`` and factorises it in float64. Exact up to
    floating point; affordable for models up to some ten thousand parameters.

    Parameters
    ----------
    {model}
    {loss}
    {parameters}
    {regularization}
    {second_order}
    solver : {"auto", "cholesky", "eigh"}, default="auto"
        ``"cholesky"`` is fastest and requires ``C + lambda I`` positive
        definite. ``"eigh"`` also gives ``eigenvalues_`` and handles indefinite
        matrices. ``"auto"`` tries Cholesky and falls back to ``"eigh"`` with a
        :class:`~skinfl.exceptions.NotPositiveDefiniteWarning`. The
        eigendecomposition is of ``C``, so it does not depend on
        ``regularization``: with ``memory`` it is cached with the curvature
        the first time a candidate needs it, and read back by the others.
    max_params : int, default=10000
        Largest model (in trainable parameters) for which the matrix is built;
        it takes ``8 * n_params**2`` bytes.
    {batch_size}
    {device}
    {progress}
    {memory}
        Each candidate then only factorises the matrix.
    {random_state}

    Attributes
    ----------
    {fitted_attributes}
    solver_ : {"cholesky", "eigh"}
        The factorisation used.
    eigenvalues_ : torch.Tensor of shape (n_params,) or None
        Eigenvalues of the curvature ``C`` (without regularization), in
        descending order, in float64, when ``solver_ == "eigh"``; None otherwise.
        With ``unpenalized_parameters_``, those of ``C`` plus the model's
        penalty, minus ``regularization_``.

    See Also
    --------
    CgInfluence : Matrix-free conjugate gradient, for models too large here.

    Examples
    --------
    >>> import torch
    >>> from skinfl import DirectInfluence
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    >>> est = DirectInfluence(model, loss="cross_entropy", regularization=0.1).fit(X, y)
    >>> est.influences(X[:2], y[:2]).shape
    torch.Size([2, 20])
    """

    _parameter_constraints = {
        **BaseInfluence._parameter_constraints,
        "solver": [StrOptions({"auto", "cholesky", "eigh"})],
        "max_params": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        model,
        *,
        loss="auto",
        parameters=None,
        regularization=1e-3,
        second_order="hessian",
        solver="auto",
        max_params=10_000,
        batch_size=512,
        device=None,
        progress=False,
        memory=None,
        random_state=None,
    ):
        self.model = model
        self.loss = loss
        self.parameters = parameters
        self.regularization = regularization
        self.second_order = second_order
        self.solver = solver
        self.max_params = max_params
        self.batch_size = batch_size
        self.device = device
        self.progress = progress
        self.memory = memory
        self.random_state = random_state

    def _compute_factors(self, curvature):
        n_params = curvature.n_params
        if n_params > self.max_params:
            gigabytes = _BYTES_PER_FLOAT64 * n_params**2 / 1e9
            raise ValueError(
                f"DirectInfluence would build a {n_params:,} x {n_params:,} curvature matrix "
                f"({gigabytes:.1f} GB in float64), above max_params={self.max_params:,}. "
                "Use CgInfluence, which never forms the matrix, for this model, or raise "
                "max_params if the memory is there."
            )
        # Products are summed in float64 and kept in the model's dtype, their own precision.
        return {"curvature": curvature.dense(torch.float64).to(curvature.fmodel.dtype)}, {}

    def _build_inverse(self):
        self.eigenvalues_ = None
        if self.solver == "eigh":
            return self._build_from_eigenpairs()
        with self._progress(f"Cholesky factorization ({self.n_params_} x {self.n_params_})", total=1) as bar:
            factor = _factorize_cholesky(self._factors["curvature"], self._regularization_terms())
            bar.update()
        if factor is not None:
            self.solver_ = "cholesky"
            self._factorization = factor
            return None
        if self.solver == "cholesky":
            raise ValueError(
                "The curvature plus regularization is not positive definite, so solver='cholesky' "
                "cannot factorise it. Raise regularization, use second_order='gauss_newton', "
                "or solver='eigh' to invert it as it is."
            )
        return self._build_from_eigenpairs()

    def _build_from_eigenpairs(self):
        terms = self._regularization_terms()
        if isinstance(terms, torch.Tensor):
            # Parameters left unregularized: the eigenpairs of C no longer give those of C + diag(terms).
            with self._progress(f"eigendecomposition ({self.n_params_} x {self.n_params_})", total=1) as bar:
                system = self._factors["curvature"].to(torch.float64, copy=True)
                system.diagonal().add_(terms.double())
                eigenvalues, eigenvectors = torch.linalg.eigh(system)
                bar.update()
            self.solver_ = "eigh"
            self._factorization = (eigenvalues, eigenvectors)
            self.eigenvalues_ = (eigenvalues - self.regularization_).flip(0)
            self._warn_about_spectrum(eigenvalues)
            return
        if "eigenvectors" not in self._factors:
            # Of C, not of C + lambda I: a factor every regularization shares. It is added to the
            # cached factors, so that the other candidates of a search that need it read it back.
            with self._progress(f"eigendecomposition ({self.n_params_} x {self.n_params_})", total=1) as bar:
                eigenvalues, eigenvectors = torch.linalg.eigh(self._factors["curvature"].to(torch.float64))
                bar.update()
            self._add_factors({"eigenvalues": eigenvalues, "eigenvectors": eigenvectors})
        eigenvalues = self._factors["eigenvalues"]
        self.solver_ = "eigh"
        self._factorization = (eigenvalues + self.regularization_, self._factors["eigenvectors"])
        self.eigenvalues_ = eigenvalues.flip(0)
        self._warn_about_spectrum(eigenvalues + self.regularization_)

    def _warn_about_spectrum(self, eigenvalues):
        smallest = float(eigenvalues[0])
        largest = float(eigenvalues.abs().max())
        rounding = largest * torch.finfo(torch.float64).eps * len(eigenvalues)
        if smallest < -rounding:
            n_negative = int((eigenvalues < -rounding).sum())
            advice = f"Use regularization > {-(smallest - self.regularization_):.3g}"
            if self.second_order != "gauss_newton":
                advice += ", or second_order='gauss_newton' (always positive semi-definite)"
            warn(
                f"The {self.second_order} plus regularization has {n_negative} negative "
                f"eigenvalue(s) (smallest {smallest:.3g}): the model is not at a minimum of the "
                f"training loss, so influences invert an indefinite matrix. {advice}.",
                NotPositiveDefiniteWarning,
            )
        elif smallest <= rounding:
            advice = "Raise regularization."
            if self.unpenalized_parameters_:
                advice = (
                    "The parameters the model's penalty leaves out (unpenalized_parameters_) get no "
                    "regularization, and some get no curvature from the data either (a dead unit's intercept, "
                    "intercepts that only add up): pass regularization as a number to regularize every parameter."
                )
            warn(
                "The curvature plus regularization is numerically singular; influences are "
                f"dominated by rounding. {advice}",
                NotPositiveDefiniteWarning,
            )

    def _apply_inverse(self, gradients):
        rhs = gradients.to(torch.float64).T
        if self.solver_ == "cholesky":
            # Two triangular solves on the column-major factor: torch.cholesky_solve would copy
            # the whole factor at every call.
            lower = self._factorization
            solution = torch.linalg.solve_triangular(
                lower.mT, torch.linalg.solve_triangular(lower, rhs, upper=False), upper=True
            )
        else:
            eigenvalues, eigenvectors = self._factorization
            solution = eigenvectors @ ((eigenvectors.T @ rhs) / eigenvalues[:, None])
        return solution.T.to(gradients.dtype)
