"""Dask arrays in, dask arrays out: sharded fits and lazy results on a local cluster of processes.

Every registered estimator is checked on a ``LocalCluster`` of two worker
processes with one thread each: a fit on dask arrays (uneven chunks, targets
chunked differently from the inputs) equals a fit on the same numpy arrays,
and the lazy results of every method equal the eager ones, zarr arrays in
and out included. Skipped without the ``dask`` extra.
"""

import os
import signal
import time

import numpy as np
import pytest
import torch
from conftest import registry_estimator
from test_sequences import two_input_problem

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

import dask
import sklearn
from sklearn.model_selection import GridSearchCV

from skinfl import DirectInfluence, EkfacInfluence, registered_estimators
from skinfl._shards import ShardedCurvature

NAMES = list(registered_estimators())
# Uneven row chunks for the training inputs, and others for their targets (aligned by skinfl).
TRAIN_CHUNKS, TARGET_CHUNKS = (7, 20, 33), (25, 35)
TEST_CHUNKS = ((9, 14), (2, 2))  # the test inputs are also cut along the features


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def problem(classification_problem):
    model, X, y = classification_problem
    X, y = X.numpy(), y.numpy()
    return model, X, y, X[:23] + 0.1, y[:23]


def dask_training(X, y):
    return da.from_array(X, chunks=(TRAIN_CHUNKS, -1)), da.from_array(y, chunks=(TARGET_CHUNKS,))


def dask_test(X_test, y_test):
    return da.from_array(X_test, chunks=TEST_CHUNKS), da.from_array(y_test, chunks=(TEST_CHUNKS[0],))


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_a_sharded_fit_equals_a_plain_fit(client, problem, name):
    """Each pass over dask training data runs as one task per row block; the sums equal one process's."""
    model, X, y, X_test, y_test = problem
    plain = registry_estimator(name, model).fit(X, y)
    sharded = registry_estimator(name, model).fit(*dask_training(X, y))
    curvature = sharded._curvature()
    assert isinstance(curvature, ShardedCurvature) and curvature.n_shards == len(TRAIN_CHUNKS)
    for key, tensor in plain._factors.items():
        if "vectors" in key or "sketch" in key:  # eigenvectors and sketches are compared through influences
            continue
        torch.testing.assert_close(sharded._factors[key], tensor, rtol=1e-9, atol=1e-10, msg=key)
    expected = plain.influences(X_test, y_test)
    assert_close(sharded.influences(X_test, y_test, X, y), expected)
    # Scored against its own (dask) training data, the result is lazy.
    lazy = sharded.influences(X_test, y_test)
    assert isinstance(lazy, da.Array)
    assert_close(lazy.compute(), expected)


@pytest.mark.parametrize("name", NAMES)
def test_lazy_results_equal_the_eager_ones(client, problem, name):
    model, X, y, X_test, y_test = problem
    est = registry_estimator(name, model).fit(X, y)
    Xd_test, yd_test = dask_test(X_test, y_test)
    Xd, yd = dask_training(X, y)
    results = {
        "influences": (est.influences(Xd_test, yd_test), est.influences(X_test, y_test)),
        "influences on dask training data": (est.influences(X_test, y_test, Xd, yd), est.influences(X_test, y_test)),
        "transform": (est.transform(Xd_test, yd_test), est.transform(X_test, y_test)),
        "self_influence": (est.self_influence(Xd_test, yd_test), est.self_influence(X_test, y_test)),
        "self_influence without targets": (est.self_influence(Xd_test), est.self_influence(X_test)),
    }
    with sklearn.config_context(working_memory=1e-3):  # each block of test points is a group of its own
        results["influences, one test block per group"] = (est.influences(Xd_test, yd_test, Xd, yd),
                                                           est.influences(X_test, y_test))
        assert results["influences, one test block per group"][0].numblocks == (2, len(TRAIN_CHUNKS))
        tops = est.top_influences(Xd_test, yd_test, k=4, which="both")
    for what, (lazy, eager) in results.items():
        assert isinstance(lazy, da.Array), what
        assert lazy.shape == eager.shape and lazy.dtype == eager.dtype, what
        assert_close(lazy.compute(), eager)
    expected_indices, expected_values = est.top_influences(X_test, y_test, k=4, which="both")
    for indices, values in (est.top_influences(Xd_test, yd_test, k=4, which="both"), tops):
        assert isinstance(indices, da.Array) and isinstance(values, da.Array)
        indices, values = dask.compute(indices, values)
        np.testing.assert_array_equal(indices, expected_indices)
        assert_close(values, expected_values)


@pytest.mark.parametrize("name", ["DirectInfluence", "EkfacInfluence", "CgInfluence"])
def test_lazy_removal_effects_and_normalized_influences_equal_the_eager_ones(client, problem, name):
    """Points (first order: influences / n; Newton: steps per training block on the workers) and groups
    (first order: sums per block added in a tree; Newton: steps computed when the array is built, CG products
    on the workers), and RelatIF and cosine influences, on dask test data, dask training data, or both."""
    model, X, y, X_test, y_test = problem
    est = registry_estimator(name, model).fit(X, y)
    sharded = registry_estimator(name, model).fit(*dask_training(X, y))
    Xd_test, yd_test = dask_test(X_test, y_test)
    groups = np.arange(len(X)) % 4
    cases = [({"order": "first"}, est, (Xd_test, yd_test)), ({"order": "newton"}, est, (Xd_test, yd_test)),
             ({"order": "newton"}, sharded, (X_test, y_test)),
             ({"groups": groups}, sharded, (Xd_test, yd_test)),
             ({"groups": groups, "order": "newton"}, est, (Xd_test, yd_test)),
             ({"groups": groups, "order": "newton", "solver": "cg"}, sharded, (X_test, y_test)),
             ({"order": "newton", "test_loss": "exact"}, est, (Xd_test, yd_test)),
             ({"groups": groups, "order": "newton", "test_loss": "exact"}, est, (Xd_test, yd_test))]
    for kwargs, estimator, test in cases:
        lazy = estimator.removal_effects(*test, **kwargs)
        assert isinstance(lazy, da.Array), kwargs
        assert_close(lazy.compute(), est.removal_effects(X_test, y_test, **kwargs))
    for normalize in ("relatif", "cosine"):
        lazy = sharded.influences(Xd_test, yd_test, normalize=normalize)
        assert_close(lazy.compute(), est.influences(X_test, y_test, normalize=normalize))
        indices, values = dask.compute(*sharded.top_influences(Xd_test, yd_test, k=3, normalize=normalize))
        expected_indices, expected_values = est.top_influences(X_test, y_test, k=3, normalize=normalize)
        np.testing.assert_array_equal(indices, expected_indices)
        assert_close(values, expected_values)


def test_influences_go_from_zarr_to_zarr(client, problem, tmp_path):
    """Training and test data read from zarr stores, the result written into one by the workers, in chunks
    that are not the blocks'."""
    model, X, y, X_test, y_test = problem
    stores = {}
    for name, array in {"X": X, "y": y, "X_test": X_test, "y_test": y_test}.items():
        stores[name] = zarr.create_array(str(tmp_path / f"{name}.zarr"), shape=array.shape, dtype=array.dtype,
                                         chunks=(11,) + array.shape[1:])
        stores[name][...] = array
    est = EkfacInfluence(model, regularization=0.1, random_state=0).fit(
        da.from_zarr(stores["X"]), da.from_zarr(stores["y"]))
    out = zarr.create_array(str(tmp_path / "influences.zarr"), shape=(len(X_test), len(X)), dtype="float64",
                            chunks=(5, 16))
    returned = est.influences(da.from_zarr(stores["X_test"]), da.from_zarr(stores["y_test"]), out=out)
    assert returned is out
    expected = EkfacInfluence(model, regularization=0.1, random_state=0).fit(X, y).influences(X_test, y_test)
    assert_close(out[...], expected)
    # A numpy out is filled here, a row of blocks at a time.
    into = np.zeros_like(expected)
    assert est.influences(da.from_zarr(stores["X_test"]), da.from_zarr(stores["y_test"]), out=into) is into
    assert_close(into, expected)


@pytest.mark.parametrize("cls", [DirectInfluence, EkfacInfluence])
def test_dict_inputs_of_dask_arrays(client, cls):
    model, X, y = two_input_problem(n=30)
    X = {key: value.numpy() for key, value in X.items()}
    y = y.numpy()
    plain = cls(model, regularization=0.1).fit(X, y)
    lazy_X = {"features": da.from_array(X["features"], chunks=(12, -1)),
              "extra": da.from_array(X["extra"], chunks=(8, -1))}  # aligned with the first key's rows
    sharded = cls(model, regularization=0.1).fit(lazy_X, da.from_array(y, chunks=10))
    expected = plain.influences(X, y)
    assert_close(sharded.influences(X, y, X, y), expected)
    assert_close(sharded.influences(lazy_X, y).compute(), expected)


def test_grid_search_under_the_dask_backend_equals_a_sequential_one(client, problem):
    import joblib

    model, X, y, _, _ = problem
    search = GridSearchCV(DirectInfluence(model, random_state=0), {"regularization": [0.01, 0.1, 1.0]}, cv=3)
    sequential = search.fit(X, y).cv_results_["mean_test_score"]
    with joblib.parallel_backend("dask"):
        parallel = GridSearchCV(DirectInfluence(model, random_state=0), {"regularization": [0.01, 0.1, 1.0]},
                                cv=3, n_jobs=-1).fit(X, y).cv_results_["mean_test_score"]
    np.testing.assert_array_equal(parallel, sequential)


class SlowModel(torch.nn.Module):
    """A linear model whose forward pass waits: tasks last long enough to kill a worker among them."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3).double()

    def forward(self, x):
        time.sleep(0.02)
        return self.linear(x)


def test_a_worker_killed_midway_leaves_a_complete_result(client, problem, tmp_path):
    """The lost worker's tasks are computed again elsewhere (the nanny starts a new worker): the zarr
    result is complete and correct."""
    _, X, y, X_test, y_test = problem
    torch.manual_seed(0)
    model = SlowModel()
    est = DirectInfluence(model, regularization=0.1, batch_size=2).fit(X, y)
    expected = est.influences(X_test, y_test)
    out = zarr.create_array(str(tmp_path / "influences.zarr"), shape=expected.shape, dtype="float64",
                            chunks=(len(X_test), 4))
    lazy = est.influences(X_test, y_test, da.from_array(X, chunks=4), da.from_array(y, chunks=4))
    future = client.compute(da.store(lazy, out, lock=False, compute=False))
    deadline = time.monotonic() + 60
    while out.nchunks_initialized < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not future.done(), "the computation ended before a worker could be killed; make it slower"
    pid = next(iter(client.run(os.getpid).values()))
    os.kill(pid, signal.SIGKILL)
    future.result(timeout=120)
    assert_close(out[...], expected)


def test_clear_errors(client, problem):
    model, X, y, X_test, y_test = problem
    est = DirectInfluence(model, regularization=0.1).fit(X, y)
    Xd_test, yd_test = dask_test(X_test, y_test)
    unknown = Xd_test[Xd_test[:, 0] > -np.inf]
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        est.influences(unknown)
    with pytest.raises(ValueError, match="perturbation"):
        est.influences(Xd_test, yd_test, mode="perturbation")
    with pytest.raises(ValueError, match="by_layer"):
        EkfacInfluence(model, regularization=0.1).fit(X, y).influences(Xd_test, yd_test, by_layer=True)
    with pytest.raises(ValueError, match="different numbers of samples"):
        est.influences(Xd_test, yd_test[:-1])
    with pytest.raises(ValueError, match="features"):
        est.influences(Xd_test[:, :3], yd_test)
    with pytest.raises(ValueError, match="k must be"):
        est.top_influences(Xd_test, yd_test, k=len(X) + 1)
    with pytest.raises(ValueError, match="y was given without X"):
        est.influences(Xd_test, yd_test, None, y)


def test_the_local_scheduler_works_too(problem):
    """Without a client, dask's own scheduler runs the same graphs in this process."""
    model, X, y, X_test, y_test = problem
    with dask.config.set(scheduler="sync"):
        est = EkfacInfluence(model, regularization=0.1, random_state=0).fit(*dask_training(X, y))
        lazy = est.influences(*dask_test(X_test, y_test)).compute()
    expected = EkfacInfluence(model, regularization=0.1, random_state=0).fit(X, y).influences(X_test, y_test)
    assert_close(lazy, expected)


def test_an_estimator_scattered_to_the_workers_computes_there(client, problem):
    """A fitted estimator pickles its model whole (hooks included), so client.scatter and submit work: EK-FAC,
    whose statistics hook into the model's modules, refits and scores on a worker."""
    model, X, y, X_test, y_test = problem
    est = EkfacInfluence(model, regularization=0.1, random_state=0).fit(X, y)
    [remote] = client.scatter([est], broadcast=True)
    on_worker = client.submit(lambda e, *data: e.influences(*data), remote, X_test, y_test).result()
    assert_close(on_worker, est.influences(X_test, y_test))
    refitted = client.submit(lambda e, *data: e.fit(*data).influences(*data[:2]), remote, X, y).result()
    assert_close(refitted, est.influences(X, y))


@pytest.mark.parametrize("name", ["CgInfluence", "EkfacInfluence", "LissaInfluence"])
def test_workers_with_several_threads_share_one_estimator(problem, name):
    """Four threads of one worker run the tasks of one estimator at once: each computes on its own copy of the
    model, and the results are those of one process."""
    model, X, y, X_test, y_test = problem
    est = registry_estimator(name, model).fit(X, y)
    expected = est.influences(X_test, y_test)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=4, processes=False,
                                  dashboard_address=":0") as cluster, distributed.Client(cluster):
        lazy = est.influences(da.from_array(X_test, chunks=3), da.from_array(y_test, chunks=3),
                              da.from_array(X, chunks=8), da.from_array(y, chunks=8))
        assert_close(lazy.compute(), expected)
        sharded = registry_estimator(name, model).fit(*dask_training(X, y))
        assert_close(sharded.influences(X_test, y_test, X, y), expected)


def test_unfitted_use_with_dask_arrays_raises_not_fitted(problem):
    from sklearn.exceptions import NotFittedError

    model, X, y, X_test, y_test = problem
    est = DirectInfluence(model)
    Xd_test, yd_test = dask_test(X_test, y_test)
    for call in (lambda: est.transform(Xd_test, yd_test), lambda: est.self_influence(Xd_test, yd_test),
                 lambda: est.influences(Xd_test, yd_test), lambda: est.top_influences(Xd_test, yd_test)):
        with pytest.raises(NotFittedError):
            call()


def test_blocks_are_cut_to_the_chunks_of_out_only_where_they_straddle_them():
    from skinfl._lazy import _on_chunk_edges

    assert _on_chunk_edges(((23,), (32, 28)), (23, 16), (23, 60))  # 32 is two chunks; 60 the end
    assert not _on_chunk_edges(((23,), (7, 20, 33)), (23, 16), (23, 60))  # 7 cuts a chunk in two
    assert not _on_chunk_edges(((10, 13), (32, 28)), (23, 16), (23, 60))  # so does row 10


def test_lissa_mini_batches_are_read_from_the_shards(client, problem):
    """Stochastic LiSSA draws its mini-batches here and reads their rows from the dask arrays: the same rows,
    so the same result as on numpy."""
    model, X, y, X_test, y_test = problem
    settings = dict(regularization=0.1, second_order="gauss_newton", minibatch_size=16, max_iter=5, random_state=0)
    plain = registered_estimators()["LissaInfluence"](model, **settings).fit(X, y)
    sharded = registered_estimators()["LissaInfluence"](model, **settings).fit(*dask_training(X, y))
    assert_close(sharded.influences(X_test, y_test, X, y), plain.influences(X_test, y_test))
