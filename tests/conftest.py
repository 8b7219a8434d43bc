"""Shared fixtures: small float64 problems with exact references, and the estimator registry."""

import os

import numpy as np
import pytest
import torch
from registry import check_of, flat_params, reference_gradients, reference_hessian, unflatten  # noqa: F401
from torch import nn


def _share_the_cores_between_workers():
    """Under pytest-xdist (``-n``), each worker's torch, and the examples it runs in subprocesses, take
    their share of the cores: more threads than cores stall the tiny models of the suite."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores_between_workers()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: intra-op threads only add synchronisation
    there, and on a busy machine they stall (5 to 50 times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact_cases(second_orders=("hessian", "gauss_newton"), inverts_curvature=True):
    """(estimator class, second_order) for every registered estimator and curvature it supports; by default
    only those whose reference is the exact inverse of the curvature (``None``: all)."""
    from skinfl import registered_estimators

    return [
        pytest.param(cls, order, id=f"{name}-{order}")
        for name, cls in registered_estimators().items()
        for order in second_orders
        if order in check_of(cls).second_order
        and (inverts_curvature is None or check_of(cls).inverts_curvature == inverts_curvature)
    ]


def exact_classes(second_order="hessian"):
    """Every registered estimator class that supports ``second_order`` and inverts the exact curvature."""
    from skinfl import registered_estimators

    return [pytest.param(cls, id=name) for name, cls in registered_estimators().items()
            if second_order in check_of(cls).second_order and check_of(cls).inverts_curvature]


def _with_full_rank(cls, model, params):
    check = check_of(cls)
    params = dict(params)
    if check.full_rank is not None:
        params[check.full_rank] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return params


def exact_params(cls, model):
    """The parameters under which ``cls`` is exact on ``model`` (a full rank set to its size)."""
    return _with_full_rank(cls, model, check_of(cls).params)


def quick_params(cls, model):
    """The registry's cheaper, deterministic parameters of ``cls`` (for tests comparing it with itself)."""
    check = check_of(cls)
    return _with_full_rank(cls, model, check.params if check.quick_params is None else check.quick_params)


def exact_estimator(cls, model, **params):
    """``cls`` configured as its registry entry says it is exact, with ``params`` on top."""
    return cls(model, **{**exact_params(cls, model), **params})


def registry_estimator(name, model, exact=False, **params):
    """Registered estimator ``name`` on the Gauss-Newton curvature where it supports it, seeded, with
    regularization 0.1: positive definite for any model and any subset of data, so every solver is well
    posed and iterative ones converge in a few iterations. With its quick parameters (for tests that
    compare an estimator with itself), or its exact ones with ``exact=True``.
    """
    from skinfl import registered_estimators

    cls = registered_estimators()[name]
    modes = check_of(cls).second_order
    settings = dict(regularization=0.1, random_state=0,
                    **(exact_params(cls, model) if exact else quick_params(cls, model)),
                    second_order="gauss_newton" if "gauss_newton" in modes else modes[0])
    settings.update(params)
    return cls(model, **settings)


def mlp(n_in=4, n_hidden=5, n_out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, n_hidden), nn.Tanh(), nn.Linear(n_hidden, n_out)).double()


def train(model, X, y, loss_fn, steps=300, lr=0.05, weight_decay=0.0):
    """Full-batch LBFGS to a tight minimum (so the Hessian is positive definite)."""
    optimizer = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=steps, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = loss_fn(model(X), y)
        if weight_decay:
            value = value + weight_decay * sum((p**2).sum() for p in model.parameters())
        value.backward()
        return value

    optimizer.step(closure)
    return model


@pytest.fixture(scope="session")
def classification_problem():
    """A trained float64 MLP on 3-class data, with an L2 penalty so H is positive definite."""
    generator = torch.Generator().manual_seed(1)
    X = torch.randn(60, 4, generator=generator, dtype=torch.float64)
    y = (X[:, 0] + X[:, 1] ** 2 > 1).long() + (X[:, 2] > 0.5).long()
    model = train(mlp(), X, y, torch.nn.functional.cross_entropy, steps=100, weight_decay=1e-3)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model, X, y


@pytest.fixture(scope="session")
def linear_regression():
    """Least squares with a known closed-form Hessian H = 2 X^T X / n (torch's MSE)."""
    rng = np.random.default_rng(0)
    n, d = 80, 4
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=(d, 1)) + 0.3 * rng.normal(size=(n, 1))
    weights = np.linalg.lstsq(X, y, rcond=None)[0]
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weights.T))
    return model, X, y, weights
