"""ArnoldiInfluence, NystroemInfluence and the eigen-solvers they share, against explicit matrices.

The registry-driven tests check both estimators at full rank, where they are
exact; here they are checked at partial rank against the explicit formulas
(top eigenpairs of ``torch.linalg.eigh``, the Nystroem algebra), and the
eigen-solvers against ``eigh`` on indefinite and degenerate spectra.
"""

import copy
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import mlp, train
from registry import reference_gauss_newton, reference_gradients
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV

from skinfl import ArnoldiInfluence, DirectInfluence, NystroemInfluence, _curvature
from skinfl._gradients import gradients_of
from skinfl._linalg import eigensolvers
from skinfl._linalg.eigensolvers import top_eigenpairs
from skinfl._linalg.lanczos import block_lanczos
from skinfl.exceptions import NotPositiveDefiniteWarning

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------ helpers
class MatrixOperator:
    """An explicit symmetric matrix with the interface of a CurvatureOperator; counts its products."""

    def __init__(self, matrix):
        self.matrix = matrix
        self.fmodel = SimpleNamespace(dtype=matrix.dtype, device=matrix.device)
        self.n_params = len(matrix)
        self.blocks = []

    def matmat(self, rows):
        self.blocks.append(len(rows))
        return rows @ self.matrix

    def dense(self, dtype=None):
        return self.matrix.to(dtype or self.matrix.dtype)


def symmetric_with_spectrum(values, seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(len(values), len(values), generator=generator, dtype=torch.float64)).Q
    return (basis * values) @ basis.T


def top_of(matrix, rank):
    """Top ``rank`` eigenpairs by algebraic value, largest first."""
    values, vectors = torch.linalg.eigh(matrix)
    return values.flip(0)[:rank], vectors.flip(1)[:, :rank]


def assert_same_eigenspaces(values, vectors, expected_values, expected_vectors, atol):
    """Eigenvalues equal, and the projectors onto each cluster of equal eigenvalues equal."""
    torch.testing.assert_close(values, expected_values, rtol=0, atol=atol)
    identity = torch.eye(len(values), dtype=vectors.dtype)
    torch.testing.assert_close(vectors.T @ vectors, identity, rtol=0, atol=1e-12)
    starts = torch.cat([torch.tensor([True]), expected_values[1:] < expected_values[:-1] - 1e-8])
    clusters = torch.cumsum(starts, 0)
    # The last cluster may extend beyond rank: compare only complete ones.
    for cluster in clusters.unique()[:-1]:
        members = clusters == cluster
        torch.testing.assert_close(vectors[:, members] @ vectors[:, members].T,
                                   expected_vectors[:, members] @ expected_vectors[:, members].T,
                                   rtol=0, atol=100 * atol)


def solve(name, operator, rank, krylov_dimension, tol=1e-12, max_products=None, seed=0):
    max_products = 200 * krylov_dimension if max_products is None else max_products
    return top_eigenpairs(operator, rank, eigen_solver=name, krylov_dimension=krylov_dimension, tol=tol,
                          max_products=max_products, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def unconverged_problem():
    """An untrained MLP regression (mean squared error): its Hessian has large negative eigenvalues.

    Regression, because cross-entropy makes the Hessian of any network singular (the logits' shift
    invariance): a zero eigenvalue of multiplicity 6 here, more than a Krylov block may resolve.
    """
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    y = torch.stack([torch.sin(X[:, 0]), X[:, 1] * X[:, 2], X[:, 3]], dim=1)
    return mlp(seed=1), X, y


def curvature_of(model, X, y, second_order="hessian", loss="cross_entropy"):
    est = DirectInfluence(model, loss=loss, second_order=second_order, regularization=10.0).fit(X, y)
    return est._curvature()


# ------------------------------------------------------------------ eigen-solvers
SPECTRA = {
    "decaying": torch.exp(-torch.arange(80, dtype=torch.float64) / 8),
    "repeated": torch.cat([torch.full((3,), 2.0), torch.full((2,), 1.5), torch.exp(-torch.arange(75.0) / 8)]),
    "indefinite": torch.linspace(1.0, -1.0, 80, dtype=torch.float64) ** 3,
    "low rank": torch.cat([torch.linspace(3.0, 1.0, 12), torch.zeros(68)]).double(),
}


@pytest.mark.parametrize("solver", ["lanczos", "arpack"])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_top_eigenpairs_of_explicit_spectra(solver, spectrum):
    matrix = symmetric_with_spectrum(SPECTRA[spectrum].double())
    rank = 16 if spectrum == "low rank" else 8  # beyond the rank: zero eigenvalues, found by deflation
    pairs = solve(solver, MatrixOperator(matrix), rank, krylov_dimension=30)
    assert pairs.solver == solver and bool(pairs.converged.all())
    assert_same_eigenspaces(pairs.eigenvalues, pairs.eigenvectors, *top_of(matrix, rank), atol=1e-10)


@pytest.mark.parametrize("second_order", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("solver", ["lanczos", "arpack"])
def test_top_eigenpairs_of_a_curvature(classification_problem, solver, second_order):
    model, X, y = classification_problem
    curvature = curvature_of(model, X, y, second_order)
    pairs = solve(solver, curvature, 10, krylov_dimension=30)
    assert bool(pairs.converged.all())
    expected = top_of(curvature.dense(torch.float64), 10)
    assert_same_eigenspaces(pairs.eigenvalues, pairs.eigenvectors, *expected, atol=1e-10)


@pytest.mark.parametrize("solver", ["lanczos", "arpack"])
def test_top_eigenpairs_of_an_indefinite_hessian_reach_its_negative_eigenvalues(unconverged_problem, solver):
    model, X, y = unconverged_problem
    curvature = curvature_of(model, X, y, loss="mse")
    dense = curvature.dense(torch.float64)
    values = torch.linalg.eigvalsh(dense)
    assert values[0] < -0.5 * values[-1]  # clearly indefinite
    rank = 30  # of 43, of which 23 are positive
    pairs = solve(solver, curvature, rank, krylov_dimension=40)
    assert bool(pairs.converged.all())
    assert (pairs.eigenvalues < 0).sum() == 7
    assert_same_eigenspaces(pairs.eigenvalues, pairs.eigenvectors, *top_of(dense, rank), atol=1e-9)


def test_lanczos_multiplies_blocks_and_restarts():
    matrix = symmetric_with_spectrum(SPECTRA["decaying"])
    operator = MatrixOperator(matrix)
    result = block_lanczos(operator.matmat, 80, 6, krylov_dimension=20, block_size=4, tol=1e-12,
                           max_products=2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                           device="cpu")
    assert set(operator.blocks) == {4}
    assert result.n_iter > 1 and result.n_products == sum(operator.blocks)
    # The residual estimates are the true residuals.
    residuals = matrix @ result.eigenvectors - result.eigenvectors * result.eigenvalues
    true = torch.linalg.vector_norm(residuals, dim=0)
    torch.testing.assert_close(result.residuals, true, rtol=1e-3, atol=1e-14)
    assert bool(result.converged.all()) and float(true.max()) <= 1e-12


def test_lanczos_over_the_whole_space_is_exact():
    matrix = symmetric_with_spectrum(SPECTRA["low rank"])
    result = block_lanczos(MatrixOperator(matrix).matmat, 80, 80, krylov_dimension=80, block_size=7,
                           tol=1e-12, max_products=80, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64, device="cpu")
    assert result.n_iter == 1 and result.n_products == 80 and bool(result.converged.all())
    reconstructed = result.eigenvectors @ torch.diag(result.eigenvalues) @ result.eigenvectors.T
    torch.testing.assert_close(reconstructed, matrix, rtol=0, atol=1e-13)


def test_lanczos_reports_pairs_that_did_not_converge():
    matrix = symmetric_with_spectrum(SPECTRA["indefinite"])
    result = block_lanczos(MatrixOperator(matrix).matmat, 80, 8, krylov_dimension=20, block_size=2, tol=1e-12,
                           max_products=26, generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                           device="cpu")
    # 20 products fill the first space; the restart keeps 14 pairs and multiplies 3 blocks of 2 in the budget.
    assert result.n_iter == 2 and result.n_products == 26 and not bool(result.converged.all())
    assert len(result.eigenvalues) == 8


@pytest.mark.parametrize("max_products", [20, 21, 35, 100])
def test_lanczos_never_passes_its_budget_of_products(max_products):
    matrix = symmetric_with_spectrum(SPECTRA["decaying"])
    operator = MatrixOperator(matrix)
    result = block_lanczos(operator.matmat, 80, 6, krylov_dimension=20, block_size=4, tol=1e-15,
                           max_products=max_products, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64, device="cpu")
    assert sum(operator.blocks) == result.n_products <= max_products
    # Converged, or stopped because the next block would not fit.
    assert bool(result.converged.all()) or max_products - result.n_products < 4
    assert len(result.eigenvalues) == 6
    with pytest.raises(ValueError, match="max_products >= krylov_dimension"):
        block_lanczos(operator.matmat, 80, 6, krylov_dimension=20, block_size=4, tol=1e-15, max_products=19,
                      generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")


def test_lanczos_runs_in_the_operator_dtype():
    matrix = symmetric_with_spectrum(SPECTRA["decaying"]).float()
    pairs = solve("lanczos", MatrixOperator(matrix), 5, krylov_dimension=25, tol=1e-5)
    assert pairs.eigenvectors.dtype == torch.float32 and pairs.eigenvalues.dtype == torch.float64
    torch.testing.assert_close(pairs.eigenvalues, top_of(matrix.double(), 5)[0], rtol=0, atol=1e-5)


def test_a_krylov_space_of_full_dimension_is_the_explicit_matrix():
    matrix = symmetric_with_spectrum(SPECTRA["decaying"])
    for solver in ("lanczos", "arpack"):
        operator = MatrixOperator(matrix)
        pairs = solve(solver, operator, 80, krylov_dimension=80)
        assert pairs.solver == "dense" and operator.blocks == []  # MatrixOperator.dense, no products
        assert_same_eigenspaces(pairs.eigenvalues, pairs.eigenvectors, *top_of(matrix, 80), atol=1e-13)


# ------------------------------------------------------------------ Woodbury at partial rank
def woodbury(values, vectors, regularization):
    """``U diag(1 / (s + lambda)) U^T + (I - U U^T) / lambda`` (without the residual for lambda = 0)."""
    n = len(vectors)
    inverse = vectors @ torch.diag(1 / (values + regularization)) @ vectors.T
    if regularization:
        inverse = inverse + (torch.eye(n, dtype=torch.float64) - vectors @ vectors.T) / regularization
    return inverse


@pytest.mark.parametrize("second_order", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("regularization", [0.01, 0.0])
def test_arnoldi_at_partial_rank_is_the_woodbury_inverse_of_the_top_eigenpairs(classification_problem,
                                                                               second_order, regularization):
    model, X, y = classification_problem
    rank = 12
    est = ArnoldiInfluence(model, rank=rank, regularization=regularization, second_order=second_order,
                           tol=1e-12, random_state=0).fit(X, y)
    fitted = (est.solver_, est.rank_, est.krylov_dimension_, est.converged_)
    assert fitted == ("lanczos", rank, 32, True)
    assert est.n_iter_ >= 1
    values, vectors = top_of(est._curvature().dense(torch.float64), rank)
    torch.testing.assert_close(est.eigenvalues_, values, rtol=0, atol=1e-12)
    gradients = gradients_of(est._functional_model(), est._fit_data, 64, np.arange(8))
    expected = gradients @ woodbury(values, vectors, regularization)
    torch.testing.assert_close(est.transform(X[:8], y[:8]), expected, rtol=1e-9, atol=1e-9)
    # The discarded spectrum makes a difference: the truncated pseudo-inverse is not this.
    if regularization:
        assert not torch.allclose(expected, gradients @ woodbury(values, vectors, 0.0), rtol=1e-2)


def test_arpack_gives_the_influences_of_lanczos(classification_problem):
    model, X, y = classification_problem
    results = [ArnoldiInfluence(model, rank=10, solver=solver, tol=1e-12, regularization=0.01,
                                random_state=0).fit(X, y) for solver in ("lanczos", "arpack")]
    assert [est.solver_ for est in results] == ["lanczos", "arpack"]
    assert all(est.n_iter_ >= est.krylov_dimension_ for est in results)  # products, counted for ARPACK too
    torch.testing.assert_close(results[0].influences(X[:4], y[:4]), results[1].influences(X[:4], y[:4]),
                               rtol=1e-8, atol=1e-10)


def test_full_rank_without_regularization_is_the_exact_inverse(linear_regression):
    model, X, y, _ = linear_regression
    exact = DirectInfluence(model, loss="mse", regularization=0.0).fit(X, y).influences(X[:5], y[:5])
    for cls in (ArnoldiInfluence, NystroemInfluence):
        est = cls(model, loss="mse", regularization=0.0, rank=4, random_state=0).fit(X, y)
        np.testing.assert_allclose(est.influences(X[:5], y[:5]), exact, rtol=1e-9, atol=1e-12)


def test_indefinite_curvature_warns_and_names_the_fix(unconverged_problem):
    model, X, y = unconverged_problem
    params = dict(loss="mse", rank=30, krylov_dimension=40, regularization=1e-3, random_state=0)
    with pytest.warns(NotPositiveDefiniteWarning, match="gauss_newton") as record:
        est = ArnoldiInfluence(model, **params).fit(X, y)
    assert "7 of the 30 eigenvalues kept plus regularization are not positive" in str(record[0].message)
    assert "regularization > 0.157" in str(record[0].message)
    assert float(est.eigenvalues_[-1]) < -0.15
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ArnoldiInfluence(model, **params, second_order="gauss_newton").fit(X, y)
        # The discarded spectrum counts as zero: a rank above the negative eigenvalues does not warn.
        ArnoldiInfluence(model, **{**params, "rank": 20}).fit(X, y)


@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemInfluence])
def test_regularization_zero_drops_directions_without_curvature(classification_problem, cls):
    _, X, y = classification_problem
    # The Gauss-Newton matrix of 3 points of a 3-class linear model has rank 6 of its 15 parameters: at full
    # rank and regularization 0 the estimators apply its pseudo-inverse, also to gradients of other points,
    # which have components along the 9 directions without curvature.
    torch.manual_seed(0)
    small = torch.nn.Linear(4, 3).double()
    est = cls(small, regularization=0.0, rank=15, second_order="gauss_newton", random_state=0)
    if cls is ArnoldiInfluence:  # it keeps 15 eigenpairs, 9 of them zero to rounding
        with pytest.warns(NotPositiveDefiniteWarning, match="pseudo-inverse"):
            est.fit(X[:3], y[:3])
    else:  # the sketch keeps the 6 pairs it resolves (rank_)
        est.fit(X[:3], y[:3])
        assert est.rank_ == 6
    curvature = reference_gauss_newton(small, X[:3], y[:3], F.cross_entropy)
    pseudo_inverse = torch.linalg.pinv(curvature, rtol=1e-10, hermitian=True)
    G = reference_gradients(small, X[10:14], y[10:14], F.cross_entropy)
    torch.testing.assert_close(est.transform(X[10:14], y[10:14]), G @ pseudo_inverse, rtol=1e-7, atol=1e-9)


# ------------------------------------------------------------------ Nystroem at partial rank
@pytest.mark.parametrize("case", ["gauss_newton", "hessian", "indefinite hessian"])
def test_nystroem_at_partial_rank_is_the_sketch_algebra(classification_problem, unconverged_problem, case):
    """``C Omega (Omega^T C Omega)^+ Omega^T C``, its top pairs, and their Woodbury inverse.

    The indefinite Hessian has an indefinite core, whose negative part is kept (and whose sketch is far
    from the Hessian: eigenvalues of -4.7 and 5.2 for a spectrum within [-0.83, 1.38]; hence the warning).
    """
    model, X, y = unconverged_problem if case == "indefinite hessian" else classification_problem
    loss = "mse" if case == "indefinite hessian" else "cross_entropy"
    rank, regularization, seed = 15, 0.01, 3
    est = NystroemInfluence(model, loss=loss, rank=rank, regularization=regularization,
                            second_order="gauss_newton" if case == "gauss_newton" else "hessian", random_state=seed)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        est.fit(X, y)
    curvature = est._curvature().dense(torch.float64)
    n = len(curvature)
    # The same test matrix: the estimator's generator is seeded with random_state.
    gaussian = torch.randn(n, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    omega = torch.linalg.qr(gaussian).Q
    sketch = curvature @ omega
    core = omega.T @ sketch
    assert (torch.linalg.eigvalsh(core)[0] < 0) == (case == "indefinite hessian")
    approximation = sketch @ torch.linalg.pinv(core, hermitian=True, rtol=1e-10) @ sketch.T
    values, vectors = torch.linalg.eigh(approximation)  # of rank 15: its nonzero eigenpairs, largest first
    nonzero = values.abs().argsort(descending=True)[:rank]
    values, vectors = values[nonzero], vectors[:, nonzero]
    order = values.argsort(descending=True)
    values, vectors = values[order], vectors[:, order]
    torch.testing.assert_close(est.eigenvalues_, values, rtol=0, atol=1e-10)
    negative = bool((values + regularization < 0).any())
    assert negative == (case == "indefinite hessian")
    assert [str(w.message)[:50] for w in record if w.category is NotPositiveDefiniteWarning] == (
        ["6 of the 15 eigenvalues kept plus regularization a"] if negative else [])
    expected = woodbury(values, vectors, regularization)
    gradients = gradients_of(est._functional_model(), est._fit_data, 64, np.arange(6))
    torch.testing.assert_close(est.transform(X[:6], y[:6]), gradients @ expected, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------ rank and the factor cache
@pytest.fixture
def computations(monkeypatch):
    def patch(cls):
        calls = []
        original = cls._compute_factors

        def counting(self, curvature):
            calls.append(self.rank)
            return original(self, curvature)

        monkeypatch.setattr(cls, "_compute_factors", counting)
        return calls

    return patch


@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemInfluence])
def test_a_smaller_rank_slices_the_cached_factors_and_a_larger_one_replaces_them(classification_problem, cls,
                                                                                tmp_path, computations):
    model, X, y = classification_problem
    calls = computations(cls)
    params = dict(regularization=0.01, random_state=0, memory=tmp_path)
    large = cls(model, rank=20, **params).fit(X, y)
    small = cls(model, rank=8, **params).fit(X, y)
    assert calls == [20]
    torch.testing.assert_close(small.eigenvalues_, large.eigenvalues_[:8], rtol=0, atol=0)
    vectors = large._factors["eigenvectors"][:, :8]
    gradients = gradients_of(small._functional_model(), small._fit_data, 64, np.arange(5))
    expected = gradients @ woodbury(large.eigenvalues_[:8], vectors, 0.01)
    torch.testing.assert_close(small.transform(X[:5], y[:5]), expected, rtol=1e-10, atol=1e-10)

    larger = cls(model, rank=30, **params).fit(X, y)
    assert calls == [20, 30]
    (entry,) = (tmp_path / "skinfl_cache").glob("*.safetensors")  # replaced, not added
    cls(model, rank=25, **params).fit(X, y)
    assert calls == [20, 30]
    # Computed again at the larger rank: those of a fresh fit at that rank.
    fresh = cls(model, rank=30, regularization=0.01, random_state=0).fit(X, y)
    np.testing.assert_array_equal(larger.influences(X[:3], y[:3]), fresh.influences(X[:3], y[:3]))


@pytest.mark.parametrize("ranks, expected_calls", [([12, 8, 4], 2 + 1), ([4, 8, 12], 2 * 3 + 1)])
def test_grid_over_rank_and_regularization_computes_once_when_ranks_descend(classification_problem, tmp_path,
                                                                           computations, ranks,
                                                                           expected_calls):
    model, X, y = classification_problem
    calls = computations(ArnoldiInfluence)
    grid = {"rank": ranks, "regularization": [0.1, 0.01]}
    estimator = ArnoldiInfluence(model, tol=1e-12, random_state=0, memory=tmp_path)
    search = GridSearchCV(estimator, grid, cv=2).fit(X, y)
    # One computation per training set (2 folds, then the refit on all the data) when the largest rank
    # comes first; one per candidate of each fold when ranks ascend.
    assert len(calls) == expected_calls
    plain = GridSearchCV(ArnoldiInfluence(model, tol=1e-12, random_state=0), grid, cv=2).fit(X, y)
    # Converged top pairs of a larger rank are those of a fresh fit at the smaller rank.
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], plain.cv_results_["mean_test_score"],
                               rtol=1e-7)


# ------------------------------------------------------------------ errors and warnings
@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemInfluence])
def test_rank_above_the_number_of_parameters_names_the_fix(classification_problem, cls):
    model, X, y = classification_problem
    message = r"rank=500 exceeds the 43 parameters of this model; use DirectInfluence or rank <= 43"
    with pytest.raises(ValueError, match=message):
        cls(model, rank=500).fit(X, y)


def test_krylov_dimension_must_exceed_rank(classification_problem):
    model, X, y = classification_problem
    with pytest.raises(ValueError, match="krylov_dimension=10 must exceed rank=10"):
        ArnoldiInfluence(model, rank=10, krylov_dimension=10).fit(X, y)


def test_unconverged_eigenpairs_warn(classification_problem):
    model, X, y = classification_problem
    with pytest.warns(ConvergenceWarning, match="within 12 curvature-vector products.*raise max_iter"):
        est = ArnoldiInfluence(model, rank=10, krylov_dimension=12, tol=1e-14, max_iter=12, random_state=0)
        est.fit(X, y)
    assert not est.converged_ and est.n_iter_ == 12


@pytest.mark.parametrize("solver", ["lanczos", "arpack"])
def test_max_iter_bounds_the_curvature_products(classification_problem, solver, monkeypatch):
    """max_iter counts curvature-vector products: enforced by Lanczos, converted into ARPACK's restarts;
    None is 50 per Krylov basis vector; fewer than the first Krylov space is an error that says so."""
    model, X, y = classification_problem
    counted = []
    original = _curvature.CurvatureOperator.matmat

    def counting(self, vectors):
        counted.append(len(vectors))
        return original(self, vectors)

    monkeypatch.setattr(_curvature.CurvatureOperator, "matmat", counting)
    est = ArnoldiInfluence(model, rank=6, krylov_dimension=14, tol=1e-15, max_iter=40, solver=solver,
                           random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    # ARPACK: (40 - 14 - 1) // (14 - 6) = 3 iterations, 14 + 1 + 3 * 8 = 39 products at most.
    assert est.n_iter_ == sum(counted) <= 40
    counted.clear()
    ArnoldiInfluence(model, rank=6, tol=1e-8, solver=solver, random_state=0).fit(X, y)
    assert sum(counted) <= 50 * 26
    with pytest.raises(ValueError, match="max_iter=13 curvature products cannot fill the first Krylov space"):
        ArnoldiInfluence(model, rank=6, krylov_dimension=14, max_iter=13, solver=solver).fit(X, y)


def test_cupy_on_a_cpu_is_an_error_that_names_the_fix(classification_problem):
    model, X, y = classification_problem
    with pytest.raises(ValueError, match="solver='cupy' runs on a CUDA device.*solver='lanczos'"):
        ArnoldiInfluence(model, rank=5, solver="cupy").fit(X, y)


def test_missing_cupy_is_an_import_error_that_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ImportError, match=r"pip install skinfl\[gpu\]"):
        eigensolvers.check_cupy_can_run(torch.device("cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cupy_gives_the_eigenpairs_of_lanczos(classification_problem):
    pytest.importorskip("cupy")
    model, X, y = classification_problem
    model = copy.deepcopy(model).cuda()
    results = [ArnoldiInfluence(model, rank=8, solver=solver, tol=1e-10, regularization=0.01,
                                random_state=0).fit(X.cuda(), y.cuda()) for solver in ("lanczos", "cupy")]
    assert results[1].solver_ == "cupy" and results[1].converged_
    torch.testing.assert_close(results[1].eigenvalues_, results[0].eigenvalues_, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(results[1].influences(X[:3].cuda(), y[:3].cuda()),
                               results[0].influences(X[:3].cuda(), y[:3].cuda()), rtol=1e-6, atol=1e-8)


def test_float32_models_keep_their_dtype():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    X, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    train(model, X, y, F.cross_entropy, steps=50, weight_decay=1e-3)
    for cls in (ArnoldiInfluence, NystroemInfluence):
        est = cls(model, rank=10, regularization=0.01, random_state=0).fit(X, y)
        assert est._factors["eigenvectors"].dtype == torch.float32 and est.eigenvalues_.dtype == torch.float64
        assert est.influences(X[:2], y[:2]).dtype == torch.float32


@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemInfluence])
def test_regularization_zero_leaves_out_eigenvalues_at_the_rounding_level_of_a_wide_layer(cls):
    # 63 parameters, Gauss-Newton of rank 6 from 3 points: the eigendecomposition leaves the 57 zero
    # eigenvalues at a few eps times the largest (up to 6 here), within the rounding level of 63 values, so
    # they are left out as the pseudo-inverse does; inverting them would multiply the components of other
    # points' gradients along them by about 1 / (eps * largest).
    torch.manual_seed(0)
    layer = torch.nn.Linear(20, 3).double()
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(8, 20, generator=generator, dtype=torch.float64)
    X = X * torch.logspace(0, 1, 20, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotPositiveDefiniteWarning)
        est = cls(layer, regularization=0.0, rank=63, second_order="gauss_newton", random_state=0)
        est.fit(X[:3], y[:3])
    curvature = reference_gauss_newton(layer, X[:3], y[:3], F.cross_entropy)
    pseudo_inverse = torch.linalg.pinv(curvature, rtol=1e-10, hermitian=True)
    G = reference_gradients(layer, X[3:], y[3:], F.cross_entropy)
    torch.testing.assert_close(est.transform(X[3:], y[3:]), G @ pseudo_inverse, rtol=1e-7, atol=1e-9)


def linear_loss(output, target):
    """A loss linear in the output: of a linear model, its Hessian and Gauss-Newton matrix are zero."""
    return (output * target).sum()


@pytest.mark.parametrize("second_order", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("cls", [ArnoldiInfluence, NystroemInfluence])
def test_a_curvature_that_is_zero_gives_the_gradients_over_regularization(cls, second_order):
    # (0 + lambda I)^-1 g = g / lambda; the sketch of a zero curvature is empty (rank_ 0), Lanczos's pairs all
    # zero. At regularization 0 every direction is without curvature: the pseudo-inverse is zero.
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    gradients = torch.cat([(y[:5, :, None] * X[:5, None, :]).reshape(5, -1), y[:5]], dim=1)
    est = cls(model, loss=linear_loss, regularization=0.5, rank=15, second_order=second_order,
              random_state=0).fit(X, y)
    assert est.rank_ == (0 if cls is NystroemInfluence else 15)
    torch.testing.assert_close(est.transform(X[:5], y[:5]), gradients / 0.5, rtol=1e-12, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotPositiveDefiniteWarning)
        est.set_params(regularization=0.0).fit(X, y)
    assert torch.equal(est.transform(X[:5], y[:5]), torch.zeros(5, 15, dtype=torch.float64))


@pytest.mark.parametrize("factor", [1e-8, 1e8])
def test_lanczos_convergence_is_relative_to_the_size_of_the_operator(factor):
    # tol is relative to the largest Ritz value: the same operator scaled by 1e-8 or 1e8 takes the same
    # products, converges to the same relative residuals, and is never reported converged early (absolute
    # residuals of 1e-8 tiny) or never (of 1e8).
    matrix = symmetric_with_spectrum(SPECTRA["decaying"])

    def run(scale):
        return block_lanczos(MatrixOperator(scale * matrix).matmat, 80, 6, krylov_dimension=20, block_size=4,
                             tol=1e-10, max_products=2000, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64, device="cpu")

    reference, scaled = run(1.0), run(factor)
    assert bool(scaled.converged.all()) and scaled.n_products == reference.n_products
    torch.testing.assert_close(scaled.eigenvalues / factor, reference.eigenvalues, rtol=1e-12, atol=0)
    residuals = factor * matrix @ scaled.eigenvectors - scaled.eigenvectors * scaled.eigenvalues
    true = torch.linalg.vector_norm(residuals, dim=0)
    assert float(true.max()) <= 1e-10 * float(scaled.eigenvalues.abs().max())
