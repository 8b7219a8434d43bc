"""Bad input gets an error that says what is wrong and what to do."""

import numpy as np
import pytest
import scipy.sparse
import torch

from skinfl import CgInfluence, DirectInfluence
from skinfl.exceptions import NotFittedError


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    X = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    y = np.arange(30) % 3
    return model, X, y


@pytest.fixture(scope="module")
def fitted(small):
    model, X, y = small
    return DirectInfluence(model, regularization=0.1).fit(X, y)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs(small, fitted, bad):
    model, X, y = small
    X_bad = X.copy()
    X_bad[3, 1] = bad
    with pytest.raises(ValueError, match="Input X contains NaN or infinity; remove or impute"):
        DirectInfluence(model).fit(X_bad, y)
    with pytest.raises(ValueError, match="Input X_test contains NaN or infinity"):
        fitted.influences(X_bad, y)
    y_bad = y.astype(float)
    y_bad[0] = bad
    with pytest.raises(ValueError, match="Input y contains NaN or infinity"):
        DirectInfluence(model).fit(X, y_bad)


def test_length_mismatch(small, fitted):
    model, X, y = small
    with pytest.raises(ValueError, match="X and y have different numbers of samples: 30 and 29"):
        DirectInfluence(model).fit(X, y[:-1])
    with pytest.raises(ValueError, match="X_test and y_test have different numbers of samples: 5 and 4"):
        fitted.influences(X[:5], y[:4])


def test_empty_data(small, fitted):
    model, X, y = small
    with pytest.raises(ValueError, match=r"0 sample\(s\).*X is empty"):
        DirectInfluence(model).fit(X[:0], y[:0])
    with pytest.raises(ValueError, match=r"0 sample\(s\)"):
        fitted.transform(X[:0])


def test_missing_targets(small):
    model, X, y = small
    with pytest.raises(ValueError, match="requires y to be passed"):
        DirectInfluence(model).fit(X)


@pytest.mark.parametrize("labels, message", [
    (np.full(30, 3), r"labels from 3 to 3, but the model has 3 outputs, so labels must lie in 0..2"),
    (np.full(30, -1), r"labels from -1 to -1.*LabelEncoder"),
    (np.full(30, 0.5), "integer class indices"),
    (np.array(["a", "b", "c"] * 10), "LabelEncoder"),
])
def test_labels_out_of_range_or_wrong_type(small, labels, message):
    model, X, _ = small
    with pytest.raises(ValueError, match=message):
        DirectInfluence(model).fit(X, labels)


def test_regression_targets_must_match_outputs():
    model = torch.nn.Linear(3, 2)
    X = np.zeros((10, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"y has shape \(10, 3\) but the model outputs shape \(10, 2\)"):
        DirectInfluence(model, loss="mse").fit(X, np.zeros((10, 3)))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] for loss='bce_with_logits'"):
        DirectInfluence(model, loss="bce_with_logits").fit(X, np.full((10, 2), 2.0))


def test_single_output_regression_targets_are_not_broadcast():
    """Targets of shape (n,) against outputs (n, 1) must not broadcast to (n, n)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randn(20, dtype=torch.float64)
    flat = DirectInfluence(model, loss="mse").fit(X, y).influences(X[:2], y[:2])
    column = DirectInfluence(model, loss="mse").fit(X, y[:, None]).influences(X[:2], y[:2, None])
    torch.testing.assert_close(flat, column)


@pytest.mark.parametrize("params, message", [
    ({"regularization": -1.0}, r"'regularization' parameter of DirectInfluence must be a float in the range \[0"),
    ({"regularization": np.inf}, r"range \[0.0, inf\) or a str among {.auto.}. Got inf"),
    ({"second_order": "fisher"}, "'second_order' parameter"),
    ({"loss": "hinge"}, "'loss' parameter"),
    ({"batch_size": 0}, "'batch_size' parameter"),
    ({"solver": "lu"}, "'solver' parameter"),
])
def test_bad_parameters(small, params, message):
    model, X, y = small
    with pytest.raises(ValueError, match=message):
        DirectInfluence(model, **params).fit(X, y)


def test_cg_bad_parameters(small):
    model, X, y = small
    with pytest.raises(ValueError, match="'preconditioner' parameter"):
        CgInfluence(model, preconditioner="ilu").fit(X, y)
    with pytest.raises(ValueError, match="'max_iter' parameter"):
        CgInfluence(model, max_iter=0).fit(X, y)


def test_model_must_be_a_module(small):
    _, X, y = small
    with pytest.raises(ValueError, match="'model' parameter of DirectInfluence must be an instance of 'torch.nn"):
        DirectInfluence(lambda x: x).fit(X, y)


def test_wrong_input_width(small, fitted):
    model, X, y = small
    with pytest.raises(ValueError, match=r"could not be evaluated on X\[:1\] of shape \(1, 5\).*number of features"):
        DirectInfluence(model).fit(np.zeros((30, 5), dtype=np.float32), y)
    with pytest.raises(ValueError, match="X has 5 features, but DirectInfluence is expecting 4 features as input"):
        fitted.transform(np.zeros((3, 5), dtype=np.float32))


def test_one_dimensional_and_sparse_inputs(small, fitted):
    model, X, y = small
    with pytest.raises(ValueError, match="Reshape your data"):
        fitted.transform(X[0])
    with pytest.raises(TypeError, match=r"Sparse data is not supported for X; convert it with X.toarray\(\)"):
        DirectInfluence(model).fit(scipy.sparse.csr_matrix(X), y)


def test_integer_inputs_hint_at_casting(small):
    model, X, y = small
    with pytest.raises(ValueError, match="X holds integers.*cast X to float"):
        DirectInfluence(model).fit(np.ones((30, 4), dtype=np.int64), y)


def test_bad_mode_and_half_given_training_data(fitted, small):
    _, X, y = small
    with pytest.raises(ValueError, match="mode must be 'up' or 'perturbation'"):
        fitted.influences(X[:2], y[:2], mode="down")
    with pytest.raises(ValueError, match="y was given without X"):
        fitted.influences(X[:2], y[:2], y=y)


def test_custom_loss_needs_targets_for_measurement(small):
    model, X, y = small
    est = DirectInfluence(model, loss=torch.nn.functional.cross_entropy, regularization=0.1).fit(X, y)
    with pytest.raises(ValueError, match="custom loss callable.*Pass the targets y"):
        est.transform(X[:2])


def test_score_needs_targets(fitted, small):
    _, X, _ = small
    with pytest.raises(ValueError, match="score needs targets y"):
        fitted.score(X, None)


def test_cuda_requested_without_cuda(small, monkeypatch):
    model, X, y = small
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available.*device='cpu'"):
        DirectInfluence(model, device="cuda").fit(X, y)


def test_not_fitted_error_is_sklearns(small):
    model, X, y = small
    with pytest.raises(NotFittedError):
        CgInfluence(model).score(X, y)
