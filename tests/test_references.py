"""Data by reference: a memmap or an h5py dataset pickles as where it lies; zarr and h5py arrays are read in
chunks, never whole."""

import io
import mmap
import os
import pickle

import joblib
import numpy as np
import pytest
import torch
from torch import nn

import skinfl
from skinfl import _data
from skinfl._data import DataSource, rows_of
from skinfl._references import H5Dataset, MemmapFile, by_reference, portable, restored

N, D = 2000, 20
BATCH = 64


@pytest.fixture(scope="module")
def problem():
    """A linear model (21 parameters: its factors are small beside the data) and 2,000 x 20 float32 data."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(N, D)).astype(np.float32)
    y = (X @ rng.normal(size=(D, 1)) + 0.1 * rng.normal(size=(N, 1))).astype(np.float32)
    torch.manual_seed(0)
    return nn.Linear(D, 1), X, y


def make(model):
    return skinfl.DirectInfluence(model, loss="mse", regularization=0.1, batch_size=BATCH)


@pytest.fixture(scope="module")
def in_memory(problem):
    model, X, y = problem
    return make(model).fit(X, y)


def on_disk(array, path):
    """``array`` written to the .npy file ``path``, opened again as a read-only memmap."""
    written = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    written[:] = array
    written.flush()
    del written
    return np.load(path, mmap_mode="r")


def queries(X, y):
    return X[:5], y[:5]


# ------------------------------------------------------------------ memmaps pickle as their file
@pytest.mark.parametrize("via", ["pickle", "joblib"])
def test_a_memmap_fitted_estimator_pickles_as_a_reference(problem, in_memory, via, tmp_path):
    model, X, y = problem
    X_map, y_map = on_disk(X, tmp_path / "X.npy"), on_disk(y, tmp_path / "y.npy")
    est = make(model).fit(X_map, y_map)
    if via == "pickle":
        data = pickle.dumps(est)
        loaded = pickle.loads(data)
        size = len(data)
    else:
        joblib.dump(est, tmp_path / "est.joblib")
        size = os.path.getsize(tmp_path / "est.joblib")
        loaded = joblib.load(tmp_path / "est.joblib")

    assert size < 0.1 * X.nbytes, size  # where the data is, not the data
    for kept, original in ((loaded._fit_data.X, X_map), (loaded._fit_data.y, y_map)):
        assert isinstance(kept, np.memmap) and not kept.flags.writeable
        assert kept.filename == os.fspath(original.filename)
    assert est._fit_data.X is X_map  # pickling leaves the estimator's own references alone
    expected = in_memory.influences(*queries(X, y))
    assert np.array_equal(loaded.influences(*queries(X, y)), expected)
    assert np.array_equal(est.influences(*queries(X, y)), expected)


def test_a_loaded_estimator_pickles_its_data_as_a_place_in_the_saved_file(problem, in_memory, tmp_path):
    model, X, y = problem
    path = skinfl.save(in_memory, tmp_path / "est.skinfl")
    loaded = skinfl.load(path, model)
    assert isinstance(loaded._fit_data.X, np.memmap) and loaded._fit_data.X.offset > 0
    data = pickle.dumps(loaded)
    assert len(data) < 0.1 * X.nbytes
    again = pickle.loads(data)
    assert again._fit_data.X.filename == os.fspath(path)
    assert np.array_equal(again._fit_data.X, X) and np.array_equal(again._fit_data.y, y)
    assert np.array_equal(again.influences(*queries(X, y)), in_memory.influences(*queries(X, y)))


def test_memmap_slices_and_offsets_round_trip(tmp_path):
    path = tmp_path / "raw.dat"
    values = np.arange(30_000, dtype=np.float64)
    values.tofile(path)
    granularity = mmap.ALLOCATIONGRANULARITY
    for offset in (0, 8, granularity + 24, 3 * granularity):
        mapped = np.memmap(path, dtype=np.float64, mode="r", offset=offset, shape=(1000, 6))
        expected = values[offset // 8:offset // 8 + 6000].reshape(1000, 6)
        for rows in (slice(None), slice(1, None), slice(517, 900), slice(999, 1000), slice(0, 1)):
            part = mapped[rows]
            reference = pickle.loads(pickle.dumps(MemmapFile.of(part)))
            assert reference.shape == part.shape and reference.dtype == part.dtype
            reopened = restored(reference)
            assert isinstance(reopened, np.memmap) and not reopened.flags.writeable
            assert np.array_equal(reopened, expected[rows]), (offset, rows)
            assert np.array_equal(reference[3:5, 1:], expected[rows][3:5, 1:])
    # Rows of a 3-D memmap opened for writing, and a big-endian one.
    cube = np.memmap(tmp_path / "cube.dat", dtype=">i4", mode="w+", shape=(40, 3, 5))
    cube[:] = np.arange(cube.size).reshape(cube.shape)
    for part in (cube, cube[7:31], cube[12]):
        reopened = restored(pickle.loads(pickle.dumps(portable(part))))
        assert reopened.dtype == np.dtype(">i4") and np.array_equal(reopened, part)


def test_memmaps_that_are_not_where_their_file_says_stay_arrays(tmp_path):
    mapped = np.memmap(tmp_path / "x.dat", dtype=np.float32, mode="w+", shape=(50, 4))
    mapped[:] = 1.0
    private = np.memmap(tmp_path / "x.dat", dtype=np.float32, mode="c", shape=(50, 4))
    private[0] = 2.0  # copy-on-write: not in the file
    for array in (mapped[:, 1:], mapped[::2], mapped + 1, private):
        assert MemmapFile.of(array) is None
        assert portable(array) is array
        assert np.array_equal(pickle.loads(pickle.dumps(array)), array)  # its data, as numpy pickles it


def test_a_non_contiguous_memmap_still_works(problem, in_memory, tmp_path):
    model, X, y = problem
    wide = np.concatenate([X, np.zeros((N, 1), np.float32)], axis=1)
    X_map = on_disk(wide, tmp_path / "wide.npy")[:, :D]
    assert not X_map.flags.c_contiguous
    est = make(model).fit(X_map, y)
    data = pickle.dumps(est)
    assert len(data) > X.nbytes  # the data travels
    loaded = pickle.loads(data)
    assert np.array_equal(loaded._fit_data.X, X)
    assert np.array_equal(loaded.influences(*queries(X, y)), in_memory.influences(*queries(X, y)))


def test_keyword_inputs_pickle_each_memmap_as_a_reference(tmp_path):
    first = on_disk(np.arange(40, dtype=np.float32).reshape(10, 4), tmp_path / "a.npy")
    second = np.arange(10, dtype=np.int64)
    source = DataSource({"a": first, "b": second}, None, input_dtype=torch.float32, device="cpu")
    state = source.__getstate__()
    assert isinstance(state["X"]["a"], MemmapFile) and state["X"]["b"] is second
    loaded = pickle.loads(pickle.dumps(source))
    assert isinstance(loaded.X["a"], np.memmap) and loaded.X["a"].filename == os.fspath(first.filename)
    assert np.array_equal(loaded.X["a"], first) and np.array_equal(loaded.X["b"], second)


def test_references_are_arrays_for_dask(tmp_path):
    dask_array = pytest.importorskip("dask.array")
    values = np.arange(12_000, dtype=np.float32).reshape(2000, 6)
    mapped = on_disk(values, tmp_path / "x.npy")
    for part, expected in ((mapped, values), (mapped[300:1700], values[300:1700])):
        reference = by_reference(part)
        assert isinstance(reference, MemmapFile)
        lazy = dask_array.from_array(reference, chunks=(250, 3))
        assert np.array_equal(lazy.compute(), expected)
        assert np.array_equal(lazy[10:20, 1:].compute(), expected[10:20, 1:])
        assert len(pickle.dumps(dict(lazy.__dask_graph__()))) < 0.1 * expected.nbytes
    assert by_reference(values) is values


# ------------------------------------------------------------------ zarr and h5py arrays
def test_zarr_inputs_are_read_in_chunks(problem, in_memory, tmp_path, monkeypatch):
    zarr = pytest.importorskip("zarr")
    model, X, y = problem
    X_zarr = zarr.create_array(store=tmp_path / "X.zarr", shape=X.shape, dtype=X.dtype, chunks=(100, D))
    X_zarr[:] = X
    y_zarr = zarr.create_array(store=tmp_path / "y.zarr", shape=y.shape, dtype=y.dtype, chunks=(500, 1))
    y_zarr[:] = y
    assert not hasattr(X_zarr, "__len__")
    # Validation reads about 4 KiB at a time (25 rows of X, 512 targets); every read of the arrays is recorded.
    monkeypatch.setattr(_data, "_VALIDATION_CHUNK_BYTES", 4096)
    largest = max(BATCH, _data.chunk_rows(y.shape))
    assert largest <= N // 3
    reads = []
    for method in ("get_basic_selection", "get_orthogonal_selection", "get_coordinate_selection",
                   "get_mask_selection"):
        original = getattr(type(X_zarr), method)

        def recording(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            reads.append(np.shape(result)[0] if np.ndim(result) else 1)
            return result

        monkeypatch.setattr(type(X_zarr), method, recording)

    est = make(model).fit(X_zarr, y_zarr)
    assert est._fit_data.X is X_zarr and len(est._fit_data) == N
    X_test, y_test = queries(X, y)
    assert np.array_equal(est.influences(X_test, y_test), in_memory.influences(X_test, y_test))
    assert np.array_equal(est.influences(X_test[:2], y_test[:2], mode="perturbation"),
                          in_memory.influences(X_test[:2], y_test[:2], mode="perturbation"))
    assert np.array_equal(est.self_influence(X_zarr, y_zarr), in_memory.self_influence(X, y))
    assert np.array_equal(rows_of(X_zarr, np.array([7, 3, 3, 1999])), X[[7, 3, 3, 1999]])
    assert reads and max(reads) <= largest, sorted(set(reads))
    # zarr pickles as its store: the data stays where it is.
    data = pickle.dumps(est)
    assert len(data) < 0.1 * X.nbytes
    assert np.array_equal(pickle.loads(data).influences(X_test, y_test), in_memory.influences(X_test, y_test))


def test_h5py_inputs_are_read_in_chunks_and_pickle_as_a_reference(problem, in_memory, tmp_path):
    h5py = pytest.importorskip("h5py")
    model, X, y = problem
    with h5py.File(tmp_path / "data.h5", "w") as file:
        file["group/X"] = X
        file["y"] = y
    file = h5py.File(tmp_path / "data.h5", "r")
    X_h5, y_h5 = file["group/X"], file["y"]

    est = make(model).fit(X_h5, y_h5)
    assert est._fit_data.X is X_h5
    X_test, y_test = queries(X, y)
    expected = in_memory.influences(X_test, y_test)
    assert np.array_equal(est.influences(X_test, y_test), expected)
    # h5py reads increasing rows only: unordered and repeated rows are read sorted, then reordered.
    assert np.array_equal(rows_of(X_h5, np.array([9, 2, 2, 1500])), X[[9, 2, 2, 1500]])

    data = pickle.dumps(est)  # an h5py dataset does not pickle: its reference does
    assert len(data) < 0.1 * X.nbytes
    loaded = pickle.loads(data)
    assert type(loaded._fit_data.X).__module__.startswith("h5py")
    assert loaded._fit_data.X.name == "/group/X" and loaded._fit_data.X.file.mode == "r"
    assert np.array_equal(loaded.influences(X_test, y_test), expected)

    reference = pickle.loads(pickle.dumps(portable(X_h5)))
    assert isinstance(reference, H5Dataset) and reference.shape == X.shape and reference.dtype == X.dtype
    assert len(reference) == N and reference.ndim == 2
    assert np.array_equal(reference[10:12, 3:], X[10:12, 3:])
    file.close()


def test_joblib_buffer_round_trip_of_an_h5py_fitted_estimator(problem, in_memory, tmp_path):
    h5py = pytest.importorskip("h5py")
    model, X, y = problem
    with h5py.File(tmp_path / "data.h5", "w") as file:
        file["X"] = X
    with h5py.File(tmp_path / "data.h5", "r") as file:
        est = make(model).fit(file["X"], y)
        buffer = io.BytesIO()
        joblib.dump(est, buffer)
    buffer.seek(0)
    loaded = joblib.load(buffer)  # the file was closed: the reference opens it again
    assert np.array_equal(loaded.influences(*queries(X, y)), in_memory.influences(*queries(X, y)))
