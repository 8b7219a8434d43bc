"""Block conjugate gradient: exact answers on explicit matrices, its statuses, and CgInfluence's solvers."""

import warnings

import pytest
import torch
from conftest import exact_estimator
from sklearn.base import clone

from skinfl import CgInfluence, DirectInfluence
from skinfl._linalg.block_cg import block_conjugate_gradient
from skinfl._linalg.cg import BREAKDOWN, CONVERGED, MAX_ITER, NEGATIVE_CURVATURE, STALLED
from skinfl.exceptions import CgConvergenceWarning

N = 120
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny matrices: threads only add waiting


def spd_matrix(eigenvalues, seed=0):
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=generator,
                                           dtype=torch.float64))
    return basis @ torch.diag(eigenvalues) @ basis.T


SPECTRA = {
    # A few large eigenvalues over a cluster, as curvature near a minimum has.
    "clustered": torch.cat([torch.full((N - 8,), 1e-2), torch.logspace(0, 3, 8)]).double(),
    "spread": torch.logspace(-3, 1, N, dtype=torch.float64),
}


def random_rhs(k, seed=1):
    return torch.randn(k, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Recording:
    """``A v`` for rows ``v``, remembering how many vectors each product took."""

    def __init__(self, matrix):
        self.matrix = matrix
        self.sizes = []

    def __call__(self, vectors):
        self.sizes.append(len(vectors))
        return vectors @ self.matrix


def assert_solved(matrix, rhs, solution, report, rtol):
    """Every system converged, to a true residual within rtol, and the report tells the truth."""
    assert (report.status == CONVERGED).all(), report.status
    norms = rhs.norm(dim=1)
    true = (rhs - solution @ matrix).norm(dim=1) / torch.where(norms > 0, norms, torch.ones_like(norms))
    assert (true <= rtol * (1 + 1e-6)).all()
    # The same residuals up to the rounding of computing them (||A|| ||x|| eps: about rtol / 100 here).
    torch.testing.assert_close(report.relative_residuals, true, rtol=0, atol=1e-2 * rtol)
    exact = torch.linalg.solve(matrix, rhs.T).T
    eigenvalues = torch.linalg.eigvalsh(matrix)
    # ||x - x*|| <= cond(A) ||r|| / ||b|| ||x*||: what the residual test guarantees.
    bound = float(eigenvalues.max() / eigenvalues.min()) * rtol
    assert ((solution - exact).norm(dim=1) <= bound * exact.norm(dim=1) + 1e-300).all()


@pytest.mark.parametrize("spectrum", SPECTRA)
def test_block_cg_solves_spd_systems(spectrum):
    matrix = spd_matrix(SPECTRA[spectrum])
    rhs = random_rhs(10)
    apply = Recording(matrix)
    solution, report = block_conjugate_gradient(apply, rhs, rtol=1e-10, atol=0.0, max_iter=500)
    assert_solved(matrix, rhs, solution, report, 1e-10)
    assert report.n_iter == len(apply.sizes) - 1  # the final check of the true residuals is one product more
    assert max(apply.sizes) <= 10


def test_block_cg_beats_independent_cg_on_a_clustered_spectrum():
    """Ten systems share the few large eigenvalues: a block finds them once for all."""
    from skinfl._linalg.cg import batched_conjugate_gradient

    matrix = spd_matrix(SPECTRA["clustered"])
    rhs = random_rhs(10)
    _, block = block_conjugate_gradient(Recording(matrix), rhs, rtol=1e-10, atol=0.0, max_iter=500)
    _, independent = batched_conjugate_gradient(Recording(matrix), rhs, rtol=1e-10, atol=0.0, max_iter=500)
    # The block Krylov space has 18 dimensions (10 in the cluster, one per large eigenvalue): two blocks of
    # ten in exact arithmetic; one system alone needs nine directions.
    assert block.n_iter <= 3 and independent.n_iter >= 9


def test_dependent_right_hand_sides():
    """Duplicates, combinations, zero and tiny rows: dependent directions are searched once, and every
    system is solved to its own tolerance."""
    matrix = spd_matrix(SPECTRA["spread"])
    base = random_rhs(5)
    rhs = torch.cat([
        base,
        base[:2],  # duplicates
        (base[2] - 3 * base[3])[None],  # a combination
        torch.zeros(1, N, dtype=torch.float64),
        1e-30 * base[4:5],  # tiny: solved like any other, no underflow
    ])
    apply = Recording(matrix)
    solution, report = block_conjugate_gradient(apply, rhs, rtol=1e-10, atol=0.0, max_iter=500)
    assert_solved(matrix, rhs, solution, report, 1e-10)
    # Ten right-hand sides, five directions. (Late blocks may hold one more: once residuals are 1e-10 of
    # the right-hand sides, the combination's own rounding is no longer negligible next to them.)
    assert apply.sizes[0] == 5 and sum(size > 5 for size in apply.sizes[:-1]) <= len(apply.sizes) // 10
    assert torch.equal(solution[8], torch.zeros(N, dtype=torch.float64))
    assert report.relative_residuals[8] == 0
    # The same systems up to rounding (they share every step).
    torch.testing.assert_close(solution[9] * 1e30, solution[4], rtol=1e-10, atol=0)
    torch.testing.assert_close(solution[5:7], solution[:2], rtol=1e-10, atol=0)


def test_converged_systems_leave_the_block():
    """An easy system (an eigenvector) converges at once and the products shrink to the others."""
    eigenvalues = SPECTRA["spread"]
    matrix = spd_matrix(eigenvalues)
    eigenvector = torch.linalg.eigh(matrix).eigenvectors[:, 0]
    rhs = torch.cat([eigenvector[None], random_rhs(4)])
    apply = Recording(matrix)
    solution, report = block_conjugate_gradient(apply, rhs, rtol=1e-10, atol=0.0, max_iter=500)
    assert_solved(matrix, rhs, solution, report, 1e-10)
    assert apply.sizes[0] == 5 and apply.sizes[1] <= 4


def test_atol_and_rtol_per_system():
    matrix = spd_matrix(SPECTRA["spread"])
    rhs = random_rhs(4) * torch.tensor([1.0, 1e-3, 1e3, 1.0], dtype=torch.float64)[:, None]
    solution, report = block_conjugate_gradient(Recording(matrix), rhs, rtol=1e-8, atol=1e-6, max_iter=500)
    assert (report.status == CONVERGED).all()
    residuals = (rhs - solution @ matrix).norm(dim=1)
    assert (residuals <= torch.clamp(1e-8 * rhs.norm(dim=1), min=1e-6) * (1 + 1e-6)).all()
    # atol = 1e-6 is looser than rtol for the small system: it stops earlier than rtol alone would have it.
    assert residuals[1] > 1e-8 * rhs[1].norm()


class Jacobi:
    def __init__(self, matrix):
        self.diagonal = torch.diagonal(matrix)

    def apply(self, rows):
        return rows / self.diagonal


def test_preconditioned_block_cg():
    """A badly scaled matrix: the diagonal preconditioner cuts the iterations, and the answer is the same."""
    scales = torch.logspace(0, 3, N, dtype=torch.float64)
    matrix = scales[:, None] * spd_matrix(torch.linspace(1, 10, N, dtype=torch.float64)) * scales[None, :]
    rhs = random_rhs(6)
    _, plain = block_conjugate_gradient(Recording(matrix), rhs, rtol=1e-10, atol=0.0, max_iter=300)
    solution, preconditioned = block_conjugate_gradient(Recording(matrix), rhs, rtol=1e-10, atol=0.0,
                                                        max_iter=300, preconditioner=Jacobi(matrix))
    assert_solved(matrix, rhs, solution, preconditioned, 1e-10)
    assert preconditioned.n_iter < plain.n_iter / 3


def test_negative_curvature_stops_every_running_system():
    eigenvalues = SPECTRA["spread"].clone()
    eigenvalues[:3] = -eigenvalues[:3]
    matrix = spd_matrix(eigenvalues)
    rhs = torch.cat([random_rhs(4), torch.zeros(1, N, dtype=torch.float64)])
    solution, report = block_conjugate_gradient(Recording(matrix), rhs, rtol=1e-10, atol=0.0, max_iter=500)
    assert report.status.tolist() == [NEGATIVE_CURVATURE] * 4 + [CONVERGED]
    assert torch.isfinite(solution).all()  # the iterate reached, as independent CG gives


def test_max_iter_reports_true_residuals():
    matrix = spd_matrix(SPECTRA["spread"])
    rhs = random_rhs(6)
    solution, report = block_conjugate_gradient(Recording(matrix), rhs, rtol=1e-12, atol=0.0, max_iter=2)
    assert report.n_iter == 2 and (report.status == MAX_ITER).all()
    true = (rhs - solution @ matrix).norm(dim=1) / rhs.norm(dim=1)
    torch.testing.assert_close(report.relative_residuals, true, rtol=1e-10, atol=0)
    assert (true > 1e-12).all()


def test_a_system_at_the_accuracy_of_its_dtype_is_stalled_not_out_of_iterations():
    # float32 cannot reach a relative residual of 1e-9 on a matrix of condition 1e4: block CG stops improving
    # well before max_iter, and says so (not MAX_ITER, whose advice, more iterations, cannot help).
    matrix = spd_matrix(SPECTRA["spread"]).float()
    rhs = random_rhs(6).float()
    solution, report = block_conjugate_gradient(Recording(matrix), rhs, rtol=1e-9, atol=0.0, max_iter=1000)
    assert (report.status == STALLED).all(), report.status
    assert report.n_iter < 1000
    # The true residuals (computed again, they vary by their own float32 rounding), as far as float32 goes.
    true = ((rhs.double() - solution.double() @ matrix.double()).norm(dim=1) / rhs.double().norm(dim=1)).float()
    assert (report.relative_residuals < 3 * true).all() and (true < 3 * report.relative_residuals).all()
    condition = float(SPECTRA["spread"].max() / SPECTRA["spread"].min())
    assert (true > 1e-9).all() and (true < torch.finfo(torch.float32).eps * condition).all()


def test_cg_warning_tells_a_stall_from_running_out_of_iterations():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    settings = dict(regularization=1e-3, second_order="gauss_newton", rtol=1e-9, random_state=0)
    est = CgInfluence(model, **settings).fit(X, y)
    with pytest.warns(CgConvergenceWarning) as caught:
        est.transform(X[:20], y[:20])
    message = str(caught[0].message)
    assert "stalled with iterations left" in message and "float64" in message and "rtol >=" in message
    assert "ran out of iterations" not in message and "raise max_iter" not in message
    # Out of iterations is still said as such, with its own advice.
    short = CgInfluence(model, max_iter=2, **settings).fit(X, y)
    with pytest.warns(CgConvergenceWarning, match="ran out of iterations.*raise max_iter"):
        short.transform(X[:20], y[:20])


def test_non_finite_values_break_down_with_nan_solutions():
    matrix = spd_matrix(SPECTRA["clustered"])
    rhs = random_rhs(3)
    rhs[1, 5] = float("nan")
    solution, report = block_conjugate_gradient(Recording(matrix), rhs, rtol=1e-10, atol=0.0, max_iter=500)
    # A non-finite right-hand side breaks down alone: it never enters the shared block.
    assert report.status.tolist() == [CONVERGED, BREAKDOWN, CONVERGED]
    assert torch.isnan(solution[1]).all() and torch.isfinite(solution[[0, 2]]).all()

    broken = matrix.clone()
    broken[0, 0] = float("inf")
    solution, report = block_conjugate_gradient(Recording(broken), random_rhs(3), rtol=1e-10, atol=0.0,
                                                max_iter=500)
    assert (report.status == BREAKDOWN).all() and torch.isnan(solution).all()


def test_a_drifting_recurrence_is_caught_by_the_true_residual():
    """Products that are a little wrong make the recurrence residual lie; the true residual is checked
    at the end and the systems restart from it, so what is reported converged is converged."""
    matrix = spd_matrix(SPECTRA["clustered"])
    calls = []

    def perturbed(vectors):  # the first products are off by 1e-4
        calls.append(len(vectors))
        exact = vectors @ matrix
        return exact * (1 + 1e-4) if len(calls) <= 2 else exact

    rhs = random_rhs(4)
    solution, report = block_conjugate_gradient(perturbed, rhs, rtol=1e-10, atol=0.0, max_iter=500)
    assert_solved(matrix, rhs, solution, report, 1e-10)
    assert len(calls) >= 5  # two iterations, a failed check, a restart, a passing check


# ------------------------------------------------------------- CgInfluence
@pytest.mark.parametrize("second_order", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("solver", ["block", "independent"])
def test_solvers_equal_direct(classification_problem, solver, second_order):
    model, X, y = classification_problem
    direct = DirectInfluence(model, regularization=0.01, second_order=second_order).fit(X, y)
    cg = exact_estimator(CgInfluence, model, regularization=0.01, second_order=second_order, solver=solver,
                         random_state=0).fit(X, y)
    assert cg.solver_ == solver
    torch.testing.assert_close(cg.transform(X, y), direct.transform(X, y), rtol=1e-8, atol=1e-10)
    assert cg.relative_residuals_.shape == (len(X),) and (cg.relative_residuals_ <= 1e-12).all()


@pytest.mark.parametrize("preconditioner", [None, "jacobi", "nystroem"])
def test_block_solver_with_each_preconditioner(classification_problem, preconditioner):
    model, X, y = classification_problem
    direct = DirectInfluence(model, regularization=0.01).fit(X, y)
    cg = CgInfluence(model, regularization=0.01, rtol=1e-10, preconditioner=preconditioner, solver="block",
                     preconditioner_rank=20, random_state=0).fit(X, y)
    torch.testing.assert_close(cg.transform(X, y), direct.transform(X, y), rtol=1e-6, atol=1e-8)


def test_auto_solver_and_solve_attributes(classification_problem):
    model, X, y = classification_problem
    est = CgInfluence(model, regularization=0.01, random_state=0)
    assert est.get_params()["solver"] == "auto"
    est.fit(X, y)
    assert est.solver_ == "block" and est.solver == "auto"
    assert est.n_iter_ == 0  # fit solves nothing
    with pytest.raises(AttributeError, match="none has run since fit"):
        est.relative_residuals_
    state = dict(est.__dict__)
    est.transform(X[:7], y[:7])
    assert est.__dict__ == state  # scikit-learn's rule: transform does not change the estimator's dict
    assert est.relative_residuals_.shape == (7,) and est.relative_residuals_.dtype == torch.float64
    assert (est.relative_residuals_ <= est.rtol).all() and est.n_iter_ >= 1
    est.self_influence(X[:1], y[:1])  # one system: a new call, new values
    assert est.relative_residuals_.shape == (1,)
    clone(est)  # the holder is not a parameter


def test_solve_attributes_count_every_chunk_of_a_call(classification_problem):
    model, X, y = classification_problem
    est = CgInfluence(model, regularization=0.01, batch_size=7, rtol=1e-12, max_iter=2, preconditioner=None).fit(X, y)
    with pytest.warns(CgConvergenceWarning, match="60 of 60 systems"):
        est.self_influence(X, y)
    assert est.relative_residuals_.shape == (60,) and est.n_iter_ == 2


def test_nystroem_preconditioner_sketches_the_gauss_newton_matrix(classification_problem):
    """With second_order='hessian' the sketch is of the (positive semi-definite) Gauss-Newton matrix."""
    model, X, y = classification_problem
    hessian = CgInfluence(model, preconditioner_rank=10, random_state=0).fit(X, y)
    gauss_newton = CgInfluence(model, preconditioner_rank=10, second_order="gauss_newton", random_state=0).fit(X, y)
    torch.testing.assert_close(hessian.preconditioner_.eigenvalues, gauss_newton.preconditioner_.eigenvalues,
                               rtol=1e-10, atol=1e-14)


def test_block_and_independent_warn_alike_on_negative_curvature():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    X, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 3, (40,))
    for solver in ("block", "independent"):
        with pytest.warns(CgConvergenceWarning, match="met negative curvature"):
            est = CgInfluence(model, regularization=0.0, solver=solver, preconditioner=None)
            est.fit(X, y).transform(X, y)


def test_one_right_hand_side_runs_plain_cg(classification_problem, monkeypatch):
    model, X, y = classification_problem
    est = CgInfluence(model, regularization=0.01, random_state=0).fit(X, y)

    def refuse(*args, **kwargs):
        raise AssertionError("block CG on one system")

    monkeypatch.setitem(__import__("skinfl._solvers.cg", fromlist=["_SOLVERS"])._SOLVERS, "block", refuse)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CgConvergenceWarning)
        est.transform(X[:1], y[:1])


# ------------------------------------------------------------- edge cases of both solvers
def cg_solver(name):
    from skinfl._linalg.cg import batched_conjugate_gradient

    return block_conjugate_gradient if name == "block" else batched_conjugate_gradient


@pytest.mark.parametrize("solver", ["block", "independent"])
def test_a_direction_of_exactly_zero_curvature_is_negative_curvature(solver):
    # A positive semi-definite matrix with a null space, and a right-hand side in it: the first direction has
    # p^T A p = 0 exactly, where no CG step exists; the system stops there, with the finite iterate x = 0.
    matrix = torch.diag(torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64))
    rhs = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    solution, report = cg_solver(solver)(Recording(matrix), rhs, rtol=1e-10, atol=0.0, max_iter=10)
    assert report.status.tolist() == [NEGATIVE_CURVATURE]
    assert torch.equal(solution, torch.zeros(1, 4, dtype=torch.float64))


def test_an_exact_step_converges_at_zero_tolerance():
    # For A = 2 I the first CG step is exact in floating point (residual exactly 0), which meets
    # rtol = atol = 0; the next direction would be zero, with no curvature to step along.
    from skinfl._linalg.cg import batched_conjugate_gradient

    matrix = 2 * torch.eye(5, dtype=torch.float64)
    rhs = random_rhs(3)[:, :5]
    solution, report = batched_conjugate_gradient(Recording(matrix), rhs, rtol=0.0, atol=0.0, max_iter=10)
    assert report.status.tolist() == [CONVERGED] * 3 and report.n_iter == 1
    assert torch.equal(report.relative_residuals, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(solution, rhs / 2, rtol=1e-15, atol=0)


@pytest.mark.parametrize("solver", ["block", "independent"])
def test_a_tolerance_the_zero_solution_meets_runs_no_iteration(solver):
    # ||b - A 0|| = ||b|| <= rtol ||b|| for rtol = 1: x = 0 is a solution to that tolerance, returned
    # without a product.
    matrix = spd_matrix(SPECTRA["spread"])
    rhs = random_rhs(3)
    apply = Recording(matrix)
    solution, report = cg_solver(solver)(apply, rhs, rtol=1.0, atol=0.0, max_iter=10)
    assert report.status.tolist() == [CONVERGED] * 3 and report.n_iter == 0 and apply.sizes == []
    assert torch.equal(solution, torch.zeros_like(rhs))
    assert torch.equal(report.relative_residuals, torch.ones(3, dtype=torch.float64))
