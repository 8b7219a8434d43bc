"""Curvature products against explicit matrices, on every product path.

Hessian references are ``torch.func.hessian`` of the mean loss in the flat
trainable parameters; Gauss-Newton references are ``J^T H J`` with ``J`` the
Jacobian of all outputs in the flat parameters and ``H`` the Hessian of the
mean loss in all outputs (``torch.func.hessian`` too), so no reference shares
a code path with the products under test.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev

from skinfl import _curvature
from skinfl._curvature import CurvatureOperator
from skinfl._data import DataSource, TargetSpec
from skinfl._model import FunctionalModel, LossSpec, evaluation_copy


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    pass


def operator(model, X, y, loss, second_order, batch_size=1000):
    """The CurvatureOperator a fitted estimator would build, assembled from its parts."""
    spec = LossSpec.resolve(loss)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    output_shape = tuple(model(X[:1]).shape[1:])
    data = DataSource(X, y, input_dtype=X.dtype, device="cpu", targets=TargetSpec(spec, output_shape, X.dtype))
    fmodel = FunctionalModel(evaluation_copy(model, torch.device("cpu")), spec.fitted(data.iter_targets()), trainable)
    return CurvatureOperator(fmodel, data, second_order, batch_size)


def _trainable_function(model, function):
    """``function(outputs)`` of the model's outputs, as a function of the flat trainable parameters."""
    named = dict(model.named_parameters())
    names = [name for name, p in named.items() if p.requires_grad]
    flat = torch.cat([named[name].detach().reshape(-1) for name in names])

    def of_flat(vector):
        params, start = {}, 0
        for name in names:
            size = named[name].numel()
            params[name] = vector[start:start + size].reshape(named[name].shape)
            start += size
        return function(params)

    return of_flat, flat


def explicit_hessian(model, X, y, loss_fn):
    of_flat, flat = _trainable_function(model, lambda params: loss_fn(functional_call(model, params, (X,)), y))
    return hessian(of_flat)(flat)


def explicit_gauss_newton(model, X, y, loss_fn):
    outputs, flat = _trainable_function(model, lambda params: functional_call(model, params, (X,)))
    output = outputs(flat).detach()
    jacobian = jacrev(outputs)(flat).reshape(output.numel(), -1)
    output_hessian = hessian(lambda o: loss_fn(o.reshape(output.shape), y))(output.reshape(-1))
    return jacobian.T @ output_hessian @ jacobian


def assert_products(op, expected, rtol, atol):
    """``matmat`` in several vector blocks and ``dense`` in one equal ``expected``.

    Give ``op`` a ``batch_size`` under the number of samples, so that every
    product also runs in several sub-batches of samples.
    """
    n_params = len(expected)
    assert op.n_params == n_params
    vectors = torch.randn(7, n_params, dtype=expected.dtype, generator=torch.Generator().manual_seed(0))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_curvature, "_MAX_VECTOR_BLOCK", 3)
        patch.setattr(_curvature, "_MIN_VECTOR_BLOCK", 2)
        torch.testing.assert_close(op.matmat(vectors), vectors @ expected, rtol=rtol, atol=atol)
    torch.testing.assert_close(op.dense(torch.float64), expected.double(), rtol=rtol, atol=atol)


def mlp(dtype, n_in=4, n_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 5), nn.Tanh(), nn.Linear(5, n_out)).to(dtype)


def cnn(dtype, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
        nn.Linear(2 * 3 * 3, 3),
    ).to(dtype)


TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-4, atol=2e-5)}


def classification_data(dtype, n=23, shape=(4,), n_classes=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, *shape, generator=generator, dtype=dtype)
    return X, torch.randint(0, n_classes, (n,), generator=generator)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("second_order", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("architecture", ["mlp", "cnn"])
def test_products_equal_the_explicit_matrix(architecture, second_order, dtype):
    if architecture == "mlp":
        model = mlp(dtype)
        X, y = classification_data(dtype)
    else:
        model = cnn(dtype)
        X, y = classification_data(dtype, shape=(1, 6, 6))
    explicit = explicit_hessian if second_order == "hessian" else explicit_gauss_newton
    expected = explicit(model, X, y, nn.functional.cross_entropy)
    assert_products(operator(model, X, y, "cross_entropy", second_order, batch_size=9), expected, **TOLERANCES[dtype])


@pytest.mark.parametrize("second_order", ["hessian", "gauss_newton"])
def test_frozen_parameters_are_left_out_of_the_products(second_order):
    model = mlp(torch.float64)
    model[0].weight.requires_grad_(False)
    X, y = classification_data(torch.float64)
    explicit = explicit_hessian if second_order == "hessian" else explicit_gauss_newton
    expected = explicit(model, X, y, nn.functional.cross_entropy)
    assert len(expected) == 5 + 5 * 3 + 3
    assert_products(operator(model, X, y, "cross_entropy", second_order, batch_size=9), expected,
                    **TOLERANCES[torch.float64])


def _regression_data(n=19, n_out=2, seed=3, probabilities=False):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    y = torch.rand(n, n_out, generator=generator, dtype=torch.float64)
    return X, (y if probabilities else 3 * y - 1)


def _custom_loss(output, target):
    return torch.nn.functional.smooth_l1_loss(output, target, beta=0.5) + (output ** 4).mean()


# Each built-in loss has its own closed-form output Hessian; the custom loss takes the generic path.
LOSSES = {
    "cross_entropy": (lambda: "cross_entropy", nn.functional.cross_entropy, "labels"),
    "weighted_smoothed_cross_entropy": (
        lambda: nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), label_smoothing=0.2),
        nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64), label_smoothing=0.2),
        "labels",
    ),
    "cross_entropy_ignoring_a_class": (lambda: nn.CrossEntropyLoss(ignore_index=1), nn.CrossEntropyLoss(ignore_index=1),
                                       "labels"),
    "mse": (lambda: "mse", nn.functional.mse_loss, "values"),
    "bce_with_pos_weight": (
        lambda: nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 0.5], dtype=torch.float64)),
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([3.0, 0.5], dtype=torch.float64)),
        "probabilities",
    ),
    "custom": (lambda: _custom_loss, _custom_loss, "values"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_gauss_newton_of_every_loss_equals_the_explicit_matrix(name):
    make_loss, loss_fn, targets = LOSSES[name]
    if targets == "labels":
        model = mlp(torch.float64)
        X, y = classification_data(torch.float64)
    else:
        model = mlp(torch.float64, n_out=2)
        X, y = _regression_data(probabilities=targets == "probabilities")
    expected = explicit_gauss_newton(model, X, y, loss_fn)
    assert_products(operator(model, X, y, make_loss(), "gauss_newton", batch_size=8), expected,
                    **TOLERANCES[torch.float64])


def test_products_do_not_depend_on_the_layout_of_the_vectors():
    model = mlp(torch.float64)
    X, y = classification_data(torch.float64)
    op = operator(model, X, y, "cross_entropy", "hessian", batch_size=9)
    vectors = torch.randn(op.n_params, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).T
    assert not vectors.is_contiguous()
    torch.testing.assert_close(op.matmat(vectors), op.matmat(vectors.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("block", [1, 3, 4, 7, 1024])
def test_symmetrize_averages_the_matrix_with_its_transpose_in_any_blocking(block):
    """``symmetrize_`` in blocks (pairs of off-diagonal blocks and the diagonal ones) is ``(M + M^T) / 2``."""
    from skinfl._curvature import symmetrize_

    matrix = torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = (matrix + matrix.T) / 2
    result = symmetrize_(matrix.clone(), block=block)
    assert torch.equal(result, expected)  # the same sums, in the same order: bit for bit


@pytest.mark.parametrize("second_order", ["hessian", "gauss_newton"])
def test_dense_curvature_is_exactly_symmetric(second_order):
    # Reverse-over-reverse products are symmetric only up to rounding; the dense matrix is symmetrised, so
    # that factorisations and eigendecompositions see a symmetric matrix bit for bit.
    model = cnn(torch.float64)
    X, y = classification_data(torch.float64, shape=(1, 6, 6))
    dense = operator(model, X, y, "cross_entropy", second_order, batch_size=9).dense(torch.float64)
    assert torch.equal(dense, dense.T)
