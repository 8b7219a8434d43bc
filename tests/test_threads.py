"""One fitted estimator used from several threads at once (a dask worker with several threads, a thread
pool), and estimators fitted in several threads at once: every call gives what it gives alone.

torch.func's ``functional_call`` puts other tensors in a module's place for the duration of a call, so each
thread computes with a module of its own (:mod:`skinfl._threads`); torch's forward-mode differentiation
takes turns between threads.
"""

import copy
import pickle
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import registry_estimator, train
from sklearn.base import clone
from torch import nn

import skinfl

NAMES = list(skinfl.registered_estimators())
N_THREADS = 4
ROUNDS = 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem():
    """A trained 4-8-3 float64 MLP, 60 training points and 12 test points."""
    generator = torch.Generator().manual_seed(3)
    X = torch.randn(72, 4, generator=generator, dtype=torch.float64)
    y = (X[:, 0] + X[:, 1] ** 2 > 1).long() + (X[:, 2] > 0.5).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    train(model, X[:60], y[:60], F.cross_entropy, steps=100, weight_decay=1e-3)
    return model, X[:60], y[:60], X[60:], y[60:]


def calls(est, X, y, X_test, y_test):
    """The calls the threads make, by name: each takes gradients and solves."""
    return {
        "influences": lambda: est.influences(X_test, y_test),
        "influences of given points": lambda: est.influences(X_test, None, X[:20], y[:20]),
        "self_influence": lambda: est.self_influence(X_test, y_test),
        "transform": lambda: est.transform(X[:10], y[:10]),
        "top_influences": lambda: est.top_influences(X_test[:4], y_test[:4], k=3, which="both"),
        "score": lambda: est.score(X_test, y_test),  # curvature products over the held-out points
    }


def in_threads(named, n_threads=N_THREADS, rounds=ROUNDS):
    """``[(name, result)]`` of every call of ``named`` ``rounds`` times over, ``n_threads`` threads at a time,
    while this thread makes each call once."""
    order = [key for _ in range(rounds) for key in named]
    with ThreadPoolExecutor(n_threads) as pool:
        futures = [pool.submit(lambda key=key: (key, named[key]())) for key in order]
        results = [(key, call()) for key, call in named.items()]
        return results + [future.result() for future in futures]


@pytest.mark.parametrize("name", NAMES)
def test_concurrent_calls_equal_sequential_ones(problem, name):
    model, X, y, X_test, y_test = problem
    est = registry_estimator(name, model).fit(X, y)
    named = calls(est, X, y, X_test, y_test)
    expected = {key: call() for key, call in named.items()}
    # The other threads compute with modules of their own while this one, which fitted the estimator,
    # computes with the module the estimator holds.
    for key, value in in_threads(named):
        torch.testing.assert_close(value, expected[key], rtol=1e-10, atol=1e-12, msg=f"{name}: {key}")
    # ...which no thread has changed.
    for parameter, original in zip(est.model_.parameters(), model.parameters()):
        assert type(parameter) is nn.Parameter
        torch.testing.assert_close(parameter, original, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_estimators_fitted_in_threads_at_once_equal_one_fitted_alone(problem, name):
    """Fits run in threads at once (a search with joblib's threading backend): EK-FAC's hooks, the
    preconditioners' curvature products and forward-mode derivatives all run concurrently."""
    model, X, y, X_test, y_test = problem
    est = registry_estimator(name, model)
    expected = clone(est).fit(X, y).influences(X_test, y_test)
    with ThreadPoolExecutor(N_THREADS) as pool:
        fitted = list(pool.map(lambda _: clone(est).fit(X, y), range(N_THREADS)))
        results = list(pool.map(lambda each: each.influences(X_test, y_test), fitted))
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)


def test_each_thread_computes_with_a_module_of_its_own(problem):
    model, X, y, _, _ = problem
    est = registry_estimator("CgInfluence", model).fit(X, y)
    assert est._functional_model().module is est.model_  # the fitting thread: the estimator's own

    def modules():
        return est._functional_model().module, est._functional_model().module

    with ThreadPoolExecutor(2) as pool:
        barrier = threading.Barrier(2)  # both threads alive at once: two threads, not one reused
        pairs = list(pool.map(lambda _: (barrier.wait(), modules())[1], range(2)))
    (first, again), (second, _) = pairs
    assert first is again  # made once per thread
    assert first is not est.model_ and second is not est.model_ and first is not second
    for private in (first, second):  # sharing the estimator's tensors: no memory per thread
        for mine, theirs in zip(private.parameters(), est.model_.parameters()):
            assert mine is theirs

    old = est.model_
    est.fit(X, y)  # a refit: another model, other copies
    assert est.model_ is not old
    with ThreadPoolExecutor(1) as pool:
        private = pool.submit(lambda: est._functional_model().module).result()
    assert private is not first and private is not est.model_
    assert next(private.parameters()) is next(est.model_.parameters())


@pytest.mark.parametrize("name", ["EkfacInfluence", "CgInfluence"])
def test_unpickled_cloned_and_loaded_estimators_serve_threads(problem, name, tmp_path):
    """Nothing about threads is pickled, saved or cloned: each copy of an estimator has its own module and
    serves threads as the original does."""
    model, X, y, X_test, y_test = problem
    extra = {"preconditioner": "ekfac"} if name == "CgInfluence" else {}  # Kronecker plans held either way
    est = registry_estimator(name, model, **extra).fit(X, y)
    expected = est.influences(X_test, y_test)
    with ThreadPoolExecutor(2) as pool:  # the estimator has served threads before it is copied
        list(pool.map(lambda _: est.influences(X_test, y_test), range(2)))
    skinfl.save(est, tmp_path / "est.skinfl")
    copies = [pickle.loads(pickle.dumps(est)), copy.deepcopy(est), skinfl.load(tmp_path / "est.skinfl", model),
              clone(est).fit(X, y)]
    for each in copies:
        assert each.model_ is not est.model_
        for key, value in in_threads({"influences": lambda each=each: each.influences(X_test, y_test)}):
            torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


def test_concurrent_summaries_are_those_of_one_call(problem):
    """``n_iter_`` and ``relative_residuals_`` are those of one call, whichever thread finished last."""
    model, X, y, X_test, y_test = problem
    est = registry_estimator("CgInfluence", model, solver="independent").fit(X, y)
    sizes = (1, 3, 7, 12)
    alone = {}
    for size in sizes:
        est.transform(X_test[:size], y_test[:size])
        alone[size] = (est.n_iter_, est.relative_residuals_)
    with ThreadPoolExecutor(N_THREADS) as pool:
        list(pool.map(lambda size: est.transform(X_test[:size], y_test[:size]), sizes * ROUNDS))
    summary = dict(est._last_solve)
    n_iter, residuals = alone[len(summary["relative_residuals"])]
    assert summary["n_iter"] == n_iter
    torch.testing.assert_close(summary["relative_residuals"], residuals)


@pytest.mark.filterwarnings("ignore:X does not have valid feature names")
def test_feature_name_warnings_in_threads_leave_warning_filters_alone(problem):
    """The feature-name check catches scikit-learn's warnings to raise them at the user's line: threads
    doing so at once must not leave the process's warning filters changed."""
    model, X, y, X_test, y_test = problem
    frame = pd.DataFrame(X.numpy(), columns=["a", "b", "c", "d"])
    est = registry_estimator("DirectInfluence", model).fit(frame, y.numpy())
    filters, showwarning = list(warnings.filters), warnings.showwarning
    with ThreadPoolExecutor(N_THREADS) as pool:
        list(pool.map(lambda _: est.self_influence(X_test.numpy(), y_test.numpy()), range(4 * N_THREADS)))
    assert warnings.filters == filters
    assert warnings.showwarning is showwarning
    with pytest.warns(UserWarning, match="does not have valid feature names"):
        values = est.self_influence(X_test.numpy(), y_test.numpy())
    assert np.all(np.isfinite(values))
