"""Every registered estimator against closed forms and independently computed references.

Each estimator has an entry in ``registry.py`` that says how it is made
exact (its parameters, tolerance and supported curvatures) and which
inverse it then computes: the exact inverse of the curvature, or, for
EK-FAC and DataInf, the inverse they approximate it with, built there from
explicit per-sample quantities. The tests below run over the registry, so a
new estimator is checked by declaring its class and its entry.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import exact_cases, exact_classes, exact_estimator, reference_gradients, reference_hessian, train
from registry import check_of, reference_curvature
from torch import nn
from torch.func import functional_call, jacrev

from skinfl import DirectInfluence


def assert_exact(cls, actual, expected):
    check = check_of(cls)
    if isinstance(actual, np.ndarray):
        np.testing.assert_allclose(actual, expected, rtol=check.rtol, atol=check.atol)
    else:
        torch.testing.assert_close(actual, expected, rtol=check.rtol, atol=check.atol)


# ------------------------------------------------- every estimator, its own inverse
def _strided_conv_problem():
    """A CNN whose convolutions use stride 2, zero padding and dilation, on 7x7 images (float64)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(4)
    X = torch.randn(24, 2, 7, 7, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=generator)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(),
                          nn.Conv2d(3, 2, 2, stride=2, padding=2, dilation=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(2 * 3 * 3, 3)).double()
    return model, X, y, F.cross_entropy, "cross_entropy", {"gauss_newton": 0.5, "hessian": 2.0}


def _mlp_problem():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(5)
    X = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=generator)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.LayerNorm(3)).double()
    # Its Hessian has eigenvalues down to -19: regularization 25 makes it positive definite.
    return model, X, y, F.cross_entropy, "cross_entropy", {"gauss_newton": 0.5, "hessian": 25.0}


def _regression_problem():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(6)
    X = torch.randn(25, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(25, 2, generator=generator, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    return model, X, y, F.mse_loss, "mse", {"gauss_newton": 0.5, "hessian": 2.0}


PROBLEMS = {"strided_conv": _strided_conv_problem, "mlp_layer_norm": _mlp_problem, "regression": _regression_problem}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("cls, second_order", exact_cases(inverts_curvature=None))
def test_every_estimator_computes_its_reference_inverse(cls, second_order, problem):
    """transform, influences and self_influence equal ``G R G^T`` with ``R`` the registry's inverse for the
    estimator: ``(C + lambda I)^-1`` of the exact curvature, EK-FAC's Kronecker blocks, DataInf's harmonic
    mean. Untrained models with Gauss-Newton curvature or a large regularization keep every system positive
    definite; the convolutions have stride, padding and dilation other than 1 and 0."""
    model, X, y, loss_fn, loss, regularizations = PROBLEMS[problem]()
    check = check_of(cls)
    regularization = regularizations[second_order]
    if check.inverse is None:
        curvature = reference_curvature(model, X, y, loss_fn, second_order)
        inverse = torch.linalg.inv(curvature + regularization * torch.eye(len(curvature), dtype=torch.float64))
    else:
        inverse = check.inverse(model, X, y, loss_fn, second_order, regularization)
    G = reference_gradients(model, X, y, loss_fn)
    est = exact_estimator(cls, model, loss=loss, regularization=regularization, second_order=second_order,
                          batch_size=7, random_state=0).fit(X, y)
    assert_exact(cls, est.transform(X[:5], y[:5]), G[:5] @ inverse)
    assert_exact(cls, est.influences(X[:4], y[:4]), G[:4] @ inverse @ G.T)
    assert_exact(cls, est.self_influence(X[:6], y[:6]), torch.einsum("ij,jk,ik->i", G[:6], inverse, G[:6]))


# ---------------------------------------------------------------- linear regression
def linear_gradients(X, y, weights):
    """Per-sample gradients of (x^T w - y)^2: 2 (x^T w - y) x."""
    return 2 * (X @ weights - y) * X


@pytest.mark.parametrize("cls, second_order", exact_cases())
def test_linear_regression_closed_form(linear_regression, cls, second_order):
    model, X, y, weights = linear_regression
    n, d = X.shape
    regularization = 0.05
    hessian = 2 * X.T @ X / n + regularization * np.eye(d)
    G = linear_gradients(X, y, weights)
    inverse = np.linalg.inv(hessian)

    est = exact_estimator(cls, model, loss="mse", regularization=regularization, second_order=second_order).fit(X, y)

    assert_exact(cls, est.transform(X[:7], y[:7]), G[:7] @ inverse)
    assert_exact(cls, est.influences(X[:7], y[:7]), G[:7] @ inverse @ G.T)
    assert_exact(cls, est.self_influence(X, y), np.einsum("ij,jk,ik->i", G, inverse, G))
    # Against other labelled data than the fitted points.
    assert_exact(cls, est.influences(X[:3], y[:3], X[10:20], y[10:20]), G[:3] @ inverse @ G[10:20].T)


@pytest.mark.parametrize("cls", exact_classes("hessian"))
def test_linear_regression_measurement_is_the_output(linear_regression, cls):
    """y=None for mse differentiates the output x^T w, whose gradient is x."""
    model, X, y, _ = linear_regression
    est = exact_estimator(cls, model, loss="mse", regularization=1e-3).fit(X, y)
    hessian = 2 * X.T @ X / len(X) + 1e-3 * np.eye(X.shape[1])
    assert_exact(cls, est.transform(X[:5]), X[:5] @ np.linalg.inv(hessian))


def test_unregularized_influence_predicts_leave_one_out_exactly_to_first_order(linear_regression):
    """For least squares, removing a point moves w by (H_{-j})^{-1} g_j / (n-1) exactly (Sherman-Morrison)."""
    model, X, y, weights = linear_regression
    n = len(X)
    est = DirectInfluence(model, loss="mse", regularization=0.0).fit(X, y)
    test_x, test_y = X[:1] + 0.5, y[:1]
    predicted = est.influences(test_x, test_y)[0] / n
    actual = []
    for j in range(0, n, 8):
        keep = np.arange(n) != j
        w = np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]
        actual.append(((test_x @ w - test_y) ** 2 - (test_x @ weights - test_y) ** 2).item())
    assert np.corrcoef(predicted[::8], actual)[0, 1] > 0.99


# --------------------------------------------------------------------- small MLP
@pytest.mark.parametrize("cls", exact_classes("hessian"))
def test_mlp_against_explicit_hessian(classification_problem, cls):
    model, X, y = classification_problem
    hessian = reference_hessian(model, X, y, F.cross_entropy)
    system = hessian + 0.01 * torch.eye(len(hessian), dtype=hessian.dtype)
    G = reference_gradients(model, X, y, F.cross_entropy)

    est = exact_estimator(cls, model, regularization=0.01).fit(X, y)
    assert_exact(cls, est.influences(X[:5], y[:5]), G[:5] @ torch.linalg.solve(system, G.T))
    assert_exact(cls, est.transform(X[:5], y[:5]), torch.linalg.solve(system, G[:5].T).T)


def softmax_gauss_newton(model, X):
    """(1/n) sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i with J_i from jacrev, in closed form per sample."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def outputs(flat_params, x):
        return functional_call(model, flat_params, (x.unsqueeze(0),))[0]

    rows = []
    for x in X:
        jac = jacrev(outputs)(params, x)
        J = torch.cat([jac[name].reshape(jac[name].shape[0], -1) for name in params], dim=1)
        p = torch.softmax(outputs(params, x), dim=0)
        rows.append(J.T @ (torch.diag(p) - torch.outer(p, p)) @ J)
    return torch.stack(rows).mean(dim=0)


@pytest.mark.parametrize("cls, second_order", exact_cases())
def test_gauss_newton_of_linear_softmax_model_equals_its_hessian(cls, second_order):
    """A model linear in its parameters has no residual curvature term: GN = H."""
    torch.manual_seed(0)
    X = torch.randn(30, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (30,))
    model = torch.nn.Linear(3, 4).double()
    closed_form = softmax_gauss_newton(model, X)
    torch.testing.assert_close(closed_form, reference_hessian(model, X, y, F.cross_entropy))

    G = reference_gradients(model, X, y, F.cross_entropy)
    expected = G[:4] @ torch.linalg.solve(closed_form + 0.1 * torch.eye(len(closed_form), dtype=torch.float64), G.T)
    est = exact_estimator(cls, model, regularization=0.1, second_order=second_order).fit(X, y)
    assert_exact(cls, est.influences(X[:4], y[:4]), expected)


@pytest.mark.parametrize("cls", exact_classes("gauss_newton"))
def test_gauss_newton_of_mlp_against_jacobian_formula(classification_problem, cls):
    model, X, y = classification_problem
    gn = softmax_gauss_newton(model, X)
    G = reference_gradients(model, X, y, F.cross_entropy)
    expected = G[:5] @ torch.linalg.solve(gn + 0.01 * torch.eye(len(gn), dtype=gn.dtype), G.T)
    est = exact_estimator(cls, model, regularization=0.01, second_order="gauss_newton").fit(X, y)
    assert_exact(cls, est.influences(X[:5], y[:5]), expected)


def test_cross_entropy_measurement_is_loss_at_predicted_label(classification_problem):
    model, X, y = classification_problem
    est = DirectInfluence(model, regularization=0.01).fit(X, y)
    predicted = model(X[:6]).argmax(dim=1)
    torch.testing.assert_close(est.transform(X[:6]), est.transform(X[:6], predicted))


# ---------------------------------------------------------- convolutional model
@pytest.fixture(scope="module")
def conv_problem():
    """A small CNN on 6x6 images, trained to a minimum with weight decay."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(2)
    X = torch.randn(48, 1, 6, 6, generator=generator, dtype=torch.float64)
    y = ((X[:, 0, :3].mean(dim=(1, 2)) > 0).long() + (X[:, 0, :, 3:].mean(dim=(1, 2)) > 0.2).long())
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    return train(model, X, y, F.cross_entropy, steps=200, weight_decay=1e-2), X, y


@pytest.mark.parametrize("cls, second_order", exact_cases())
def test_conv_model_against_explicit_curvature(conv_problem, cls, second_order):
    model, X, y = conv_problem
    if second_order == "hessian":
        curvature = reference_hessian(model, X, y, F.cross_entropy)
    else:
        curvature = softmax_gauss_newton(model, X)
    system = curvature + 0.05 * torch.eye(len(curvature), dtype=torch.float64)
    G = reference_gradients(model, X, y, F.cross_entropy)
    est = exact_estimator(cls, model, regularization=0.05, second_order=second_order, batch_size=7).fit(X, y)
    assert est.n_params_ == 2 * 9 + 2 + 32 * 3 + 3
    assert_exact(cls, est.influences(X[:4], y[:4]), G[:4] @ torch.linalg.solve(system, G.T))
    assert_exact(cls, est.self_influence(X[:6], y[:6]), torch.einsum("ij,ij->i", G[:6], torch.linalg.solve(system, G[:6].T).T))


@pytest.mark.parametrize("cls", exact_classes("hessian"))
def test_conv_perturbation_influence_matches_finite_differences(conv_problem, cls):
    """Perturbation influence on images: central differences of up-weighting influence per pixel."""
    model, X, y = conv_problem
    est = exact_estimator(cls, model, regularization=0.05).fit(X, y)
    X_test, y_test = X[:2], y[:2]
    perturbation = est.influences(X_test, y_test, mode="perturbation")
    assert perturbation.shape == (2, len(X), 1, 6, 6)
    step = 1e-5
    for j in (0, 17):
        for pixel in ((0, 0, 0), (0, 2, 3), (0, 5, 5)):
            shift = torch.zeros_like(X[j:j + 1])
            shift[(0, *pixel)] = step
            up = est.influences(X_test, y_test, X[j:j + 1] + shift, y[j:j + 1])
            down = est.influences(X_test, y_test, X[j:j + 1] - shift, y[j:j + 1])
            finite_difference = ((up - down) / (2 * step))[:, 0]
            torch.testing.assert_close(perturbation[(slice(None), j, *pixel)], finite_difference, rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------- perturbation mode
def test_perturbation_influence_matches_finite_differences(classification_problem):
    """Central differences of up-weighting influence in each input coordinate.

    The other estimators' perturbation influences are checked against these below.
    """
    model, X, y = classification_problem
    est = DirectInfluence(model, regularization=0.05).fit(X, y)
    X_test, y_test = X[:2], y[:2]
    perturbation = est.influences(X_test, y_test, mode="perturbation")
    assert perturbation.shape == (2, len(X), X.shape[1])

    step = 1e-5
    for j in (0, 7, 31):
        for k in range(X.shape[1]):
            shift = torch.zeros_like(X[j:j + 1])
            shift[0, k] = step
            up = est.influences(X_test, y_test, X[j:j + 1] + shift, y[j:j + 1])
            down = est.influences(X_test, y_test, X[j:j + 1] - shift, y[j:j + 1])
            finite_difference = ((up - down) / (2 * step))[:, 0]
            torch.testing.assert_close(perturbation[:, j, k], finite_difference, rtol=1e-6, atol=1e-8)


def test_perturbation_influence_through_layer_norm_matches_finite_differences():
    """The input derivative of the parameter gradient is taken reverse over reverse: torch.func's reverse
    over forward is wrong through layer_norm (torch 2.13), and was 22 times off here."""
    model, X, y, _, loss, regularizations = _mlp_problem()
    est = DirectInfluence(model, loss=loss, regularization=regularizations["gauss_newton"],
                          second_order="gauss_newton").fit(X, y)
    perturbation = est.influences(X[:2], y[:2], mode="perturbation")
    step = 1e-5
    for j in (3, 11):
        for k in range(X.shape[1]):
            shift = torch.zeros_like(X[j:j + 1])
            shift[0, k] = step
            up = est.influences(X[:2], y[:2], X[j:j + 1] + shift, y[j:j + 1])
            down = est.influences(X[:2], y[:2], X[j:j + 1] - shift, y[j:j + 1])
            torch.testing.assert_close(perturbation[:, j, k], ((up - down) / (2 * step))[:, 0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("cls", exact_classes("hessian"))
def test_perturbation_influence_equals_the_direct_one(classification_problem, cls):
    model, X, y = classification_problem
    direct = DirectInfluence(model, regularization=0.05).fit(X, y)
    est = exact_estimator(cls, model, regularization=0.05).fit(X, y)
    assert_exact(cls, est.influences(X[:3], y[:3], mode="perturbation"),
                 direct.influences(X[:3], y[:3], mode="perturbation"))
