"""Results do not depend on batch size, on how products are blocked, or on the order of samples."""

import pytest
import torch
import torch.nn.functional as F
from conftest import (exact_cases, exact_classes, exact_estimator, quick_params, reference_gradients, reference_hessian,
                      registry_estimator)
from registry import check_of
from test_exact import softmax_gauss_newton

from skinfl import DirectInfluence, _curvature, registered_estimators


@pytest.mark.parametrize("cls, second_order", exact_cases(inverts_curvature=None))
def test_results_do_not_depend_on_batch_size(classification_problem, cls, second_order):
    model, X, y = classification_problem
    results = [
        cls(model, **quick_params(cls, model), regularization=0.01, batch_size=batch_size, second_order=second_order)
        .fit(X, y)
        .influences(X[:4], y[:4])
        for batch_size in (5, 17, 60, 1000)
    ]
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], rtol=1e-9, atol=1e-12)


class BlockingSpy:
    """Records the (vectors per block, samples per sub-batch) every product used."""

    def __init__(self, monkeypatch):
        self.calls = []
        original = _curvature.CurvatureOperator._blocking

        def spied(operator, n_vectors):
            blocking = original(operator, n_vectors)
            self.calls.append((n_vectors, *blocking))
            return blocking

        monkeypatch.setattr(_curvature.CurvatureOperator, "_blocking", spied)


@pytest.mark.parametrize("second_order", ["hessian", "gauss_newton"])
def test_multi_block_sub_batched_products_equal_the_explicit_matrix(classification_problem, monkeypatch, second_order):
    """With a tiny working set, products run in many vector blocks and sample sub-batches."""
    model, X, y = classification_problem
    monkeypatch.setattr(_curvature, "_WORKING_SET_FLOATS", 2_000)
    monkeypatch.setattr(_curvature, "_MAX_VECTOR_BLOCK", 8)
    monkeypatch.setattr(_curvature, "_MIN_VECTOR_BLOCK", 3)
    spy = BlockingSpy(monkeypatch)
    est = DirectInfluence(model, regularization=0.01, second_order=second_order)
    operator = est.fit(X, y)._curvature()
    expected = reference_hessian(model, X, y, F.cross_entropy) if second_order == "hessian" else softmax_gauss_newton(model, X)

    torch.testing.assert_close(operator.dense(torch.float64), expected, rtol=1e-10, atol=1e-12)
    vectors = torch.randn(11, est.n_params_, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(operator.matmat(vectors), vectors @ expected, rtol=1e-10, atol=1e-12)
    # The products really were split: several vector blocks, several sub-batches of samples.
    for n_vectors, block, sub_batch in spy.calls:
        assert block < n_vectors and sub_batch < len(X)


@pytest.mark.parametrize("cls", exact_classes())
def test_every_estimator_is_exact_with_blocked_products(classification_problem, monkeypatch, cls):
    model, X, y = classification_problem
    monkeypatch.setattr(_curvature, "_WORKING_SET_FLOATS", 2_000)
    monkeypatch.setattr(_curvature, "_MAX_VECTOR_BLOCK", 8)
    monkeypatch.setattr(_curvature, "_MIN_VECTOR_BLOCK", 3)
    system = reference_hessian(model, X, y, F.cross_entropy) + 0.1 * torch.eye(43, dtype=torch.float64)
    G = reference_gradients(model, X[:9], y[:9], F.cross_entropy)
    blocked = exact_estimator(cls, model, regularization=0.1, batch_size=7).fit(X, y)
    torch.testing.assert_close(blocked.transform(X[:9], y[:9]), torch.linalg.solve(system, G.T).T,
                               rtol=check_of(cls).rtol, atol=check_of(cls).atol)


@pytest.mark.parametrize("name", list(registered_estimators()))
def test_results_do_not_depend_on_sample_order(classification_problem, name):
    model, X, y = classification_problem
    cls = registered_estimators()[name]
    order = torch.randperm(len(X), generator=torch.Generator().manual_seed(3))
    ordered = registry_estimator(name, model, regularization=0.01).fit(X, y)
    shuffled = registry_estimator(name, model, regularization=0.01).fit(X[order], y[order])
    torch.testing.assert_close(shuffled.influences(X[:4], y[:4]), ordered.influences(X[:4], y[:4])[:, order],
                               rtol=check_of(cls).rtol, atol=check_of(cls).atol)


@pytest.mark.parametrize("name", list(registered_estimators()))
def test_influences_use_smaller_side_consistently(classification_problem, name):
    """More test points than training points inverts the other side; the result is the same."""
    model, X, y = classification_problem
    cls = registered_estimators()[name]
    est = registry_estimator(name, model, regularization=0.01).fit(X, y)
    many = est.influences(X, y, X[:5], y[:5])
    few = est.influences(X[:5], y[:5], X, y)
    torch.testing.assert_close(many, few.T, rtol=check_of(cls).rtol, atol=check_of(cls).atol)


def test_per_sample_gradients_differentiated_in_pieces_are_those_of_each_sample(classification_problem,
                                                                                monkeypatch):
    # A batch whose flat gradients would pass _GRADIENT_PIECE_BYTES is differentiated a few rows at a time,
    # each piece with its own inputs and targets (here 3 rows of 43 float64 parameters per piece).
    from skinfl import _gradients

    model, X, y = classification_problem
    est = DirectInfluence(model, regularization=0.1, batch_size=10).fit(X, y)
    monkeypatch.setattr(_gradients, "_GRADIENT_PIECE_BYTES", 3 * 43 * 8)
    system = reference_hessian(model, X, y, F.cross_entropy) + 0.1 * torch.eye(43, dtype=torch.float64)
    G = reference_gradients(model, X[:10], y[:10], F.cross_entropy)
    torch.testing.assert_close(est.transform(X[:10], y[:10]), torch.linalg.solve(system, G.T).T, rtol=1e-9,
                               atol=1e-12)
    all_gradients = reference_gradients(model, X, y, F.cross_entropy)
    expected = torch.linalg.solve(system, G[:2].T).T @ all_gradients.T
    torch.testing.assert_close(est.influences(X[:2], y[:2]), expected, rtol=1e-9, atol=1e-12)
    # Without targets: the measurement, the loss at the predicted label, piece by piece too.
    predicted = model(X[:10]).argmax(dim=1)
    torch.testing.assert_close(est.transform(X[:10]), est.transform(X[:10], predicted), rtol=1e-12,
                               atol=1e-14)
