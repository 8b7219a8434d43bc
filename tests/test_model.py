"""The model and loss: eval mode, frozen parameters, loss forms, the user's model untouched."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from skinfl import CgInfluence, DirectInfluence
from skinfl.exceptions import TrainingModeWarning


def data(n=40, d=5, classes=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return X, torch.arange(n) % classes


def test_dropout_and_batch_norm_are_evaluated_in_eval_mode_without_touching_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    X, y = data()
    model(X)  # give batch norm non-trivial running statistics
    model.train()
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(TrainingModeWarning, match=r"training mode.*\['1', '3'\].*model.eval\(\)"):
        first = DirectInfluence(model, regularization=0.1).fit(X, y).influences(X[:3], y[:3])
    with pytest.warns(TrainingModeWarning):
        second = DirectInfluence(model, regularization=0.1).fit(X, y).influences(X[:3], y[:3])
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout randomness
    assert model.training  # the user's model keeps its mode...
    for key, value in model.state_dict().items():  # ...and its state (running stats too)
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    evaluated = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingModeWarning)  # an eval-mode model is not warned about
        in_eval = DirectInfluence(evaluated, regularization=0.1, solver="eigh").fit(X, y)
    torch.testing.assert_close(first, in_eval.influences(X[:3], y[:3]))


def test_frozen_parameters_are_excluded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[0].requires_grad_(False)
    X, y = data()
    est = DirectInfluence(model, regularization=0.1).fit(X, y)
    assert est.n_params_ == 4 * 3 + 3
    assert est.trainable_parameters_ == ["2.weight", "2.bias"]


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum"),
                                  lambda out, target: nn.functional.cross_entropy(out, target)])
def test_loss_modules_and_callables_equal_the_builtin(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X, y = data()
    expected = DirectInfluence(model, regularization=0.1).fit(X, y).influences(X[:4], y[:4])
    got = DirectInfluence(model, loss=loss, regularization=0.1).fit(X, y).influences(X[:4], y[:4])
    torch.testing.assert_close(got, expected)


def test_bce_with_logits_and_its_module_agree():
    torch.manual_seed(0)
    model = nn.Linear(5, 1).double()
    X, _ = data()
    y = (X[:, 0] > 0).double()
    builtin = CgInfluence(model, loss="bce_with_logits", regularization=0.1, rtol=1e-10).fit(X, y)
    module = CgInfluence(model, loss=nn.BCEWithLogitsLoss(), regularization=0.1, rtol=1e-10).fit(X, y)
    torch.testing.assert_close(builtin.influences(X[:4], y[:4]), module.influences(X[:4], y[:4]))
    # The measurement is the loss at the predicted label.
    predicted = (model(X[:4]) > 0).double().squeeze(1)
    torch.testing.assert_close(builtin.transform(X[:4]), builtin.transform(X[:4], predicted))


def test_image_inputs_keep_their_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    X = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.arange(12) % 3
    est = DirectInfluence(model, regularization=0.1).fit(X, y)
    assert est.input_shape_ == (1, 6, 6) and est.n_features_in_ == 36
    assert est.influences(X[:2], y[:2], mode="perturbation").shape == (2, 12, 1, 6, 6)
    with pytest.raises(ValueError, match=r"per-sample shape \(1, 5, 5\).*fitted on inputs of per-sample shape \(1, 6, 6\)"):
        est.transform(torch.zeros(2, 1, 5, 5, dtype=torch.float64))


def test_float32_models_compute_in_float32():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    X, y = data()
    est = DirectInfluence(model, regularization=0.1).fit(X.numpy(), y.numpy())
    out = est.influences(X[:2].numpy(), y[:2].numpy())
    assert out.dtype == np.float32
    exact = DirectInfluence(copy.deepcopy(model).double(), regularization=0.1).fit(X, y).influences(X[:2], y[:2])
    # float32 rounding of gradients and products, amplified by the conditioning: about 1e-5 here,
    # a few hundred float32 epsilons; a float64 path or a wrong result would not land here.
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, exact.numpy(), rtol=5e-5, atol=0)
    assert np.abs(out - exact.numpy()).max() > 0  # it really computed in float32


@pytest.mark.parametrize("loss_module, loss_function, binary", [
    (nn.CrossEntropyLoss(label_smoothing=0.2),
     lambda out, target: nn.functional.cross_entropy(out, target, label_smoothing=0.2), False),
    (nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0], dtype=torch.float64)),
     lambda out, target: nn.functional.binary_cross_entropy_with_logits(
         out, target, pos_weight=torch.tensor([3.0], dtype=torch.float64)), True),
])
def test_loss_module_options_are_honoured_exactly(loss_module, loss_function, binary):
    """Options that change the loss (label smoothing, positive weights) give that loss's influences."""
    from conftest import reference_gradients, reference_hessian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1 if binary else 3)).double()
    X, y = data()
    if binary:
        y = (X[:, 0] > 0).double()[:, None]
    hessian = reference_hessian(model, X, y, loss_function)
    G = reference_gradients(model, X, y, loss_function)
    system = hessian + 0.5 * torch.eye(len(hessian), dtype=torch.float64)
    expected = G[:4] @ torch.linalg.solve(system, G.T)
    got = DirectInfluence(model, loss=loss_module, regularization=0.5, solver="eigh").fit(X, y).influences(X[:4], y[:4])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    plain = DirectInfluence(model, loss="bce_with_logits" if binary else "cross_entropy", regularization=0.5,
                            solver="eigh").fit(X, y).influences(X[:4], y[:4])
    assert (plain - expected).abs().max() > 1e-3 * expected.abs().max()  # the option matters here
