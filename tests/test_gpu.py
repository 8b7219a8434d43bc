"""GPU behaviour: run whenever CUDA is available, skipped otherwise."""

import io

import joblib
import numpy as np
import pytest
import torch
from conftest import exact_classes, exact_estimator

import skinfl

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    X = torch.randn(80, 6, dtype=torch.float64)
    y = torch.arange(80) % 3
    return model, X, y


@requires_cuda
@pytest.mark.parametrize("cls", exact_classes())
def test_cuda_matches_cpu(cls):
    model, X, y = problem()
    cpu = exact_estimator(cls, model, regularization=0.1, random_state=0).fit(X, y)
    gpu = exact_estimator(cls, model, regularization=0.1, random_state=0, device="cuda").fit(X, y)
    assert gpu.device_.type == "cuda"
    on_gpu = gpu.influences(X[:5].cuda(), y[:5].cuda())
    assert on_gpu.device.type == "cuda"  # torch in, torch out on the estimator's device
    torch.testing.assert_close(on_gpu.cpu(), cpu.influences(X[:5], y[:5]), rtol=1e-7, atol=1e-9)
    assert isinstance(gpu.influences(X[:5].numpy(), y[:5].numpy()), np.ndarray)
    indices, values = gpu.top_influences(X[:5].numpy(), y[:5].numpy(), k=3, which="both")
    expected_indices, expected_values = cpu.top_influences(X[:5].numpy(), y[:5].numpy(), k=3, which="both")
    assert np.array_equal(indices, expected_indices)
    np.testing.assert_allclose(values, expected_values, rtol=1e-7)
    np.testing.assert_allclose(gpu.self_influence(X.numpy(), y.numpy()), cpu.self_influence(X.numpy(), y.numpy()),
                               rtol=1e-7)


@requires_cuda
@pytest.mark.parametrize("cls", exact_classes())
def test_data_on_the_host_is_streamed_not_copied(cls, tmp_path):
    """A numpy memmap stays on disk; batches are moved to the GPU as they are needed."""
    model, X, y = problem()
    path = tmp_path / "X.npy"
    np.save(path, X.numpy())
    memmap = np.load(path, mmap_mode="r")
    est = exact_estimator(cls, model.cuda(), regularization=0.1, random_state=0).fit(memmap, y.numpy())
    assert est._fit_data.X is memmap and est.device_.type == "cuda"
    reference = exact_estimator(cls, model.cpu(), regularization=0.1, random_state=0).fit(X, y)
    np.testing.assert_allclose(est.influences(X[:3].numpy(), y[:3].numpy()),
                               reference.influences(X[:3], y[:3]).numpy(), rtol=1e-7, atol=1e-9)


@requires_cuda
@pytest.mark.parametrize("cls", exact_classes())
def test_model_on_cuda_is_used_where_it_is_and_saves(cls, tmp_path):
    model, X, y = problem()
    est = exact_estimator(cls, model.cuda(), regularization=0.1, random_state=0).fit(X, y)
    assert est.device_.type == "cuda"
    buffer = io.BytesIO()
    joblib.dump(est, buffer)
    buffer.seek(0)
    loaded = joblib.load(buffer)
    assert loaded.device_.type == "cuda"
    assert np.array_equal(loaded.influences(X[:3].numpy(), y[:3].numpy()), est.influences(X[:3].numpy(), y[:3].numpy()))
    skinfl.save(est, tmp_path / "est.skinfl")
    safe = skinfl.load(tmp_path / "est.skinfl", model)
    assert safe.device_.type == "cuda"
    assert np.array_equal(safe.influences(X[:3].numpy(), y[:3].numpy()), est.influences(X[:3].numpy(), y[:3].numpy()))
