"""What removing training points, or groups of them, does to the fitted parameters: first order or one Newton step.

The training objective in sum form is

    F(theta) = sum_i l_i(theta) + n / 2 * theta^T R theta,

with ``R`` the regularization terms (``regularization_`` on every penalised
parameter). Its curvature at the fitted parameters is ``n A`` with
``A = C + R``, the matrix an estimator inverts. Removing a set ``G`` of
training points removes their terms and keeps the rest, the penalty
included. At the fitted parameters ``grad F = 0``, so the objective without
``G`` has gradient ``-g_G`` there, ``g_G = sum_{j in G} g_j``, and one Newton
step on it moves the parameters by

    delta_G = (n A - C_G)^-1 g_G,        C_G = sum_{j in G} C_j,

with ``C_j = J_j^T H_j J_j`` point ``j``'s Gauss-Newton term (``J_j`` the
Jacobian of its output, ``H_j`` the Hessian of its loss in that output). A
test loss then changes by ``<g_test, delta_G>``. First order drops ``C_G``:
``delta_G = A^-1 g_G / n``, the influence divided by ``n``.

``C_G = U^T U`` where the rows of ``U`` are ``J_j^T u`` for the columns ``u``
of a square root of ``H_j``: at most as many rows per point as it has output
values. With ``S = A^-1 g_G`` and the rows ``V = A^-1 U``, the Woodbury
identity gives

    delta_G = (S + w V) / n,        w = (n I - U V^T)^-1 (U S),

so the estimator's own inverse does all the work on parameter vectors, and
what is left is one small system per point or group. For a generalised
linear model ``C_j`` is point ``j``'s exact Hessian term, and this is the
rescaled influence of a single point. For groups with too many rows of
``U``, the modified system ``(n A - C_G) x = g_G`` is solved by conjugate
gradient instead, with products of the exact curvature, preconditioned by
the estimator's inverse.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn import get_config

from ._cotangents import output_cotangents
from ._curvature import CurvatureOperator
from ._gradients import gradient_batch, index_batches, pullback_batch
from ._linalg.block_cg import block_conjugate_gradient
from ._linalg.cg import BREAKDOWN, MAX_ITER, NEGATIVE_CURVATURE
from ._warnings import warn
from .exceptions import CgConvergenceWarning, NotPositiveDefiniteWarning

ORDERS = ("first", "newton")
SOLVERS = ("auto", "woodbury", "cg")
TEST_LOSSES = ("linear", "exact")
# A group whose Woodbury rows (points x output values) exceed this many is solved by conjugate gradient under
# solver="auto": Woodbury factorizes a square matrix of that size and holds two of (rows x n_params).
MAX_WOODBURY_ROWS = 4096
# The conjugate gradient solve of a group's modified system: relative residual by dtype, and its iterations.
_CG_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
_CG_MAX_ITER = 1000


def group_codes(groups, n_train):
    """``(codes, labels)``: each training point's group as an index into ``labels``, sorted as ``np.unique``."""
    if isinstance(groups, torch.Tensor):
        groups = groups.detach().cpu().numpy()
    groups = np.asarray(groups)
    if groups.ndim != 1 or len(groups) != n_train:
        raise ValueError(
            f"groups must have one label per training point, shape ({n_train},); got shape {groups.shape}."
        )
    if groups.dtype.kind == "f" and np.isnan(groups).any():
        raise ValueError("groups holds NaN; give every training point a group label.")
    if groups.dtype == object and any(label is None for label in groups):
        raise ValueError("groups holds None; give every training point a group label.")
    labels, codes = np.unique(groups, return_inverse=True)
    return codes.reshape(-1).astype(np.int64), labels


def rows_by_group(codes, n_groups):
    """The training rows of each group, a list of sorted integer arrays."""
    order = np.argsort(codes, kind="stable")
    edges = np.searchsorted(codes[order], np.arange(n_groups + 1))
    return [order[edges[group]:edges[group + 1]] for group in range(n_groups)]


def gauss_newton_rows(fmodel, x, y):
    """Rows ``J_j^T u`` of each sample's Gauss-Newton factor, shape ``(n, r, n_params)``.

    ``u`` runs over the columns of a square root of the sample's output
    Hessian (see :func:`skinfl._cotangents.output_cotangents`), so that the
    sample's Gauss-Newton term is the sum of the rows' outer products.
    """
    with torch.no_grad():
        output = fmodel.output(fmodel.params, x)
        columns = [math.sqrt(weight) * pullback_batch(fmodel, x, cotangent)
                   for weight, cotangent in output_cotangents(fmodel.loss, output, y, "true", None, None)]
    return torch.stack(columns, dim=1)


def loss_changes(fmodel, deltas, x, y):
    """``l(x, y; theta + delta) - l(x, y; theta)`` for each sample of a batch and each row of ``deltas``,
    shape ``(n, k)``: the test losses evaluated at the stepped parameters, one forward pass per step."""
    with torch.no_grad():
        base = fmodel.per_sample_objective(fmodel.params, x, y)
        changes = torch.empty(len(base), len(deltas), dtype=base.dtype, device=base.device)
        for column, delta in enumerate(deltas):
            pieces = fmodel.layout.unflatten(delta)
            shifted = {name: value + pieces[name] for name, value in fmodel.params.items()}
            changes[:, column] = fmodel.per_sample_objective(shifted, x, y) - base
    return changes


class RemovalSteps:
    """The parameter changes ``delta`` of removing training points or groups by one Newton step (see the module
    docstring; first-order effects are influences / n, computed as influences are).

    Parameters
    ----------
    estimator : BaseInfluence
        A fitted estimator: its inverse, model and number of fitted samples.
    data : DataSource
        The training points whose removal is predicted.
    solver : {"auto", "woodbury", "cg"}
        How Newton steps of groups are solved; single points always use
        Woodbury unless ``"cg"``.
    """

    def __init__(self, estimator, data, solver):
        self.estimator = estimator
        self.fmodel = estimator._functional_model()
        self.data = data
        self.solver = solver
        self.n = estimator.n_samples_fit_
        self.dtype = self.fmodel.dtype
        # Rows of U per point: at most the output values of a sample.
        self.rows_per_point = max(1, math.prod(estimator.output_shape_))
        self._curvature = None
        self.indefinite = 0

    # ---------------------------------------------------------------- points
    def of_points(self, rows):
        """``delta`` of removing each training point of ``rows`` (a slice), ``(n_rows, n_params)``."""
        deltas = torch.empty(rows.stop - rows.start, self.fmodel.n_params, dtype=self.dtype,
                             device=self.estimator.device_)
        if self._uses_cg(self.rows_per_point):
            for offset, row in enumerate(range(rows.start, rows.stop)):
                deltas[offset] = self._newton_cg(np.array([row]))
            return deltas
        for position, index in index_batches(rows, self._points_per_batch()):
            x, y = self.data.batch(index)
            deltas[position] = self._newton_points(x, y)
        return deltas

    def _points_per_batch(self):
        """Points per Woodbury batch: their rows of ``U`` and ``A^-1 U`` within half of ``working_memory``."""
        itemsize = torch.tensor([], dtype=self.dtype).element_size()
        budget = get_config()["working_memory"] * 2**20 // 2
        per_point = 2 * (self.rows_per_point + 1) * self.fmodel.n_params * itemsize
        return int(max(1, min(self.estimator.batch_size, budget // per_point)))

    def _newton_points(self, x, y):
        """Woodbury for each point of a batch on its own: ``(b, r)`` rows of ``U`` per point."""
        gradients = gradient_batch(self.fmodel, x, y)
        factors = gauss_newton_rows(self.fmodel, x, y)
        n_points, n_rows, n_params = factors.shape
        solved = self.estimator._apply_inverse(torch.cat([gradients, factors.reshape(-1, n_params)]))
        steps, inverse_factors = solved[:n_points], solved[n_points:].reshape(n_points, n_rows, n_params)
        gram = torch.einsum("brp,bsp->brs", factors, inverse_factors).double()
        projections = torch.einsum("brp,bp->br", factors, steps).double()
        weights = self._small_solve(gram, projections).to(self.dtype)
        return (steps + torch.einsum("br,brp->bp", weights, inverse_factors)) / self.n

    def _small_solve(self, gram, projections):
        """``(n I - G)^-1 p`` for a batch of symmetric ``G``: the Woodbury system, in float64.

        ``n A - C_G`` is positive definite exactly when ``n I - G`` is; a
        removal that leaves it indefinite (negative curvature, or an inverse
        that is not accurate enough on these points) is counted, and the
        caller warns.
        """
        gram = (gram + gram.transpose(-1, -2)) / 2
        system = self.n * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device) - gram
        smallest = torch.linalg.eigvalsh(system)[..., 0]
        self.indefinite += int((smallest <= 0).sum())
        return torch.linalg.solve(system, projections.unsqueeze(-1)).squeeze(-1)

    # ---------------------------------------------------------------- groups
    def of_groups(self, groups):
        """``delta`` of removing each group, given as a list of row arrays: ``(n_groups, n_params)``."""
        deltas = torch.empty(len(groups), self.fmodel.n_params, dtype=self.dtype, device=self.estimator.device_)
        for position, rows in enumerate(groups):
            if self._uses_cg(len(rows) * self.rows_per_point):
                deltas[position] = self._newton_cg(rows)
            else:
                deltas[position] = self._newton_woodbury(rows)
        return deltas

    def _uses_cg(self, n_rows):
        if self.solver != "auto":
            return self.solver == "cg"
        itemsize = torch.tensor([], dtype=self.dtype).element_size()
        fits = 2 * n_rows * self.fmodel.n_params * itemsize <= get_config()["working_memory"] * 2**20
        return n_rows > MAX_WOODBURY_ROWS or not fits

    def _gradient_sum(self, rows):
        total = torch.zeros(self.fmodel.n_params, dtype=self.dtype, device=self.estimator.device_)
        for _, index in index_batches(rows, self.estimator.batch_size):
            x, y = self.data.batch(index)
            with torch.no_grad():
                total += gradient_batch(self.fmodel, x, y).sum(dim=0)
        return total

    def _newton_woodbury(self, rows):
        """Woodbury for one group: all its points' rows of ``U`` together."""
        gradient = torch.zeros(self.fmodel.n_params, dtype=self.dtype, device=self.estimator.device_)
        parts = []
        for _, index in index_batches(rows, self.estimator.batch_size):
            x, y = self.data.batch(index)
            with torch.no_grad():
                gradient += gradient_batch(self.fmodel, x, y).sum(dim=0)
            parts.append(gauss_newton_rows(self.fmodel, x, y).flatten(0, 1))
        factors = torch.cat(parts)
        solved = self.estimator._apply_inverse(torch.cat([gradient[None], factors]))
        step, inverse_factors = solved[0], solved[1:]
        gram = (factors @ inverse_factors.T).double()
        weights = self._small_solve(gram, (factors @ step).double()).to(self.dtype)
        return (step + weights @ inverse_factors) / self.n

    def _newton_cg(self, rows):
        """Conjugate gradient on ``(n (C + R) - C_G) x = g_G``, preconditioned by the estimator's inverse."""
        estimator = self.estimator
        if self._curvature is None:
            self._curvature = estimator._curvature()
        curvature, n = self._curvature, self.n
        removed = CurvatureOperator(self.fmodel, self.data.subset(rows), "gauss_newton", estimator.batch_size)
        terms = estimator._regularization_terms()
        size = len(rows)

        def apply_matrix(vectors):
            return n * (curvature.matmat(vectors) + terms * vectors) - size * removed.matmat(vectors)

        # An inverse that runs its own iterations against the data would make every step a nested solve.
        preconditioner = None if estimator._inverse_reads_data else _ScaledInverse(estimator, n)
        gradient = self._gradient_sum(rows)[None]
        solution, report = block_conjugate_gradient(apply_matrix, gradient, rtol=_CG_RTOL.get(self.dtype, 1e-5),
                                                    atol=0.0, max_iter=_CG_MAX_ITER, preconditioner=preconditioner)
        status = int(report.status[0])
        if status in (MAX_ITER, NEGATIVE_CURVATURE, BREAKDOWN):
            reason = {MAX_ITER: f"did not converge in {_CG_MAX_ITER} iterations",
                      NEGATIVE_CURVATURE: "met negative curvature: the objective without the group is not convex "
                                          "there",
                      BREAKDOWN: "broke down on non-finite values"}[status]
            warn(f"The conjugate gradient solve of a group's Newton step {reason} (relative residual "
                 f"{float(report.relative_residuals[0]):.1e}); its removal effects are inaccurate. Increase "
                 "regularization, or use solver='woodbury' for groups of a few points.", CgConvergenceWarning)
        return solution[0]

    def warn_indefinite(self, what):
        """Warn once if any Woodbury system met a removal that leaves the curvature indefinite."""
        if self.indefinite:
            warn(f"Removing {self.indefinite} of the {what} leaves a curvature n (C + regularization) - C_G that is "
                 "not positive definite, so one Newton step is not a minimizer's step: their removal effects are "
                 "unreliable. Increase regularization, or use an estimator whose inverse is more accurate on "
                 "these points (order='first' has no such condition).", NotPositiveDefiniteWarning)


class _ScaledInverse:
    """The estimator's inverse ``A^-1 / n``: a preconditioner for ``n A - C_G``."""

    def __init__(self, estimator, n):
        self.estimator = estimator
        self.n = n

    def apply(self, rows):
        return self.estimator._apply_inverse(rows) / self.n
