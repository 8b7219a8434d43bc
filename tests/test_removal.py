"""removal_effects (first order and one Newton step, points and groups) and normalized influences.

References are independent of skinfl's code paths: exact refits of least
squares in closed form, and explicit float64 matrices ``(n A - C_G)^-1``
built from per-sample Jacobians and output Hessians.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import exact_cases, exact_estimator, mlp, train
from registry import check_of, exact_inverse, reference_gauss_newton_terms, reference_gradients
from torch import nn

from skinfl import CgInfluence, DirectInfluence, EkfacInfluence, NystroemInfluence
from skinfl.exceptions import NotPositiveDefiniteWarning


# ------------------------------------------------------------------ least squares, exact refits
@pytest.fixture(scope="module")
def ridge():
    """Least squares with an intercept at its exact ridge minimum, ``sum_i (z_i^T theta - y_i)^2 + n lam/2 |theta|^2``."""
    rng = np.random.default_rng(3)
    n, d, lam = 40, 3, 0.1
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=(d, 1)) + 0.3 * rng.normal(size=(n, 1))
    Z = np.hstack([X, np.ones((n, 1))])

    def refit(rows):
        return np.linalg.solve(2 * Z[rows].T @ Z[rows] + n * lam * np.eye(d + 1), 2 * Z[rows].T @ y[rows])

    theta = refit(np.arange(n))
    model = nn.Linear(d, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(theta[:d].T))
        model.bias.copy_(torch.from_numpy(theta[d]))
    X_test = rng.normal(size=(5, d))
    y_test = X_test @ rng.normal(size=(d, 1))
    Z_test = np.hstack([X_test, np.ones((5, 1))])
    test_gradients = 2 * Z_test * (Z_test @ theta - y_test)

    def change(rows_kept, exact=False):
        """The test losses' change at the exact refit: to first order in the test loss, or exactly."""
        refitted = refit(rows_kept)
        if exact:
            return ((Z_test @ refitted - y_test) ** 2 - (Z_test @ theta - y_test) ** 2)[:, 0]
        return test_gradients @ (refitted - theta)[:, 0]

    return model, X, y, X_test, y_test, lam, change


def test_newton_removal_of_each_point_is_the_exact_refit_for_least_squares(ridge):
    """One Newton step on a quadratic objective is its minimum: equal to refitting without the point."""
    model, X, y, X_test, y_test, lam, change = ridge
    n = len(X)
    est = DirectInfluence(model, loss="mse", regularization=lam, batch_size=7).fit(X, y)
    exact = np.stack([change(np.delete(np.arange(n), j)) for j in range(n)], axis=1)

    newton = est.removal_effects(X_test, y_test, order="newton")
    first = est.removal_effects(X_test, y_test)

    np.testing.assert_allclose(newton, exact, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(first, est.influences(X_test, y_test) / n, rtol=1e-12)
    # First order is off by the leverage: what the Newton step corrects.
    assert np.abs(first - exact).max() > 1e-3 * np.abs(exact).max()
    np.testing.assert_allclose(est.removal_effects(X_test, y_test, order="newton", solver="cg"), exact,
                               rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("solver", ["woodbury", "cg", "auto"])
def test_newton_removal_of_groups_is_the_exact_refit_for_least_squares(ridge, solver):
    model, X, y, X_test, y_test, lam, change = ridge
    n = len(X)
    groups = np.random.default_rng(0).choice(["b", "a", "d", "c"], size=n)
    est = DirectInfluence(model, loss="mse", regularization=lam, batch_size=6).fit(X, y)
    labels = np.unique(groups)
    exact = np.stack([change(np.flatnonzero(groups != label)) for label in labels], axis=1)

    effects = est.removal_effects(X_test, y_test, groups=groups, order="newton", solver=solver)

    np.testing.assert_allclose(effects, exact, rtol=1e-8, atol=1e-11)
    first = est.removal_effects(X_test, y_test, groups=groups)
    points = est.removal_effects(X_test, y_test)
    np.testing.assert_allclose(first, np.stack([points[:, groups == label].sum(axis=1) for label in labels], 1),
                               rtol=1e-12, atol=1e-15)
    # A fifth of the data: first order misses a visible part of the effect.
    assert np.abs(first - exact).max() > 0.02 * np.abs(exact).max()


@pytest.mark.parametrize("solver", ["woodbury", "cg"])
def test_exact_test_loss_after_the_newton_step_is_the_refit_loss_for_least_squares(ridge, solver):
    """test_loss='exact' evaluates each test loss at the stepped parameters: for least squares, the test loss of
    the exact refit, points and groups; the linear change differs by the test loss's curvature."""
    model, X, y, X_test, y_test, lam, change = ridge
    n = len(X)
    est = DirectInfluence(model, loss="mse", regularization=lam, batch_size=7).fit(X, y)
    groups = np.arange(n) % 3
    exact_points = np.stack([change(np.delete(np.arange(n), j), exact=True) for j in range(n)], axis=1)
    exact_groups = np.stack([change(np.flatnonzero(groups != g), exact=True) for g in range(3)], axis=1)

    points = est.removal_effects(X_test, y_test, order="newton", solver=solver, test_loss="exact")
    by_group = est.removal_effects(X_test, y_test, groups=groups, order="newton", solver=solver, test_loss="exact")

    np.testing.assert_allclose(points, exact_points, rtol=1e-7, atol=1e-11)
    np.testing.assert_allclose(by_group, exact_groups, rtol=1e-7, atol=1e-11)
    linear = est.removal_effects(X_test, y_test, groups=groups, order="newton")
    assert np.abs(linear - exact_groups).max() > 1e-3 * np.abs(exact_groups).max()


def test_removal_of_groups_keeps_unpenalized_parameters_out_of_the_penalty():
    """regularization='auto' on a scikit-learn Ridge leaves the intercept unpenalized, in Woodbury and CG alike:
    the exact refit of the objective without the group, intercept free."""
    pytest.importorskip("sklearn")
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(5)
    n, d, alpha = 30, 3, 2.0
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 1.0 + 0.2 * rng.normal(size=n)
    ridge = Ridge(alpha=alpha).fit(X, y)
    est = DirectInfluence(ridge, regularization="auto").fit(X, y)
    assert est.unpenalized_parameters_
    Z = np.hstack([X, np.ones((n, 1))])
    penalty = np.diag([1.0] * d + [0.0])
    theta = np.append(ridge.coef_, ridge.intercept_)
    # The objective skinfl fits, in sum form: its curvature is n (C + R) with R the fitted terms.
    hessian_sum = est.n_samples_fit_ * (est.regularization_ * penalty)

    def refit(rows):
        scale = 2.0  # per-sample (z theta - y)^2
        return np.linalg.solve(scale * Z[rows].T @ Z[rows] + hessian_sum, scale * Z[rows].T @ y[rows])

    np.testing.assert_allclose(refit(np.arange(n)), theta, rtol=1e-8)  # the same objective as the model
    X_test, y_test = X[:4] + 0.3, y[:4]
    Zt = np.hstack([X_test, np.ones((4, 1))])
    test_gradients = 2 * Zt * (Zt @ theta - y_test)[:, None]
    groups = np.arange(n) % 3
    exact = np.stack([test_gradients @ (refit(np.flatnonzero(groups != g)) - theta) for g in range(3)], axis=1)
    for solver in ("woodbury", "cg"):
        np.testing.assert_allclose(est.removal_effects(X_test, y_test, groups=groups, order="newton", solver=solver),
                                   exact, rtol=1e-7, atol=1e-10)


# ------------------------------------------------------------------ explicit references on networks
def newton_reference(inverse, terms, train_gradients, test_gradients, groups):
    """``g_test^T (n A - C_G)^-1 g_G`` for each group, with ``A = inverse^-1`` explicit."""
    n = len(train_gradients)
    curvature_sum = n * torch.linalg.inv(inverse)
    columns = []
    for group in groups:
        removed = terms[group].sum(dim=0)
        columns.append(test_gradients @ torch.linalg.solve(curvature_sum - removed, train_gradients[group].sum(0)))
    return torch.stack(columns, dim=1)


@pytest.fixture(scope="module")
def network():
    generator = torch.Generator().manual_seed(2)
    X = torch.randn(24, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=generator)
    model = train(mlp(seed=1), X, y, F.cross_entropy, steps=60, weight_decay=1e-2)
    return model, X, y


@pytest.mark.parametrize("cls, second_order", exact_cases(inverts_curvature=None))
def test_newton_removal_equals_the_explicit_inverse_on_a_network(network, cls, second_order):
    """Every estimator's Newton step is ``(n A - C_j)^-1`` with ``A`` its own inverse's: exact for those that
    invert the curvature, the Kronecker or harmonic-mean matrix for EK-FAC and DataInf."""
    model, X, y = network
    regularization = 0.5 if second_order == "gauss_newton" else 2.0
    inverse = (exact_inverse(model, X, y, F.cross_entropy, second_order, regularization)
               if check_of(cls).inverse is None
               else check_of(cls).inverse(model, X, y, F.cross_entropy, second_order, regularization))
    G = reference_gradients(model, X, y, F.cross_entropy)
    terms = reference_gauss_newton_terms(model, X, y, F.cross_entropy)
    X_test, y_test = X[:3] + 0.2, y[:3]
    G_test = reference_gradients(model, X_test, y_test, F.cross_entropy)
    # One batch: every point's Woodbury rows in one solve (iterative solvers run once per call).
    est = exact_estimator(cls, model, loss="cross_entropy", regularization=regularization,
                          second_order=second_order, batch_size=len(X), random_state=0).fit(X, y)
    singles = [[j] for j in range(len(X))]
    groups = np.array([0, 1, 2, 3] * 6)
    group_rows = [list(np.flatnonzero(groups == g)) for g in range(4)]
    tolerance = dict(rtol=max(check_of(cls).rtol, 1e-9) * 10, atol=check_of(cls).atol * 10)

    points = est.removal_effects(X_test, y_test, order="newton")
    by_group = est.removal_effects(X_test, y_test, groups=groups, order="newton", solver="woodbury")

    np.testing.assert_allclose(points, newton_reference(inverse, terms, G, G_test, singles).numpy(), **tolerance)
    np.testing.assert_allclose(by_group, newton_reference(inverse, terms, G, G_test, group_rows).numpy(), **tolerance)


def test_group_conjugate_gradient_matches_woodbury_on_a_network(network):
    """The two ways of solving a group's Newton step agree (Direct: exact curvature either way)."""
    model, X, y = network
    est = DirectInfluence(model, regularization=0.5, second_order="gauss_newton", batch_size=5).fit(X, y)
    groups = np.arange(len(X)) % 5
    woodbury = est.removal_effects(X[:4], y[:4], groups=groups, order="newton", solver="woodbury")
    cg = est.removal_effects(X[:4], y[:4], groups=groups, order="newton", solver="cg")
    np.testing.assert_allclose(cg, woodbury, rtol=1e-7, atol=1e-10)


def test_newton_removal_of_an_approximate_inverse_through_conjugate_gradient(network):
    """CG's inverse (iterative, reading the data) gives the exact Newton step within its tolerance; its group
    path runs unpreconditioned."""
    model, X, y = network
    exact = DirectInfluence(model, regularization=0.5, second_order="gauss_newton").fit(X, y)
    est = CgInfluence(model, regularization=0.5, second_order="gauss_newton", rtol=1e-10, max_iter=500).fit(X, y)
    groups = np.arange(len(X)) % 3
    for kwargs in ({}, {"groups": groups}, {"groups": groups, "solver": "cg"}):
        np.testing.assert_allclose(est.removal_effects(X[:3], y[:3], order="newton", **kwargs),
                                   exact.removal_effects(X[:3], y[:3], order="newton", **kwargs),
                                   rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------ streaming, output and errors
def test_removal_effects_do_not_depend_on_batches_or_chunks(network):
    from sklearn import config_context

    model, X, y = network
    groups = np.arange(len(X)) % 7
    reference = DirectInfluence(model, regularization=0.5, second_order="gauss_newton").fit(X, y)
    chunked = DirectInfluence(model, regularization=0.5, second_order="gauss_newton", batch_size=3).fit(X, y)
    X_test = X[:9] + 0.1
    for kwargs in ({"order": "newton"}, {"groups": groups}, {"groups": groups, "order": "newton"}):
        expected = reference.removal_effects(X_test, y[:9], **kwargs)
        with config_context(working_memory=1e-4):  # one training point, group and test point held at a time
            np.testing.assert_allclose(chunked.removal_effects(X_test, y[:9], **kwargs), expected, rtol=1e-9,
                                       atol=1e-12)


def test_removal_effects_output_follows_input_and_fills_out(network, tmp_path):
    model, X, y = network
    est = DirectInfluence(model, regularization=0.5).fit(X, y)
    expected = est.removal_effects(X[:4], y[:4], order="newton")
    as_torch = est.removal_effects(X[:4], y[:4], order="newton")
    assert isinstance(as_torch, torch.Tensor)
    out = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype="float64", shape=(4, len(X)))
    returned = est.removal_effects(X[:4].numpy(), y[:4].numpy(), order="newton", out=out)
    assert returned is out
    np.testing.assert_allclose(out, as_torch.numpy(), rtol=1e-12)
    groups = torch.arange(len(X)) % 2
    assert est.removal_effects(X[:4], y[:4], groups=groups).shape == (4, 2)
    assert isinstance(expected, torch.Tensor)
    with pytest.raises(ValueError, match="max_result_bytes"):
        est.removal_effects(X[:4], y[:4], max_result_bytes=8)


def test_removal_effects_on_other_training_points(network):
    """X, y: points to remove from the fitted objective (n stays the fitted count)."""
    model, X, y = network
    est = DirectInfluence(model, regularization=0.5).fit(X, y)
    full = est.removal_effects(X[:3], y[:3], order="newton")
    np.testing.assert_allclose(est.removal_effects(X[:3], y[:3], X[5:11], y[5:11], order="newton"), full[:, 5:11],
                               rtol=1e-12)


def test_removal_effects_errors(network):
    model, X, y = network
    est = DirectInfluence(model, regularization=0.5).fit(X, y)
    with pytest.raises(ValueError, match="order must be"):
        est.removal_effects(X[:2], y[:2], order="second")
    with pytest.raises(ValueError, match="solver must be"):
        est.removal_effects(X[:2], y[:2], solver="lu")
    with pytest.raises(ValueError, match="one label per training point"):
        est.removal_effects(X[:2], y[:2], groups=np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        est.removal_effects(X[:2], y[:2], groups=np.full(len(X), np.nan))
    with pytest.raises(ValueError, match="y was given without X"):
        est.removal_effects(X[:2], y[:2], y=y)
    with pytest.raises(ValueError, match="test_loss must be"):
        est.removal_effects(X[:2], y[:2], order="newton", test_loss="quadratic")
    with pytest.raises(ValueError, match="use order='newton'"):
        est.removal_effects(X[:2], y[:2], test_loss="exact")
    with pytest.raises(ValueError, match="needs their targets"):
        est.removal_effects(X[:2], order="newton", test_loss="exact")


def test_removal_that_leaves_the_curvature_indefinite_warns(network):
    """A rank-1 inverse with a tiny regularization takes each point's own curvature as almost all of n A."""
    model, X, y = network
    est = NystroemInfluence(model, rank=1, regularization=1e-8, random_state=0).fit(X, y)
    with pytest.warns(NotPositiveDefiniteWarning, match="not positive definite"):
        est.removal_effects(X[:2], y[:2], order="newton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DirectInfluence(model, regularization=0.5).fit(X, y).removal_effects(X[:2], y[:2], order="newton")


def test_newton_removal_with_drawn_targets_and_a_sequence_free_loss(network):
    """EK-FAC fitted with drawn targets still removes each point's exact Gauss-Newton term."""
    model, X, y = network
    est = EkfacInfluence(model, regularization=0.5, n_target_draws=1, random_state=0).fit(X, y)
    effects = est.removal_effects(X[:2], y[:2], order="newton")
    first = est.removal_effects(X[:2], y[:2])
    assert np.isfinite(effects.numpy()).all()
    # Newton amplifies first order (removing curvature makes the step longer) on average over points.
    assert (np.abs(effects.numpy()).sum() > np.abs(first.numpy()).sum())


# ------------------------------------------------------------------ normalized influences
# LiSSA's exact parameters take minutes on the many solves of RelatIF; its normalization is the base class's.
@pytest.mark.parametrize("cls, second_order", [case for case in exact_cases(("gauss_newton",), None)
                                               if case.values[0].__name__ != "LissaInfluence"])
def test_normalized_influences_equal_their_formulas(network, cls, second_order):
    """RelatIF divides by sqrt(self-influence) of the training point; cosine by both gradients' norms. Both
    sides held: fewer test points than training points, and more."""
    model, X, y = network
    est = exact_estimator(cls, model, loss="cross_entropy", regularization=0.5, second_order=second_order,
                          batch_size=5, random_state=0).fit(X, y)
    G = reference_gradients(model, X, y, F.cross_entropy).numpy()
    tolerance = dict(rtol=max(check_of(cls).rtol, 1e-9) * 10, atol=check_of(cls).atol * 10)
    for X_test, y_test in ((X[:3] + 0.1, y[:3]), (torch.cat([X, X[:6] + 0.1]), torch.cat([y, y[:6]]))):
        raw = est.influences(X_test, y_test).numpy()
        self_influence = est.self_influence(X, y).numpy()
        G_test = reference_gradients(model, X_test, y_test, F.cross_entropy).numpy()
        np.testing.assert_allclose(est.influences(X_test, y_test, normalize="relatif"),
                                   raw / np.sqrt(self_influence), **tolerance)
        cosine = raw / np.linalg.norm(G_test, axis=1)[:, None] / np.linalg.norm(G, axis=1)
        np.testing.assert_allclose(est.influences(X_test, y_test, normalize="cosine"), cosine, **tolerance)
        indices, values = est.top_influences(X_test[:3], y_test[:3], k=4, normalize="relatif", which="both")
        relatif = raw[:3] / np.sqrt(self_influence)
        np.testing.assert_array_equal(indices[:, :4], np.argsort(-relatif, axis=1)[:, :4])
        np.testing.assert_allclose(values[:, 4:], np.sort(relatif, axis=1)[:, :4], **tolerance)


def test_relatif_ranks_points_with_large_gradients_lower(network):
    """Raw influence favours training points with large self-influence (large gradients); RelatIF divides
    that out: the top point of each test point has a smaller self-influence on average."""
    model, X, y = network
    est = DirectInfluence(model, regularization=0.5).fit(X, y)
    X_test = X + 0.05
    self_influence = est.self_influence(X, y).numpy()
    top_raw = est.top_influences(X_test, y, k=1)[0][:, 0]
    top_relatif = est.top_influences(X_test, y, k=1, normalize="relatif")[0][:, 0]
    assert self_influence[top_relatif].mean() < 0.9 * self_influence[top_raw].mean()


def test_normalize_errors(network):
    model, X, y = network
    est = DirectInfluence(model, regularization=0.5).fit(X, y)
    with pytest.raises(ValueError, match="normalize must be"):
        est.influences(X[:2], y[:2], normalize="l2")
    with pytest.raises(ValueError, match="normalize must be"):
        est.top_influences(X[:2], y[:2], k=2, normalize="l2")
    with pytest.raises(ValueError, match="mode='up' only"):
        est.influences(X[:2], y[:2], mode="perturbation", normalize="cosine")


# ------------------------------------------------------------------ every model kind
@pytest.mark.parametrize("kind", ["dict inputs", "token targets", "parameter subset"])
def test_newton_removal_for_keyword_inputs_token_targets_and_a_parameter_subset(kind):
    """A two-input model called as model(**X); a tagger whose sample loss sums its tokens' (some ignored),
    20 Woodbury rows per point; influence over a chosen subset of parameters. Against ``(n A - C_G)^-1`` built
    from the explicit per-sample Gauss-Newton terms of tests/references.py."""
    from references import Reference, rows, token_cross_entropy
    from test_sequences import cross_entropy_per_sample, tagger_problem, two_input_problem

    names = None
    if kind == "dict inputs":
        model, X, y = two_input_problem()
        loss = cross_entropy_per_sample
    else:
        model, X, y = tagger_problem()
        loss = token_cross_entropy()
        if kind == "parameter subset":
            names = ["hidden.weight", "head.weight", "head.bias"]
    reference = Reference(model, loss, names)
    n = len(y)
    inverse = reference.inverse(X, y, 0.5)
    G = reference.gradients(X, y)
    terms = torch.stack([reference.gauss_newton(rows(X, slice(j, j + 1)), y[j:j + 1]) for j in range(n)])
    X_test, y_test = rows(X, slice(0, 3)), y[:3]
    G_test = G[:3]
    est = DirectInfluence(model, parameters=["hidden.weight", "head.*"] if names else None, regularization=0.5,
                          second_order="gauss_newton", batch_size=4).fit(X, y)
    groups = np.arange(n) % 3
    group_rows = [list(np.flatnonzero(groups == g)) for g in range(3)]

    torch.testing.assert_close(est.removal_effects(X_test, y_test, order="newton"),
                               newton_reference(inverse, terms, G, G_test, [[j] for j in range(n)]),
                               rtol=1e-8, atol=1e-11)
    expected = newton_reference(inverse, terms, G, G_test, group_rows)
    for solver in ("woodbury", "cg"):
        torch.testing.assert_close(est.removal_effects(X_test, y_test, groups=groups, order="newton", solver=solver),
                                   expected, rtol=1e-7, atol=1e-10)
