"""LiSSA against explicit matrix algebra: the truncated Neumann series, its limit, its noise.

The registry-driven tests check LissaInfluence in its deterministic, converged
configuration; these check what is particular to it: the iterates themselves,
dampening, mini-batches, the automatic scale, divergence and convergence
reports, and the two building blocks (mini-batch products, power iteration).
"""

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import reference_gradients, reference_hessian
from torch import nn

from skinfl import DirectInfluence, LissaInfluence
from skinfl._linalg.minibatch import MinibatchCurvature
from skinfl._linalg.power_iteration import extreme_eigenvalues
from skinfl._solvers.lissa import _STOCHASTIC_SCALE_MARGIN
from skinfl.exceptions import LissaConvergenceWarning

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def least_squares():
    """Least squares on 40 points: C = 2 X^T X / n, gradients 2 (x^T w - y) x, in closed form."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(40, 4)) * np.array([1.0, 0.8, 0.5, 0.3])
    y = X @ rng.normal(size=(4, 1)) + 0.3 * rng.normal(size=(40, 1))
    w = np.linalg.lstsq(X, y, rcond=None)[0]
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(w.T))
    curvature = 2 * X.T @ X / len(X)
    gradients = 2 * (X @ w - y) * X
    return model, X, y, curvature, gradients


def neumann_partial_sum(system, scale, dampen, rhs, n_terms):
    """(1/s) sum_{k=0}^{T} M^k b with M = (1 - d) I - A / s, as explicit matrix powers."""
    M = (1 - dampen) * np.eye(len(system)) - system / scale
    total, power = np.zeros_like(rhs), np.eye(len(system))
    for _ in range(n_terms + 1):
        total += rhs @ power.T
        power = M @ power
    return total / scale


# ------------------------------------------------------------------ the recursion itself
@pytest.mark.parametrize("dampen", [0.0, 0.2])
def test_deterministic_iterates_are_the_truncated_neumann_series(least_squares, dampen):
    model, X, y, curvature, G = least_squares
    regularization, scale = 0.05, 2.5
    system = curvature + regularization * np.eye(4)
    for n_iter in (1, 7, 30):
        est = LissaInfluence(model, minibatch_size=None, loss="mse", regularization=regularization,
                             scale=scale, dampen=dampen, rtol=0.0, max_iter=n_iter).fit(X, y)
        expected = neumann_partial_sum(system, scale, dampen, G[:6], n_iter)
        np.testing.assert_allclose(est.transform(X[:6], y[:6]), expected, rtol=1e-12, atol=1e-14)
        assert est.n_iter_ == n_iter


def test_deterministic_limit_is_the_direct_inverse(classification_problem):
    """Converged to rtol, the error is at most about rtol * scale / a_min (the residual bound)."""
    model, X, y = classification_problem
    direct = DirectInfluence(model, regularization=0.1, solver="eigh").fit(X, y)
    for rtol in (1e-5, 1e-10):
        est = LissaInfluence(model, minibatch_size=None, regularization=0.1, rtol=rtol, max_iter=10_000,
                             check_every=1).fit(X, y)
        exact, approx = direct.transform(X[:8], y[:8]), est.transform(X[:8], y[:8])
        error = ((approx - exact).norm(dim=1) / exact.norm(dim=1)).max()
        smallest = float(direct.eigenvalues_.min()) + 0.1
        assert error <= 2 * rtol * est.scale_ / smallest
        assert error >= 1e-3 * rtol  # it is a truncation, not an exact solve


def test_dampen_is_extra_regularization(least_squares):
    model, X, y, curvature, G = least_squares
    regularization, scale, dampen = 0.01, 3.0, 0.05
    est = LissaInfluence(model, minibatch_size=None, loss="mse", regularization=regularization,
                         scale=scale, dampen=dampen, rtol=1e-13, max_iter=20_000, check_every=1).fit(X, y)
    expected = np.linalg.solve(curvature + (regularization + dampen * scale) * np.eye(4), G[:5].T).T
    np.testing.assert_allclose(est.transform(X[:5], y[:5]), expected, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- mini-batches
def test_stochastic_iterates_are_unbiased(least_squares):
    """Mini-batches drawn independently, with replacement: E[h_T] is the deterministic h_T exactly.

    The mean over 60 seeds is within 5 standard errors of the truncated series, hence within that
    plus the (explicit) truncation error of the exact inverse; single runs scatter far more.
    """
    model, X, y, curvature, G = least_squares
    regularization, scale, n_iter = 0.3, 6.0, 40
    system = curvature + regularization * np.eye(4)
    truncated = neumann_partial_sum(system, scale, 0.0, G[:3], n_iter)
    est = LissaInfluence(model, loss="mse", regularization=regularization, scale=scale, rtol=0.0,
                         max_iter=n_iter, minibatch_size=8)
    runs = np.stack([est.set_params(random_state=seed).fit(X, y).transform(X[:3], y[:3])
                     for seed in range(60)])
    mean, standard_error = runs.mean(axis=0), runs.std(axis=0, ddof=1) / np.sqrt(len(runs))
    assert np.all(np.abs(mean - truncated) <= 5 * standard_error)
    exact = np.linalg.solve(system, G[:3].T).T
    assert np.all(np.abs(mean - exact) <= 5 * standard_error + np.abs(truncated - exact))
    assert np.abs(truncated - exact).max() < 0.05 * np.abs(exact).max()
    scatter = np.mean([np.linalg.norm(run - truncated) for run in runs])
    assert np.linalg.norm(mean - truncated) < 0.3 * scatter


def test_fixed_seed_is_bitwise_reproducible_and_independent_of_chunking(classification_problem):
    model, X, y = classification_problem
    params = dict(regularization=0.1, minibatch_size=8, rtol=0.0, max_iter=20)
    first = LissaInfluence(model, random_state=3, **params).fit(X, y).transform(X[:10], y[:10])
    again = LissaInfluence(model, random_state=3, **params).fit(X, y).transform(X[:10], y[:10])
    other = LissaInfluence(model, random_state=4, **params).fit(X, y).transform(X[:10], y[:10])
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    # Every solve draws the same mini-batches: chunks of 3 rows give the same results.
    chunked = LissaInfluence(model, random_state=3, batch_size=3, **params).fit(X, y)
    chunked = chunked.transform(X[:10], y[:10])
    torch.testing.assert_close(chunked, first, rtol=1e-12, atol=1e-14)


def test_stochastic_influences_do_not_depend_on_the_other_points_of_the_call(classification_problem):
    # With mini-batches the inverse is not a symmetric operator, so it is applied to the test side whatever
    # the sizes: an entry is the same whether 5 or 11 test points (against 8 training points) share the call.
    model, X, y = classification_problem
    est = LissaInfluence(model, regularization=0.1, minibatch_size=8, rtol=0.0, max_iter=30, random_state=0)
    est.fit(X, y)
    few = est.influences(X[:5], y[:5], X[20:28], y[20:28])
    many = est.influences(X[:11], y[:11], X[20:28], y[20:28])
    torch.testing.assert_close(many[:5], few, rtol=1e-12, atol=1e-14)
    # The test side solved: the test points' solves against the training points' gradients.
    train_gradients = reference_gradients(model, X[20:28], y[20:28], F.cross_entropy)
    torch.testing.assert_close(few, est.transform(X[:5], y[:5]) @ train_gradients.T, rtol=1e-10, atol=1e-12)


def test_stochastic_solves_are_the_same_after_save_and_load_without_random_state(classification_problem, tmp_path):
    # The mini-batch seed drawn at fit is saved: a loaded estimator draws the same mini-batches.
    import skinfl

    model, X, y = classification_problem
    est = LissaInfluence(model, regularization=0.1, minibatch_size=8, rtol=0.0, max_iter=20).fit(X, y)
    expected = est.transform(X[:4], y[:4])
    loaded = skinfl.load(skinfl.save(est, tmp_path / "lissa.skinfl"), model)
    assert torch.equal(loaded.transform(X[:4], y[:4]), expected)


def test_defaults_run_max_iter_minibatch_steps_without_warning():
    """minibatch_size=128 and rtol="auto": 0 with mini-batches (max_iter steps, no convergence warning),
    1e-4 without them (a training set of at most 128 samples, or minibatch_size=None)."""
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(300, 4, dtype=torch.float64, generator=generator)
    y = X @ torch.randn(4, 1, dtype=torch.float64, generator=generator)
    model = nn.Linear(4, 1, bias=False).double()
    est = LissaInfluence(model, loss="mse", regularization=0.01, max_iter=40, random_state=0).fit(X, y)
    assert est.get_params()["minibatch_size"] == 128 and est.rtol == "auto"
    assert est._stochastic() and est.rtol_ == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error", LissaConvergenceWarning)
        est.transform(X[:3], y[:3])
    assert est.n_iter_ == 40
    assert LissaInfluence(model, loss="mse", minibatch_size=None).fit(X, y).rtol_ == 1e-4
    assert LissaInfluence(model, loss="mse").fit(X[:128], y[:128]).rtol_ == 1e-4  # every sample, each step
    assert LissaInfluence(model, loss="mse", rtol=1e-3).fit(X, y).rtol_ == 1e-3


def test_minibatch_size_of_all_samples_is_the_deterministic_recursion(classification_problem):
    model, X, y = classification_problem
    params = dict(regularization=0.1, rtol=0.0, max_iter=20, random_state=0)
    full = LissaInfluence(model, minibatch_size=None, **params).fit(X, y).transform(X[:3], y[:3])
    every = LissaInfluence(model, minibatch_size=len(X), **params).fit(X, y)
    assert torch.equal(every.transform(X[:3], y[:3]), full)


def test_minibatch_products_equal_the_explicit_minibatch_curvature(classification_problem):
    model, X, y = classification_problem
    curvature = DirectInfluence(model, regularization=0.1, batch_size=7).fit(X, y)._curvature()
    minibatches = MinibatchCurvature(curvature, 12, torch.Generator().manual_seed(0))
    vectors = torch.randn(5, curvature.n_params, dtype=torch.float64,
                          generator=torch.Generator().manual_seed(1))
    seen = []
    for _ in range(3):
        rows = minibatches.draw()
        assert len(rows) == 12 and np.all(np.diff(rows) >= 0) and 0 <= rows.min() and rows.max() < len(X)
        explicit = reference_hessian(model, X[rows], y[rows], F.cross_entropy)  # repeated rows count twice
        torch.testing.assert_close(minibatches.operator(rows).matmat(vectors), vectors @ explicit,
                                   rtol=1e-10, atol=1e-12)
        seen.append(rows)
    assert not all(np.array_equal(seen[0], rows) for rows in seen[1:])
    # Draws are uniform: every sample turns up about equally often.
    counts = np.bincount(np.concatenate([minibatches.draw() for _ in range(500)]), minlength=len(X))
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()
    # None, or a size of at least n, means the full curvature, deterministically (not n draws with
    # replacement).
    for size in (None, len(X), len(X) + 1):
        full = MinibatchCurvature(curvature, size, torch.Generator().manual_seed(0))
        assert full.draw() is None and not full.stochastic
        torch.testing.assert_close(full.matmat(vectors), curvature.matmat(vectors), rtol=0, atol=0)


def test_minibatch_operators_measure_activations_once(classification_problem, monkeypatch):
    # Each mini-batch operator measuring activations anew ran a forward pass per iteration and let
    # resident memory grow with the iterations.
    import skinfl._curvature as curvature_module

    model, X, y = classification_problem
    calls = []
    measure = curvature_module.saved_floats_per_sample
    monkeypatch.setattr(curvature_module, "saved_floats_per_sample",
                        lambda *args: calls.append(1) or measure(*args))
    est = LissaInfluence(model, regularization=0.1, minibatch_size=8, rtol=0.0, max_iter=30, scale=10.0,
                         random_state=0).fit(X, y)
    est.transform(X[:2], y[:2])
    assert est.n_iter_ == 30 and len(calls) == 1


# ---------------------------------------------------------------------- scale and spectrum
def test_auto_scale_resolves_from_the_extreme_eigenvalues(classification_problem):
    model, X, y = classification_problem
    eigenvalues = torch.linalg.eigvalsh(reference_hessian(model, X, y, F.cross_entropy))
    largest = float(eigenvalues.max())
    est = LissaInfluence(model, minibatch_size=None, regularization=0.05).fit(X, y)
    assert est.scale == "auto"
    assert largest * (1 - 1e-9) <= est.largest_eigenvalue_ <= largest * 1.01
    _, _, smallest = est._spectrum()
    assert float(eigenvalues.min()) - 1e-12 <= smallest <= 0.05 * largest
    # Without mini-batches: the scale that makes the recursion contract fastest, (a_max + a_min) / 2,
    # and for dampen d, that over 2 (1 - d).
    a_max, a_min = est.largest_eigenvalue_ + 0.05, smallest + 0.05
    assert est.scale_ == pytest.approx((a_max + a_min) / 2)
    dampened = LissaInfluence(model, minibatch_size=None, regularization=0.05, dampen=0.2).fit(X, y)
    assert dampened.scale_ == pytest.approx((a_max + a_min) / (2 * 0.8))
    stochastic = LissaInfluence(model, regularization=0.05, minibatch_size=10).fit(X, y)
    assert stochastic.scale_ == pytest.approx(_STOCHASTIC_SCALE_MARGIN * a_max)
    given = LissaInfluence(model, minibatch_size=None, regularization=0.05, scale=7.0).fit(X, y)
    assert given.scale_ == 7.0 and given.largest_eigenvalue_ is None


def test_fit_sets_n_iter_to_the_power_iteration_steps(least_squares, tmp_path):
    """n_iter_ after fit: the power iteration's block products with scale="auto", 0 with a given scale;
    a call that solves replaces it, and a fit from the cache reports the steps of the fit that cached."""
    model, X, y, _, _ = least_squares
    auto = LissaInfluence(model, loss="mse", regularization=0.1, minibatch_size=None,
                          memory=tmp_path).fit(X, y)
    assert auto.n_iter_ in (40, 60)
    steps = auto.n_iter_
    auto.transform(X[:2], y[:2])
    assert auto.n_iter_ != steps
    assert LissaInfluence(model, minibatch_size=None, loss="mse", regularization=0.3,
                          memory=tmp_path).fit(X, y).n_iter_ == steps
    given = LissaInfluence(model, minibatch_size=None, loss="mse", regularization=0.1, scale=3.0).fit(X, y)
    assert given.n_iter_ == 0


def test_auto_scale_is_fast_on_a_well_conditioned_curvature(least_squares):
    """a_min far above lambda: the scale uses it, and the recursion converges in a few dozen steps."""
    model, X, y, curvature, G = least_squares
    est = LissaInfluence(model, minibatch_size=None, loss="mse", regularization=1e-3, rtol=1e-12,
                         max_iter=10_000).fit(X, y)
    a_min, a_max = np.linalg.eigvalsh(curvature)[[0, -1]] + 1e-3
    expected = np.linalg.solve(curvature + 1e-3 * np.eye(4), G[:5].T).T
    np.testing.assert_allclose(est.transform(X[:5], y[:5]), expected, rtol=1e-9, atol=1e-12)
    radius = (a_max - a_min) / (a_max + a_min)
    assert est.n_iter_ <= np.log(1e-12) / np.log(radius) + 2 * est.check_every


def symmetric(eigenvalues, seed=0):
    basis = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(seed))).Q
    return basis @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ basis.T


@pytest.mark.parametrize("spectrum", [
    np.linspace(0.0, 1.0, 50) ** 3 * 5.0,                    # decaying, positive semi-definite
    np.r_[np.linspace(-0.1, 0.0, 10), np.linspace(0.0, 2.0, 40)],  # small negative part
    np.r_[-np.linspace(1.0, 6.0, 10), np.linspace(0.0, 2.0, 40)],  # negative eigenvalues dominate
])
def test_power_iteration_against_eigh(spectrum):
    matrix = symmetric(spectrum)
    values = torch.linalg.eigvalsh(matrix)
    generator = torch.Generator().manual_seed(0)
    estimate = extreme_eigenvalues(lambda rows: rows @ matrix, len(matrix), generator=generator,
                                   dtype=torch.float64, device="cpu")
    largest, smallest = float(values.max()), float(values.min())
    assert estimate.largest_ritz <= largest + 1e-12
    assert largest - 1e-9 <= estimate.largest <= largest + 0.05 * (largest - smallest)
    assert smallest - 1e-12 <= estimate.smallest <= smallest + 0.05 * (largest - smallest)


# -------------------------------------------------------------------- divergence, warnings
def test_too_small_scale_raises_with_the_estimated_eigenvalue(classification_problem):
    model, X, y = classification_problem
    regularization = 0.05
    hessian = reference_hessian(model, X, y, F.cross_entropy)
    largest = float(torch.linalg.eigvalsh(hessian).max()) + regularization
    est = LissaInfluence(model, minibatch_size=None, regularization=regularization, scale=0.3 * largest,
                         max_iter=1000).fit(X, y)
    with pytest.raises(ValueError, match="diverged") as error:
        est.transform(X[:4], y[:4])
    message = str(error.value)
    estimated = float(re.search(r"estimated at ([0-9.e+-]+)", message).group(1))
    assert estimated == pytest.approx(largest, rel=1e-2)
    assert "scale=" in message and est.n_iter_ < 100  # detected early


def untrained_problem():
    """An untrained network: its Hessian has sizeable negative eigenvalues."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    X = torch.randn(40, 3, dtype=torch.float64)
    return model, X, torch.randint(0, 3, (40,))


def test_negative_curvature_is_reported():
    model, X, y = untrained_problem()
    values = torch.linalg.eigvalsh(reference_hessian(model, X, y, F.cross_entropy))
    assert values.min() < -1e-2
    # Seen by the power iteration in fit, when it dominates the spectrum, and otherwise by the growth.
    with pytest.raises(ValueError, match="negative eigenvalue") as error:
        est = LissaInfluence(model, minibatch_size=None, regularization=1e-3,
                             scale=float(values.max()) * 1.1, max_iter=20_000)
        est.fit(X, y).transform(X[:3], y[:3])
    assert "second_order='gauss_newton'" in str(error.value)
    # Lifted by regularization, or with the Gauss-Newton matrix, it converges.
    lifted = LissaInfluence(model, minibatch_size=None, regularization=float(-values.min()) + 0.05,
                            rtol=1e-8, max_iter=20_000)
    lifted.fit(X, y)
    assert torch.isfinite(lifted.transform(X[:3], y[:3])).all()


def test_one_convergence_warning_per_call(classification_problem):
    model, X, y = classification_problem
    est = LissaInfluence(model, minibatch_size=None, regularization=0.01, max_iter=5, batch_size=4).fit(X, y)
    with pytest.warns(LissaConvergenceWarning, match="max_iter=5") as record:
        est.influences(X[:10], y[:10])  # three chunks of right-hand sides
    assert len([w for w in record if issubclass(w.category, LissaConvergenceWarning)]) == 1
    assert est.n_iter_ == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error", LissaConvergenceWarning)
        unchecked = LissaInfluence(model, minibatch_size=None, regularization=0.01, max_iter=5, rtol=0.0)
        unchecked.fit(X, y).influences(X[:10], y[:10])
        converging = LissaInfluence(model, minibatch_size=None, regularization=0.5, max_iter=1000)
        converging.fit(X, y).influences(X[:10], y[:10])


def test_zero_and_tiny_gradients():
    """A zero right-hand side gives zero at no cost; a tiny one is solved as well as a unit one."""
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()  # outputs exactly 0: gradients 2 (0 - y) x, exactly zero for y = 0
    X = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(30, 1, dtype=torch.float64)
    est = LissaInfluence(model, minibatch_size=None, loss="mse", regularization=0.1, rtol=1e-10,
                         max_iter=5000).fit(X, y + 1.0)
    assert torch.equal(est.transform(X[:4], y[:4]), torch.zeros(4, 3, dtype=torch.float64))
    tiny = est.transform(X[:4], y[:4] + 1e-30)
    unit = est.transform(X[:4], y[:4] + 1.0)
    torch.testing.assert_close(tiny, unit * 1e-30, rtol=1e-12, atol=0)


# ----------------------------------------------------------------- the stopping rules, simulated
def simulated_checks(system, scale, rhs, check_every, rtol, max_iter, growth_limit=10.0):
    """When the deterministic recursion stops, from explicit iterates: ``(n_iter, status)`` per row.

    The rules, on the unit right-hand sides: every ``check_every`` steps the mean change per step over
    the window, ``||h_t - h_{t - check_every}|| / check_every``, is compared with ``rtol ||h_t||``
    (converged) and with ``growth_limit`` times its smallest value so far, starting from 1 (diverged).
    Returns also the smallest log-ratio of a compared quantity to its threshold: far above the rounding by
    which torch's iterates differ from these.
    """
    results, margin = [], np.inf
    eps_root = np.sqrt(np.finfo(np.float64).eps)
    for b in rhs / np.linalg.norm(rhs, axis=1, keepdims=True):
        h, start, smallest = b.copy(), b.copy(), 1.0
        for t in range(1, max_iter + 1):
            h = b + h - (system @ h) / scale
            if t % check_every and t < max_iter:
                continue
            change = np.linalg.norm(h - start) / (t - (t - 1) // check_every * check_every)
            size = np.linalg.norm(h)
            reference = max(smallest, eps_root * size)
            margin = min(margin, abs(np.log(change / (growth_limit * reference))),
                         abs(np.log(change / (rtol * size))))
            if change > growth_limit * reference:
                results.append((t, "diverged"))
                break
            if change <= rtol * size:
                results.append((t, "converged"))
                break
            smallest, start = min(smallest, change), h.copy()
        else:
            results.append((max_iter, "max_iter"))
    return results, margin


def test_the_recursion_stops_at_the_first_window_whose_mean_change_meets_rtol(least_squares):
    model, X, y, curvature, G = least_squares
    regularization, scale, check_every, rtol = 0.05, 2.5, 7, 1e-6
    system = curvature + regularization * np.eye(4)
    expected, margin = simulated_checks(system, scale, G[:5], check_every, rtol, max_iter=5000)
    assert margin > 1e-6 and {status for _, status in expected} == {"converged"}
    est = LissaInfluence(model, minibatch_size=None, loss="mse", regularization=regularization, scale=scale,
                         rtol=rtol, check_every=check_every, max_iter=5000).fit(X, y)
    est.transform(X[:5], y[:5])
    assert est.n_iter_ == max(t for t, _ in expected)
    for i in range(5):  # each row alone: its own window
        est.transform(X[i:i + 1], y[i:i + 1])
        assert est.n_iter_ == expected[i][0]


def test_a_diverging_recursion_stops_once_its_change_grows_tenfold_over_its_smallest(least_squares):
    # scale a little below a_max / 2: M has one eigenvalue of about -1.1, along which the recursion grows
    # slowly while the other directions still shrink; it is stopped at the first window whose mean change is
    # 10 times the smallest so far.
    model, X, y, curvature, G = least_squares
    regularization, check_every = 0.05, 5
    system = curvature + regularization * np.eye(4)
    scale = float(np.linalg.eigvalsh(system).max()) / 2.1
    expected, margin = simulated_checks(system, scale, G[:1], check_every, rtol=1e-12, max_iter=1000)
    assert margin > 1e-6 and expected[0][1] == "diverged"
    est = LissaInfluence(model, minibatch_size=None, loss="mse", regularization=regularization, scale=scale,
                         rtol=1e-12, check_every=check_every, max_iter=1000).fit(X, y)
    with pytest.raises(ValueError, match="diverged"):
        est.transform(X[:1], y[:1])
    assert est.n_iter_ == expected[0][0]
    assert est.n_iter_ > 3 * check_every  # not at the first windows: the smallest change is a later one's


@pytest.mark.parametrize("check_every", [2, 3])
def test_a_converged_recursion_at_rounding_level_is_not_taken_for_diverging(least_squares, check_every):
    # rtol=0 runs max_iter steps. Once converged the iterates change by rounding only: a window's change can
    # be a few ulps of a small component, and the next one an ulp of a large one, many times more. That is
    # not growth: changes are compared with at least sqrt(eps) ||h||, not with the smallest rounding seen.
    model, X, y, curvature, G = least_squares
    est = LissaInfluence(model, minibatch_size=None, loss="mse", regularization=0.05, rtol=0.0,
                         check_every=check_every, max_iter=400).fit(X, y)
    expected = np.linalg.solve(curvature + 0.05 * np.eye(4), G.T).T
    np.testing.assert_allclose(est.transform(X, y), expected, rtol=1e-10, atol=1e-14)


def test_dampening_lifts_negative_curvature_and_converges_to_the_dampened_inverse():
    # The untrained network's Hessian has eigenvalues from -0.26 to 0.81: regularization 0.01 leaves it
    # indefinite, and dampen=0.42 lifts it by dampen * scale_ (0.3 with the automatic scale, for which a
    # negative estimate of a_min counts as 0), over which the recursion converges to
    # (H + (lambda + dampen * scale_) I)^-1 g.
    model, X, y = untrained_problem()
    hessian = reference_hessian(model, X, y, F.cross_entropy)
    values = torch.linalg.eigvalsh(hessian)
    est = LissaInfluence(model, minibatch_size=None, regularization=0.01, dampen=0.42, rtol=1e-12,
                         max_iter=20_000).fit(X, y)
    assert float(values.min()) + 0.01 < 0 < float(values.min()) + 0.01 + 0.42 * est.scale_
    lifted = hessian + (0.01 + 0.42 * est.scale_) * torch.eye(len(hessian), dtype=torch.float64)
    G = reference_gradients(model, X[:4], y[:4], F.cross_entropy)
    torch.testing.assert_close(est.transform(X[:4], y[:4]), torch.linalg.solve(lifted, G.T).T, rtol=1e-8,
                               atol=1e-10)
