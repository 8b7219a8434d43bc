"""Solver equivalence and invariances: every estimator gives the same answers."""

import copy

import numpy as np
import pytest
import torch

from skinfl import CgInfluence, DirectInfluence
from skinfl.exceptions import CgConvergenceWarning, NotPositiveDefiniteWarning


@pytest.fixture(scope="module")
def direct(classification_problem):
    model, X, y = classification_problem
    return DirectInfluence(model, regularization=0.01).fit(X, y)


@pytest.mark.parametrize("preconditioner", [None, "jacobi", "nystroem"])
@pytest.mark.parametrize("rtol", [1e-4, 1e-8])
def test_cg_equals_direct_to_its_tolerance(classification_problem, direct, preconditioner, rtol):
    model, X, y = classification_problem
    cg = CgInfluence(model, regularization=0.01, rtol=rtol, preconditioner=preconditioner, random_state=0).fit(X, y)
    exact = direct.transform(X, y)
    approx = cg.transform(X, y)
    gradients = direct._gradients(direct._fit_X, direct._fit_y)
    system = direct._curvature_over(direct._fit_X, direct._fit_y)
    residual = system.matmat(approx) + 0.01 * approx - gradients
    assert (residual.norm(dim=1) <= rtol * gradients.norm(dim=1) * 1.0001 + 1e-15).all()
    # ||x - x*|| / ||x*|| <= cond(A) ||r|| / ||b||: the error bound CG's stopping rule implies.
    eigenvalues = torch.linalg.eigvalsh(system.dense() + 0.01 * torch.eye(direct.n_params_, dtype=torch.float64))
    bound = float(eigenvalues.max() / eigenvalues.min()) * rtol
    relative_error = ((approx - exact).norm(dim=1) / exact.norm(dim=1)).max()
    assert relative_error <= bound
    S_cg, S_direct = cg.influences(X[:5], y[:5]), direct.influences(X[:5], y[:5])
    assert (S_cg - S_direct).abs().max() <= bound * S_direct.abs().max()


def test_cg_perturbation_equals_direct(classification_problem, direct):
    model, X, y = classification_problem
    cg = CgInfluence(model, regularization=0.01, rtol=1e-10).fit(X, y)
    torch.testing.assert_close(
        cg.influences(X[:3], y[:3], mode="perturbation"),
        direct.influences(X[:3], y[:3], mode="perturbation"),
        rtol=1e-6,
        atol=1e-9,
    )


@pytest.mark.parametrize("make", [DirectInfluence, lambda m, **kw: CgInfluence(m, rtol=1e-10, **kw)], ids=["direct", "cg"])
@pytest.mark.parametrize("second_order", ["hessian", "gauss_newton"])
def test_results_do_not_depend_on_batch_size(classification_problem, make, second_order):
    model, X, y = classification_problem
    results = [
        make(model, regularization=0.01, batch_size=batch_size, second_order=second_order)
        .fit(X, y)
        .influences(X[:4], y[:4])
        for batch_size in (5, 17, 60, 1000)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-7, atol=1e-10)


def test_results_do_not_depend_on_sample_order(classification_problem, direct):
    model, X, y = classification_problem
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(3))
    shuffled = DirectInfluence(model, regularization=0.01).fit(X[order], y[order])
    torch.testing.assert_close(shuffled.influences(X[:4], y[:4]), direct.influences(X[:4], y[:4])[:, order])


def test_influences_use_smaller_side_consistently(classification_problem, direct):
    """More test points than training points takes the other branch; the result is the same."""
    model, X, y = classification_problem
    many = direct.influences(X, y, X[:5], y[:5])
    few = direct.influences(X[:5], y[:5], X, y)
    torch.testing.assert_close(many, few.T)


def test_cg_warns_when_not_converged(classification_problem):
    model, X, y = classification_problem
    cg = CgInfluence(model, regularization=1e-6, rtol=1e-12, max_iter=2).fit(X, y)
    with pytest.warns(CgConvergenceWarning, match=r"did not converge for 5 of 5 systems after 2 iterations.*max_iter"):
        cg.transform(X[:5], y[:5])


def test_cg_reports_negative_curvature():
    """A model away from a minimum has an indefinite Hessian: CG says so and what to do."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    X = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    direct = DirectInfluence(model, regularization=0.0, solver="eigh").fit(X, y)
    assert direct.eigenvalues_.min() < 0  # an untrained network: the precondition of this test
    with pytest.warns(CgConvergenceWarning, match="negative curvature.*gauss_newton"):
        CgInfluence(model, regularization=0.0).fit(X, y).transform(X, y)


def test_direct_warns_and_falls_back_when_indefinite():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    X = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    with pytest.warns(NotPositiveDefiniteWarning, match="non-positive eigenvalue.*gauss_newton"):
        est = DirectInfluence(model, regularization=0.0).fit(X, y)
    assert est.solver_ == "eigh"
    with pytest.raises(ValueError, match="not positive definite.*solver='eigh'"):
        DirectInfluence(model, regularization=0.0, solver="cholesky").fit(X, y)
    # Gauss-Newton is positive semi-definite: Cholesky works with any positive regularization.
    assert DirectInfluence(model, regularization=1e-3, second_order="gauss_newton").fit(X, y).solver_ == "cholesky"


def test_direct_eigenvalues_are_those_of_the_curvature(classification_problem):
    model, X, y = classification_problem
    est = DirectInfluence(model, regularization=0.5, solver="eigh").fit(X, y)
    matrix = est._curvature_over(est._fit_X, est._fit_y).dense()
    expected = torch.linalg.eigvalsh(matrix.double()).flip(0)
    torch.testing.assert_close(est.eigenvalues_, expected)
    assert est.solver_ == "eigh"
    chol = DirectInfluence(model, regularization=0.5).fit(X, y)
    torch.testing.assert_close(chol.transform(X[:3], y[:3]), est.transform(X[:3], y[:3]))


def test_direct_refuses_large_models_and_names_the_alternative():
    model = torch.nn.Linear(200, 100)
    with pytest.raises(ValueError, match=r"20,100 x 20,100.*max_params=10,000.*CgInfluence"):
        DirectInfluence(model).fit(np.zeros((2, 200), dtype=np.float32), np.array([0, 1]))


def test_nystroem_preconditioner_cuts_iterations(classification_problem):
    """A low-rank preconditioner capturing the top of the spectrum leaves CG little to do."""
    from skinfl._solvers.cg import batched_conjugate_gradient

    model, X, y = classification_problem
    runs = {}
    for preconditioner in (None, "nystroem"):
        cg = CgInfluence(model, regularization=1e-3, rtol=1e-8, preconditioner=preconditioner,
                         preconditioner_rank=30, random_state=0).fit(X, y)
        curvature = cg._curvature_over(cg._fit_X, cg._fit_y)
        gradients = cg._gradients(X[:8], y[:8])
        _, report = batched_conjugate_gradient(
            lambda v: curvature.matmat(v) + 1e-3 * v, gradients, rtol=1e-8, atol=0.0, max_iter=1000,
            preconditioner=cg.preconditioner_,
        )
        runs[preconditioner] = report.n_iter
    assert runs["nystroem"] < runs[None] / 2


def test_nystroem_sketch_is_exact_at_full_rank(classification_problem, direct):
    from skinfl._sketch import nystroem_sketch

    model, X, y = classification_problem
    gauss_newton = CgInfluence(model, second_order="gauss_newton").fit(X, y)
    gn_curvature = gauss_newton._curvature_over(gauss_newton._fit_X, gauss_newton._fit_y)
    sketch = nystroem_sketch(gn_curvature, direct.n_params_, torch.Generator().manual_seed(0))
    reconstructed = sketch.eigenvectors @ torch.diag(sketch.eigenvalues) @ sketch.eigenvectors.T
    torch.testing.assert_close(reconstructed, gn_curvature.dense(), rtol=1e-6, atol=1e-8)


class CountingDense:
    """Counts CurvatureOperator.dense calls (the expensive part of DirectInfluence.fit)."""

    def __init__(self, monkeypatch):
        from skinfl._curvature import CurvatureOperator

        self.calls = 0
        original = CurvatureOperator.dense

        def counted(operator):
            self.calls += 1
            return original(operator)

        monkeypatch.setattr(CurvatureOperator, "dense", counted)


def test_direct_memory_builds_the_curvature_once_across_regularizations(classification_problem, tmp_path, monkeypatch):
    from sklearn.model_selection import GridSearchCV

    model, X, y = classification_problem
    expected = {r: DirectInfluence(model, regularization=r).fit(X, y).influences(X[:5], y[:5]) for r in (0.1, 1.0)}
    dense = CountingDense(monkeypatch)
    cached = [DirectInfluence(model, regularization=r, memory=str(tmp_path)).fit(X, y) for r in (0.1, 1.0, 0.1)]
    assert dense.calls == 1
    for estimator in cached:
        torch.testing.assert_close(
            estimator.influences(X[:5], y[:5]), expected[estimator.regularization], rtol=1e-12, atol=0
        )
    eigh = DirectInfluence(model, regularization=0.1, solver="eigh", memory=str(tmp_path)).fit(X, y)
    torch.testing.assert_close(eigh.influences(X[:5], y[:5]), expected[0.1], rtol=1e-9, atol=0)
    assert dense.calls == 1  # the solver is not part of the key either

    # What the matrix depends on is: other data, curvature or weights build it anew.
    DirectInfluence(model, regularization=0.1, memory=str(tmp_path)).fit(X[:50], y[:50])
    DirectInfluence(model, regularization=0.1, second_order="gauss_newton", memory=str(tmp_path)).fit(X, y)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].bias.add_(0.01)
    DirectInfluence(changed, regularization=0.1, memory=str(tmp_path)).fit(X, y)
    assert dense.calls == 4

    search = GridSearchCV(
        DirectInfluence(model, memory=str(tmp_path)), {"regularization": [0.03, 0.3, 3.0]}, cv=3
    ).fit(X.numpy(), y.numpy())
    # One matrix per fold for three candidates; the refit on all data finds the one built above.
    assert dense.calls == 4 + 3
    search.fit(X.numpy(), y.numpy())
    assert dense.calls == 7  # a second search reads every matrix back
