"""Retrain helpers: exact optima, determinism, and the regularization they imply."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from skinfl.retraining import LogisticRegressionRetrainer, TorchRetrainer


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:200] / 16.0, y[:200]


def objective_gradient(model, X, y, regularization, loss):
    """Gradient of mean loss + regularization / 2 ||theta||^2 at the model's parameters."""
    model = model.train()
    for parameter in model.parameters():
        parameter.requires_grad_(True)
        parameter.grad = None
    value = loss(model(torch.as_tensor(X)), y) + regularization / 2 * sum((p**2).sum() for p in model.parameters())
    value.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("solver, tolerance", [("lbfgs", 1e-7), ("newton-cholesky", 1e-12)])
def test_logistic_regression_is_the_optimum_of_the_influence_objective(digits, solver, tolerance):
    X, y = digits
    retrain = LogisticRegressionRetrainer(C=0.5, solver=solver)
    model = retrain(X, y)
    assert isinstance(model, nn.Linear) and model.weight.shape == (10, 64) and model.bias is None
    gradient = objective_gradient(model, X, torch.as_tensor(y), retrain.regularization_for(len(X)), nn.functional.cross_entropy)
    # The mean-loss objective with regularization 1 / (C n) is stationary.
    assert gradient.abs().max() < tolerance


def test_binary_logistic_regression_has_one_output():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    y = (X[:, 0] + 0.3 * rng.normal(size=50) > 0).astype(int)
    retrain = LogisticRegressionRetrainer(C=2.0)
    model = retrain(X, y)
    assert model.out_features == 1
    target = torch.as_tensor(y, dtype=torch.float64).reshape(-1, 1)
    gradient = objective_gradient(model, X, target, retrain.regularization_for(50), nn.functional.binary_cross_entropy_with_logits)
    assert gradient.abs().max() < 1e-7


def test_warm_start_reaches_the_same_optimum(digits):
    X, y = digits
    warm = LogisticRegressionRetrainer(C=0.5, warm_start=True)
    cold = LogisticRegressionRetrainer(C=0.5, warm_start=False)
    warm(X, y)  # leaves a solution to start from
    keep = np.arange(1, len(X))
    np.testing.assert_allclose(
        warm(X[keep], y[keep]).weight.detach(), cold(X[keep], y[keep]).weight.detach(), atol=2e-6
    )


def test_logistic_regression_rejects_missing_classes(digits):
    X, y = digits
    with pytest.raises(ValueError, match="every class present"):
        LogisticRegressionRetrainer()(X[y != 3], y[y != 3])
    with pytest.raises(ValueError, match="one class label per sample"):
        LogisticRegressionRetrainer()(X, np.stack([y, y], axis=1))


def test_torch_retrainer_is_deterministic_and_leaves_the_global_seed_alone():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(64, 3, generator=generator)
    y = (X[:, 0] > 0).long()
    module = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 2))  # dropout: seeded too
    before = [p.detach().clone() for p in module.parameters()]
    retrain = TorchRetrainer(module, epochs=5, batch_size=16, random_state=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = retrain(X, y)
    assert torch.equal(torch.get_rng_state(), state)
    second = retrain(X.numpy(), y.numpy())
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), before))  # the template is untouched
    other_seed = TorchRetrainer(module, epochs=5, batch_size=16, random_state=4)(X, y)
    assert not torch.equal(other_seed[0].weight, first[0].weight)
    assert not first.training


def test_torch_retrainer_weight_decay_is_the_regularization():
    """Full-batch gradient descent on ridge regression converges to the closed form."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    y = X @ rng.normal(size=4) + 0.1 * rng.normal(size=60)
    regularization = 0.1
    module = nn.Linear(4, 1, bias=False, dtype=torch.float64)
    retrain = TorchRetrainer(module, loss="mse", optimizer="sgd", learning_rate=0.2, epochs=2000, weight_decay=regularization)
    model = retrain(X, y)
    closed_form = np.linalg.solve(2 * X.T @ X / 60 + regularization * np.eye(4), 2 * X.T @ y / 60)
    np.testing.assert_allclose(model.weight.detach().numpy().ravel(), closed_form, rtol=1e-8)


def test_torch_retrainer_keep_starts_from_the_module_weights():
    module = nn.Linear(2, 1, dtype=torch.float64)
    model = TorchRetrainer(module, loss="mse", epochs=0, init="keep")(np.zeros((3, 2)), np.zeros(3))
    assert torch.equal(model.weight, module.weight)
    reset = TorchRetrainer(module, loss="mse", epochs=0, init="reset")(np.zeros((3, 2)), np.zeros(3))
    assert not torch.equal(reset.weight, module.weight)


def test_retrainer_parameters_are_validated():
    with pytest.raises(ValueError, match="optimizer"):
        TorchRetrainer(nn.Linear(2, 1), optimizer="rmsprop")(np.zeros((3, 2)), np.zeros(3))
    with pytest.raises(ValueError, match="'C' parameter"):
        LogisticRegressionRetrainer(C=0.0)(np.zeros((3, 2)), np.array([0, 1, 0]))
