"""DataInfInfluence (DataInf) against its closed form, built from looped per-sample gradients.

The estimator never equals the inverse of the curvature (it is left out of
the registry's exactness tests); it must equal, to rounding, the
block-diagonal matrix ``(1/n) sum_i (g_il g_il^T + lambda_l I)^-1`` with each
term inverted explicitly here.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import reference_gradients
from torch import nn

from skinfl import DirectInfluence, DataInfInfluence, load, save

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Spans of the 43 parameters of conftest's 4-5-3 MLP for each block structure.
MLP_SPANS = {
    "layer": [slice(0, 25), slice(25, 43)],
    "parameter": [slice(0, 20), slice(20, 25), slice(25, 40), slice(40, 43)],
    "full": [slice(0, 43)],
}
MLP_BLOCKS = {
    "layer": [("0", ("0.weight", "0.bias"), 25), ("2", ("2.weight", "2.bias"), 18)],
    "parameter": [("0", ("0.weight",), 20), ("0", ("0.bias",), 5), ("2", ("2.weight",), 15),
                  ("2", ("2.bias",), 3)],
    "full": [("", ("0.weight", "0.bias", "2.weight", "2.bias"), 43)],
}
TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def harmonic_mean_matrix(gradients, spans, regularizations):
    """Block-diagonal ``(1/n) sum_i (g_il g_il^T + lambda_l I)^-1``, every term inverted explicitly."""
    n_params = gradients.shape[1]
    matrix = torch.zeros(n_params, n_params, dtype=torch.float64)
    for span, regularization in zip(spans, regularizations):
        block = gradients[:, span]
        identity = torch.eye(block.shape[1], dtype=torch.float64)
        terms = [torch.linalg.inv(torch.outer(g, g) + regularization * identity) for g in block]
        matrix[span, span] = torch.stack(terms).mean(dim=0)
    return matrix


def block_fisher_inverse(gradients, spans, regularization):
    """Block-diagonal ``(G_l + lambda I)^-1`` with ``G_l`` the block's empirical Fisher (the inverse DataInf
    approximates)."""
    n_params = gradients.shape[1]
    matrix = torch.zeros(n_params, n_params, dtype=torch.float64)
    for span in spans:
        block = gradients[:, span]
        fisher = block.T @ block / len(block)
        identity = torch.eye(block.shape[1], dtype=torch.float64)
        matrix[span, span] = torch.linalg.inv(fisher + regularization * identity)
    return matrix


@pytest.fixture(scope="module")
def mlp_problem(classification_problem):
    """The 43-parameter MLP, its training set, held-out points, and per-sample gradients of both."""
    model, X, y = classification_problem
    generator = torch.Generator().manual_seed(5)
    X_test = torch.randn(7, 4, generator=generator, dtype=torch.float64)
    y_test = torch.arange(7) % 3
    gradients = reference_gradients(model, X, y, F.cross_entropy)
    test_gradients = reference_gradients(model, X_test, y_test, F.cross_entropy)
    return model, X, y, X_test, y_test, gradients, test_gradients


@pytest.mark.parametrize("block_structure", ["layer", "parameter", "full"])
def test_mlp_equals_the_explicit_harmonic_mean(mlp_problem, block_structure):
    model, X, y, X_test, y_test, G, G_test = mlp_problem
    regularization = 0.05
    est = DataInfInfluence(model, regularization=regularization,
                                       block_structure=block_structure).fit(X, y)
    spans = MLP_SPANS[block_structure]
    M = harmonic_mean_matrix(G, spans, [regularization] * len(spans))

    assert est.blocks_ == MLP_BLOCKS[block_structure]
    assert est.block_fisher_traces_ is None  # computed only for relative_regularization
    assert_close(est.block_regularization_, torch.full((len(spans),), regularization, dtype=torch.float64))
    assert_close(est.transform(X_test, y_test), G_test @ M)
    assert_close(est.influences(X_test, y_test), G_test @ M @ G.T)
    assert_close(est.self_influence(X_test, y_test), ((G_test @ M) * G_test).sum(dim=1))
    # More test points than training points inverts on the training side: the same matrix.
    assert_close(est.influences(X, y, X_test, y_test), G @ M @ G_test.T)


def test_influences_against_other_labelled_data(mlp_problem):
    model, X, y, X_test, y_test, G, G_test = mlp_problem
    X_other, y_other = X_test[:3] * 2, torch.tensor([2, 0, 1])
    G_other = reference_gradients(model, X_other, y_other, F.cross_entropy)
    est = DataInfInfluence(model, regularization=0.05).fit(X[:40], y[:40])
    M = harmonic_mean_matrix(G[:40], MLP_SPANS["layer"], [0.05, 0.05])  # always over the fitted data
    assert_close(est.influences(X_test, y_test, X_other, y_other), G_test @ M @ G_other.T)


@pytest.mark.parametrize("block_structure", ["layer", "full"])
def test_linear_regression_equals_the_explicit_harmonic_mean(linear_regression, block_structure):
    model, X, y, _ = linear_regression
    X, y = torch.tensor(X), torch.tensor(y)
    G = reference_gradients(model, X, y, F.mse_loss)
    # Closed form of the least-squares gradient, 2 (x.w - y) x: the reference gradients are right.
    torch.testing.assert_close(G, 2 * (X @ model.weight.detach().T - y) * X)
    est = DataInfInfluence(model, loss="mse", regularization=0.3,
                                       block_structure=block_structure).fit(X[:60], y[:60])
    assert est.blocks_ == [("", ("weight",), 4)]  # a bare Linear is the root module: one block either way
    M = harmonic_mean_matrix(G[:60], [slice(0, 4)], [0.3])
    assert_close(est.transform(X[60:], y[60:]), G[60:] @ M)
    assert_close(est.influences(X[60:], y[60:]), G[60:] @ M @ G[:60].T)
    assert_close(est.self_influence(X[60:], y[60:]), ((G[60:] @ M) * G[60:]).sum(dim=1))


@pytest.mark.parametrize("block_structure", ["layer", "parameter", "full"])
def test_one_training_point_gives_the_exact_block_inverse(mlp_problem, block_structure):
    """With n = 1 there is nothing to swap: Sherman-Morrison inverts ``g g^T + lambda I`` exactly."""
    model, X, y, X_test, y_test, G, G_test = mlp_problem
    est = DataInfInfluence(model, regularization=0.02,
                                       block_structure=block_structure).fit(X[:1], y[:1])
    exact = block_fisher_inverse(G[:1], MLP_SPANS[block_structure], 0.02)
    assert_close(est.transform(X_test, y_test), G_test @ exact)


def test_the_swap_error_shrinks_as_regularization_grows(mlp_problem):
    """Against ``(G_l + lambda I)^-1``, the inverse it approximates, the relative error falls with lambda."""
    model, X, y, X_test, y_test, G, G_test = mlp_problem
    errors = []
    for regularization in (1e-3, 1e-1, 1e1):
        est = DataInfInfluence(model, regularization=regularization).fit(X, y)
        exact = G_test @ block_fisher_inverse(G, MLP_SPANS["layer"], regularization)
        errors.append(float((est.transform(X_test, y_test) - exact).norm() / exact.norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2


def test_relative_regularization_scales_each_block(mlp_problem):
    model, X, y, X_test, y_test, G, G_test = mlp_problem
    est = DataInfInfluence(model, regularization=0.1, relative_regularization=True,
                                       block_structure="parameter").fit(X, y)
    spans = MLP_SPANS["parameter"]
    # DataInf's lambda_l: 0.1 times the mean over samples and parameters of the squared gradient.
    expected = [0.1 * float((G[:, span] ** 2).mean()) for span in spans]
    traces = [float((G[:, span] ** 2).sum(dim=1).mean()) for span in spans]
    assert_close(est.block_fisher_traces_, torch.tensor(traces, dtype=torch.float64))
    assert_close(est.block_regularization_, torch.tensor(expected, dtype=torch.float64))
    assert len(set(expected)) == len(expected)  # the blocks really differ
    M = harmonic_mean_matrix(G, spans, expected)
    assert_close(est.influences(X_test, y_test), G_test @ M @ G.T)
    # The same norms give the coarser blocks their traces.
    layer = DataInfInfluence(model, regularization=0.1, relative_regularization=True).fit(X, y)
    expected = [0.1 * float((G[:, span] ** 2).mean()) for span in MLP_SPANS["layer"]]
    assert_close(layer.block_regularization_, torch.tensor(expected, dtype=torch.float64))


def test_relative_regularization_of_a_block_no_gradient_reaches():
    """Dead ReLU units: the first layer has zero gradients and takes the model-wide scale."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    X = torch.randn(30, 4, dtype=torch.float64)
    y = torch.arange(30) % 3
    G = reference_gradients(model, X, y, F.cross_entropy)
    assert float(G[:, :25].abs().max()) == 0.0
    est = DataInfInfluence(model, regularization=0.5, relative_regularization=True).fit(X, y)
    overall = 0.5 * float((G**2).sum(dim=1).mean()) / 43
    expected = [overall, 0.5 * float((G[:, 25:] ** 2).mean())]
    assert_close(est.block_regularization_, torch.tensor(expected, dtype=torch.float64))
    assert torch.isfinite(est.transform(X[:3], y[:3])).all()

    still = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        still.weight.zero_()
    zeros = torch.zeros(30, 1, dtype=torch.float64)  # the model's own output: no loss, no gradient
    with pytest.raises(ValueError, match="Every training gradient is zero"):
        DataInfInfluence(still, loss="mse", relative_regularization=True).fit(X, zeros)


@pytest.mark.parametrize("block_structure", ["layer", "full"])
def test_results_do_not_depend_on_batch_size(mlp_problem, block_structure):
    model, X, y, X_test, y_test, _, _ = mlp_problem
    results = [
        DataInfInfluence(model, regularization=0.05, relative_regularization=True,
                                     block_structure=block_structure, batch_size=batch_size)
        .fit(X, y).influences(X_test, y_test)
        for batch_size in (1, 7, 60, 1000)
    ]
    for other in results[1:]:
        assert_close(other, results[0])


def test_errors_name_the_fix(mlp_problem):
    model, X, y, *_ = mlp_problem
    assert DataInfInfluence(model).second_order == "gauss_newton"
    with pytest.raises(ValueError, match="second_order='hessian'") as error:
        DataInfInfluence(model, second_order="hessian").fit(X, y)
    for part in ("Gauss-Newton", "second_order='gauss_newton'", "DirectInfluence", "CgInfluence"):
        assert part in str(error.value)
    with pytest.raises(ValueError, match="needs regularization > 0"):
        DataInfInfluence(model, regularization=0).fit(X, y)
    with pytest.raises(ValueError, match="'regularization' parameter"):
        DataInfInfluence(model, regularization=-1.0).fit(X, y)
    with pytest.raises(ValueError, match="'block_structure' parameter"):
        DataInfInfluence(model, block_structure="module").fit(X, y)


def test_score_is_the_held_out_residual_of_this_inverse(linear_regression):
    """The shared score, with this estimator's inverse: ``-mean ||C_val u - g||^2 / ||g||^2``."""
    model, X, y, _ = linear_regression
    X, y = torch.tensor(X), torch.tensor(y)
    G = reference_gradients(model, X, y, F.mse_loss)
    est = DataInfInfluence(model, loss="mse", regularization=0.3).fit(X[:60], y[:60])
    U = G[60:] @ harmonic_mean_matrix(G[:60], [slice(0, 4)], [0.3])
    curvature = 2 * X[60:].T @ X[60:] / 20  # Gauss-Newton (= Hessian) of the held-out squared error
    expected = -float((((U @ curvature - G[60:]) ** 2).sum(dim=1) / (G[60:] ** 2).sum(dim=1)).mean())
    assert est.score(X[60:], y[60:]) == pytest.approx(expected, rel=1e-10)


def test_relative_regularization_factors_are_cached_across_regularization_and_blocks(mlp_problem, tmp_path,
                                                                                     monkeypatch):
    model, X, y, X_test, y_test, _, _ = mlp_problem
    calls = []
    original = DataInfInfluence._compute_factors

    def counting(self, curvature):
        calls.append(1)
        return original(self, curvature)

    monkeypatch.setattr(DataInfInfluence, "_compute_factors", counting)
    settings = [(0.1, "layer"), (1.0, "layer"), (0.1, "full"), (0.1, "parameter")]
    for regularization, block_structure in settings:
        params = dict(regularization=regularization, relative_regularization=True,
                      block_structure=block_structure)
        cached = DataInfInfluence(model, memory=tmp_path, **params).fit(X, y)
        fresh = DataInfInfluence(model, **params).fit(X, y)
        assert torch.equal(cached.influences(X_test, y_test), fresh.influences(X_test, y_test))
    assert len(calls) == 1 + len(settings)  # one computation with the cache, one per fresh fit


def test_relative_regularization_round_trips_without_training_data(mlp_problem, tmp_path):
    model, X, y, X_test, y_test, _, _ = mlp_problem
    est = DataInfInfluence(model, regularization=0.1, relative_regularization=True,
                                       block_structure="parameter").fit(X, y)
    loaded = load(save(est, tmp_path / "with.skinfl"), model)
    assert loaded.blocks_ == est.blocks_
    assert torch.equal(loaded.block_regularization_, est.block_regularization_)
    assert torch.equal(loaded.influences(X_test, y_test), est.influences(X_test, y_test))
    # Without the data, the fitted block scales are still there, but solving needs the training gradients.
    bare = load(save(est, tmp_path / "without.skinfl", include_data=False), model)
    assert torch.equal(bare.block_regularization_, est.block_regularization_)
    with pytest.raises(ValueError, match="saved without its training data"):
        bare.transform(X_test, y_test)


def test_frozen_layers_are_left_out(classification_problem):
    model, X, y = classification_problem
    partly_frozen = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    partly_frozen.load_state_dict(model.state_dict())
    partly_frozen[0].weight.requires_grad_(False)
    est = DataInfInfluence(partly_frozen, regularization=0.05).fit(X, y)
    assert est.blocks_ == [("0", ("0.bias",), 5), ("2", ("2.weight", "2.bias"), 18)]
    G = reference_gradients(model, X, y, F.cross_entropy)[:, 20:]  # all but the frozen weight
    M = harmonic_mean_matrix(G, [slice(0, 5), slice(5, 23)], [0.05, 0.05])
    assert_close(est.self_influence(X[:5], y[:5]), ((G[:5] @ M) * G[:5]).sum(dim=1))


def test_agrees_with_the_exact_gauss_newton_inverse_where_blocks_are_small(mlp_problem):
    """Not an identity, a sanity check: on this small model the scores largely agree with DirectInfluence."""
    model, X, y, X_test, y_test, _, _ = mlp_problem
    approximate = DataInfInfluence(model, regularization=0.1).fit(X, y).influences(X_test, y_test)
    exact = DirectInfluence(model, regularization=0.1, second_order="gauss_newton").fit(X, y)
    exact = exact.influences(X_test, y_test)
    correlation = np.corrcoef(approximate.reshape(-1).numpy(), exact.reshape(-1).numpy())[0, 1]
    assert correlation > 0.7
