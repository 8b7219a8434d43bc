"""GPU behaviour: run whenever CUDA is available, skipped otherwise."""

import io

import joblib
import numpy as np
import pytest
import torch

from skinfl import CgInfluence, DirectInfluence

pytestmark = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def problem():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()
    X = torch.randn(80, 6, dtype=torch.float64)
    y = torch.arange(80) % 3
    return model, X, y


@requires_cuda
@pytest.mark.parametrize("cls", [DirectInfluence, CgInfluence])
def test_cuda_matches_cpu(cls):
    model, X, y = problem()
    kwargs = {"regularization": 0.1} if cls is DirectInfluence else {"regularization": 0.1, "rtol": 1e-10, "random_state": 0}
    cpu = cls(model, **kwargs).fit(X, y)
    gpu = cls(model, device="cuda", **kwargs).fit(X, y)
    assert gpu.device_.type == "cuda"
    on_gpu = gpu.influences(X[:5].cuda(), y[:5].cuda())
    assert on_gpu.device.type == "cuda"  # torch in, torch out on the estimator's device
    torch.testing.assert_close(on_gpu.cpu(), cpu.influences(X[:5], y[:5]), rtol=1e-7, atol=1e-9)
    assert isinstance(gpu.influences(X[:5].numpy(), y[:5].numpy()), np.ndarray)


@requires_cuda
def test_model_on_cuda_is_used_where_it_is_and_pickles():
    model, X, y = problem()
    est = DirectInfluence(model.cuda(), regularization=0.1).fit(X, y)
    assert est.device_.type == "cuda"
    buffer = io.BytesIO()
    joblib.dump(est, buffer)
    buffer.seek(0)
    loaded = joblib.load(buffer)
    assert loaded.device_.type == "cuda"
    assert np.array_equal(loaded.influences(X[:3].numpy(), y[:3].numpy()), est.influences(X[:3].numpy(), y[:3].numpy()))
