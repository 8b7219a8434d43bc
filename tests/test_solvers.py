"""Solver specifics: CG's tolerance and warnings, Direct's factorisations, the preconditioners."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import reference_hessian
from test_exact import softmax_gauss_newton

from skinfl import CgInfluence, DirectInfluence
from skinfl._gradients import gradients_of
from skinfl._linalg.cg import (
    BREAKDOWN,
    CONVERGED,
    MAX_ITER,
    NEGATIVE_CURVATURE,
    batched_conjugate_gradient,
)
from skinfl._linalg.nystroem import nystroem_sketch
from skinfl.exceptions import CgConvergenceWarning, NotPositiveDefiniteWarning


@pytest.fixture(scope="module")
def direct(classification_problem):
    model, X, y = classification_problem
    return DirectInfluence(model, regularization=0.01).fit(X, y)


def fitted_gradients(est):
    return gradients_of(est._functional_model(), est._fit_data, est.batch_size, slice(0, est.n_samples_fit_))


def untrained_problem():
    """An untrained network: its Hessian is indefinite."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    X = torch.randn(40, 3, dtype=torch.float64)
    return model, X, torch.randint(0, 3, (40,))


# ---------------------------------------------------------------------- CG
@pytest.mark.parametrize("preconditioner", [None, "jacobi", "nystroem"])
@pytest.mark.parametrize("rtol", [1e-4, 1e-8])
def test_cg_equals_direct_to_its_tolerance(classification_problem, direct, preconditioner, rtol):
    model, X, y = classification_problem
    cg = CgInfluence(model, regularization=0.01, rtol=rtol, preconditioner=preconditioner, random_state=0).fit(X, y)
    exact = direct.transform(X, y)
    approx = cg.transform(X, y)
    gradients = fitted_gradients(direct)
    system = direct._curvature()
    residual = system.matmat(approx) + 0.01 * approx - gradients
    assert (residual.norm(dim=1) <= rtol * gradients.norm(dim=1) * 1.0001 + 1e-15).all()
    # ||x - x*|| / ||x*|| <= cond(A) ||r|| / ||b||: the error bound CG's stopping rule implies.
    eigenvalues = torch.linalg.eigvalsh(system.dense() + 0.01 * torch.eye(direct.n_params_, dtype=torch.float64))
    bound = float(eigenvalues.max() / eigenvalues.min()) * rtol
    relative_error = ((approx - exact).norm(dim=1) / exact.norm(dim=1)).max()
    assert relative_error <= bound
    S_cg, S_direct = cg.influences(X[:5], y[:5]), direct.influences(X[:5], y[:5])
    assert (S_cg - S_direct).abs().max() <= bound * S_direct.abs().max()


def test_cg_warns_when_out_of_iterations(classification_problem):
    model, X, y = classification_problem
    cg = CgInfluence(model, regularization=0.01, rtol=1e-12, max_iter=2, preconditioner=None).fit(X, y)
    with pytest.warns(CgConvergenceWarning, match=r"did not converge for 5 of 5 systems \(stopped after 2 of at most "
                      r"2 iterations.*5 ran out of iterations; to converge: raise max_iter \(now 2\), raise "
                      r"regularization, use preconditioner='nystroem'\.$"):
        cg.transform(X[:5], y[:5])


def test_cg_negative_curvature_advice_is_not_more_iterations():
    """A model away from a minimum has an indefinite Hessian: CG says so, and not to raise max_iter."""
    model, X, y = untrained_problem()
    direct = DirectInfluence(model, regularization=0.0, solver="eigh").fit(X, y)
    assert direct.eigenvalues_.min() < 0  # the precondition of this test
    with pytest.warns(CgConvergenceWarning) as record:
        CgInfluence(model, regularization=0.0, max_iter=1000).fit(X, y).transform(X, y)
    message = str(record[0].message)
    assert "met negative curvature" in message and "gauss_newton" in message
    assert "more iterations cannot help" in message
    assert "ran out of iterations" not in message and "raise max_iter" not in message
    assert "of at most 1000 iterations" in message


def test_zero_and_tiny_gradients_give_zero_and_scaled_solutions(classification_problem, direct):
    """A zero right-hand side has the zero solution; a tiny one is solved as well as any (no NaN)."""
    model, X, y = classification_problem
    cg = CgInfluence(model, regularization=0.01, rtol=1e-10, random_state=0).fit(X, y)
    gradients = fitted_gradients(cg)[:3]
    rows = torch.cat([torch.zeros_like(gradients[:1]), gradients[:1] * 1e-30, gradients[1:]])
    with warnings.catch_warnings():
        warnings.simplefilter("error", CgConvergenceWarning)
        solutions = cg._apply_inverse(rows)
    assert torch.isfinite(solutions).all()
    assert torch.equal(solutions[0], torch.zeros_like(solutions[0]))
    torch.testing.assert_close(solutions[1] * 1e30, direct._apply_inverse(gradients[:1])[0], rtol=1e-8, atol=0)
    torch.testing.assert_close(solutions[2:], direct._apply_inverse(gradients[1:]), rtol=1e-8, atol=1e-12)


def test_cg_reports_why_each_system_stopped():
    """The solver's report separates converged, out of iterations, negative curvature and breakdown."""
    diagonal = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    rhs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0], [float("nan"), 0.0, 0.0],
                        [0.0, 0.0, 0.0]], dtype=torch.float64)
    solution, report = batched_conjugate_gradient(lambda v: v * diagonal, rhs, rtol=1e-12, atol=0.0, max_iter=1)
    assert report.status.tolist() == [CONVERGED, MAX_ITER, NEGATIVE_CURVATURE, BREAKDOWN, CONVERGED]
    torch.testing.assert_close(solution[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.isnan(solution[3]).all()  # a failed system never gives a silent number
    assert torch.equal(solution[4], torch.zeros(3, dtype=torch.float64))
    _, report = batched_conjugate_gradient(lambda v: v * diagonal, rhs[:2], rtol=1e-12, atol=0.0, max_iter=5)
    assert report.converged.all() and report.n_iter == 2


# ------------------------------------------------------------------- Direct
def test_direct_warns_and_falls_back_when_indefinite():
    model, X, y = untrained_problem()
    with pytest.warns(NotPositiveDefiniteWarning, match="negative eigenvalue.*gauss_newton"):
        est = DirectInfluence(model, regularization=0.0).fit(X, y)
    assert est.solver_ == "eigh"
    with pytest.raises(ValueError, match="not positive definite.*solver='eigh'"):
        DirectInfluence(model, regularization=0.0, solver="cholesky").fit(X, y)
    # Gauss-Newton is positive semi-definite: Cholesky works with any positive regularization.
    assert DirectInfluence(model, regularization=1e-3, second_order="gauss_newton").fit(X, y).solver_ == "cholesky"


def test_direct_eigenvalues_are_those_of_the_curvature(classification_problem):
    model, X, y = classification_problem
    est = DirectInfluence(model, regularization=0.5, solver="eigh").fit(X, y)
    expected = torch.linalg.eigvalsh(reference_hessian(model, X, y, F.cross_entropy)).flip(0)
    torch.testing.assert_close(est.eigenvalues_, expected, rtol=1e-9, atol=1e-12)
    assert est.solver_ == "eigh"
    chol = DirectInfluence(model, regularization=0.5).fit(X, y)
    torch.testing.assert_close(chol.transform(X[:3], y[:3]), est.transform(X[:3], y[:3]), rtol=1e-10, atol=1e-12)


def test_direct_refuses_large_models_and_names_the_alternative():
    model = torch.nn.Linear(200, 100)
    with pytest.raises(ValueError, match=r"20,100 x 20,100.*max_params=10,000.*CgInfluence"):
        DirectInfluence(model).fit(np.zeros((2, 200), dtype=np.float32), np.array([0, 1]))


# ----------------------------------------------------------- preconditioners
def test_nystroem_preconditioner_cuts_iterations(classification_problem):
    """A low-rank preconditioner capturing the top of the spectrum leaves CG little to do."""
    model, X, y = classification_problem
    runs = {}
    for preconditioner in (None, "nystroem"):
        cg = CgInfluence(model, regularization=1e-3, rtol=1e-8, preconditioner=preconditioner,
                         preconditioner_rank=30, random_state=0).fit(X, y)
        curvature = cg._curvature()
        _, report = batched_conjugate_gradient(
            lambda v: curvature.matmat(v) + 1e-3 * v, fitted_gradients(cg)[:8], rtol=1e-8, atol=0.0, max_iter=1000,
            preconditioner=cg.preconditioner_,
        )
        runs[preconditioner] = report.n_iter
    assert runs["nystroem"] < runs[None] / 2


def test_nystroem_sketch_is_exact_at_full_rank(classification_problem):
    model, X, y = classification_problem
    gauss_newton = CgInfluence(model, second_order="gauss_newton", preconditioner=None).fit(X, y)
    curvature = gauss_newton._curvature()
    sketch = nystroem_sketch(curvature, gauss_newton.n_params_, torch.Generator().manual_seed(0))
    reconstructed = sketch.eigenvectors @ torch.diag(sketch.eigenvalues) @ sketch.eigenvectors.T
    torch.testing.assert_close(reconstructed, softmax_gauss_newton(model, X), rtol=1e-6, atol=1e-8)
    assert (sketch.eigenvalues[:-1] >= sketch.eigenvalues[1:]).all()


def test_nystroem_sketch_runs_in_the_model_dtype_with_orthonormal_vectors():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.Tanh(), torch.nn.Linear(20, 4))
    X, y = torch.randn(200, 6), torch.randint(0, 4, (200,))
    est = CgInfluence(model, regularization=0.1, second_order="gauss_newton", preconditioner_rank=40,
                      random_state=0).fit(X, y)
    vectors = est.preconditioner_.eigenvectors
    # Directions at float32 rounding level are dropped, the others kept.
    assert vectors.dtype == torch.float32 and vectors.shape[0] == est.n_params_ and 10 <= vectors.shape[1] <= 40
    gram = vectors.T.double() @ vectors.double()
    torch.testing.assert_close(gram, torch.eye(vectors.shape[1], dtype=torch.float64), rtol=0, atol=1e-4)
    # The top of the sketch is the top of the spectrum.
    exact = torch.linalg.eigvalsh(est._curvature().dense(torch.float64)).flip(0)
    torch.testing.assert_close(est.preconditioner_.eigenvalues[:5].double(), exact[:5], rtol=3e-2, atol=0)


def test_jacobi_diagonal_estimates_the_gauss_newton_diagonal(classification_problem):
    """The sampled diagonal is unbiased: its average over seeds approaches the exact diagonal."""
    model, X, y = classification_problem
    exact = torch.diagonal(softmax_gauss_newton(model, X))
    estimates = [
        CgInfluence(model, preconditioner="jacobi", random_state=seed).fit(X, y)._factors["diagonal"]
        for seed in range(10)
    ]
    mean = torch.stack(estimates).mean(dim=0)
    # 10 seeds x ~1,000 draws each: a few percent of (heavy-tailed) noise per coordinate. A wrong
    # distribution or scale would be off by tens of percent everywhere.
    relative = (mean - exact).abs() / exact
    assert relative.median() < 0.06 and relative.max() < 0.35
    assert all((estimate >= 0).all() for estimate in estimates)
    single = (estimates[0] - exact).abs() / exact
    assert single.median() > relative.median()  # the noise averages out: it is noise, not bias


def test_jacobi_diagonal_of_squared_error_with_several_outputs():
    """Squared error averaged over d outputs: diag of (2/d) sum_i J_i^T J_i / n, for a linear model in closed form."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4, bias=False).double()
    X = torch.randn(500, 3, dtype=torch.float64)
    y = torch.randn(500, 4, dtype=torch.float64)
    exact = (2 / 4) * (X**2).mean(dim=0).repeat(4)  # weight[k, j] has curvature (2/d) mean x_j^2
    estimates = torch.stack([
        CgInfluence(model, loss="mse", preconditioner="jacobi", random_state=seed).fit(X, y)._factors["diagonal"]
        for seed in range(8)
    ]).mean(dim=0)
    # 8 seeds x 1,500 draws: about 2.6% relative noise per coordinate; 0.12 is over four standard deviations.
    torch.testing.assert_close(estimates, exact, rtol=0.12, atol=0)


def test_jacobi_needs_a_known_likelihood(classification_problem):
    model, X, y = classification_problem
    with pytest.raises(ValueError, match="preconditioner='jacobi'.*custom loss use preconditioner='nystroem'"):
        CgInfluence(model, loss=F.cross_entropy, preconditioner="jacobi").fit(X, y)


def test_one_warning_per_call_pointing_at_the_caller(classification_problem):
    """Chunked solves of one call give one warning, counted over every chunk, at the user's line."""
    model, X, y = classification_problem
    cg = CgInfluence(model, regularization=0.01, rtol=1e-12, max_iter=2, preconditioner=None, batch_size=7).fit(X, y)
    with pytest.warns(CgConvergenceWarning) as record:
        cg.self_influence(X, y)  # 60 points in 9 chunks of 7
    assert len(record) == 1
    assert "did not converge for 60 of 60 systems" in str(record[0].message)
    assert record[0].filename == __file__


def test_direct_eigendecomposition_is_cached_with_the_curvature(tmp_path, monkeypatch):
    """The indefinite fallback decomposes C (not C + lambda I) once per training set, for every candidate."""
    model, X, y = untrained_problem()
    calls = []
    original = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda matrix: calls.append(1) or original(matrix))
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotPositiveDefiniteWarning)
        for regularization in (0.0, 0.01, 0.02):
            est = DirectInfluence(model, regularization=regularization, memory=str(tmp_path)).fit(X, y)
            assert est.solver_ == "eigh"
            results[regularization] = est.influences(X[:3], y[:3])
        assert len(calls) == 1
        for regularization, cached in results.items():
            fresh = DirectInfluence(model, regularization=regularization).fit(X, y).influences(X[:3], y[:3])
            assert torch.equal(cached, fresh)  # the same decomposition, bit for bit


def test_tiny_gradients_are_solved_like_any_other():
    """A confidently classified point has a gradient of 1e-22 to 1e-29 in float32. CG solves it to its
    tolerance like any other, with no warning: no zero from an underflowing norm, no stop on a
    curvature that rounds to zero, no NaN."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    X, y = torch.randn(200, 4), torch.randint(0, 3, (200,))
    point = torch.randn(1, 4)
    cg = CgInfluence(model, regularization=0.1, rtol=1e-6, random_state=0).fit(X, y)
    direct = DirectInfluence(model, regularization=0.1).fit(X, y)
    for scale in (100, 130, 160):
        x = point * scale
        label = model(x).argmax(dim=1)
        expected = direct.influences(x, label)
        assert 0 < expected.abs().max() < 1e-20  # the precondition: a tiny test gradient
        with warnings.catch_warnings():
            warnings.simplefilter("error", CgConvergenceWarning)
            got = cg.influences(x, label)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_freed_memory_is_handed_back_where_the_allocator_allows():
    import platform

    from skinfl import _memory

    _memory.release_freed_memory()  # never fails
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert _memory._malloc_trim() is not None


def test_jacobi_preconditioner_divides_by_the_regularized_diagonal_floored_where_there_is_no_curvature():
    # preconditioner_.diagonal is diag(C_GN) + lambda (exact for a few classes). At regularization 0 the
    # parameters without curvature (a layer the forward pass skips) would divide by zero: they are floored at
    # sqrt(eps) times the mean, which bounds the preconditioner's condition number.
    from test_ekfac import _WithUnusedLayer

    torch.manual_seed(0)
    model = _WithUnusedLayer().double()
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=generator)
    curvature = DirectInfluence(model, second_order="gauss_newton").fit(X, y)._factors["curvature"]
    exact = torch.diagonal(curvature)
    assert (exact[:15] > 0).all() and (exact[15:] == 0).all()
    regularized = CgInfluence(model, preconditioner="jacobi", regularization=0.1, random_state=0).fit(X, y)
    torch.testing.assert_close(regularized.preconditioner_.diagonal, exact + 0.1, rtol=1e-9, atol=1e-12)
    diagonal = CgInfluence(model, preconditioner="jacobi", regularization=0.0, random_state=0).fit(X, y)
    diagonal = diagonal.preconditioner_.diagonal
    torch.testing.assert_close(diagonal[:15], exact[:15], rtol=1e-9, atol=1e-12)
    floor = float(exact.mean()) * torch.finfo(torch.float64).eps ** 0.5
    torch.testing.assert_close(diagonal[15:], torch.full((15,), floor, dtype=torch.float64), rtol=1e-9,
                               atol=0)


@pytest.mark.parametrize("preconditioner", ["nystroem", "ekfac", None])
def test_cg_on_a_curvature_that_is_zero_gives_the_gradients_over_regularization(preconditioner):
    # A loss linear in the output of a linear model has zero Hessian and Gauss-Newton matrix: the solves are
    # g / lambda exactly, whatever the preconditioner (Nystroem's sketch of it is empty, EK-FAC's factors
    # zero).
    from test_low_rank import linear_loss

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    y = torch.randn(20, 3, generator=generator, dtype=torch.float64)
    gradients = torch.cat([(y[:5, :, None] * X[:5, None, :]).reshape(5, -1), y[:5]], dim=1)
    est = CgInfluence(model, loss=linear_loss, regularization=0.5, preconditioner=preconditioner,
                      random_state=0).fit(X, y)
    torch.testing.assert_close(est.transform(X[:5], y[:5]), gradients / 0.5, rtol=1e-12, atol=0)
