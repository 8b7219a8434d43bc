"""Data kept by reference and streamed; results written block by block, chunking-invariant.

Every estimator in the registry is covered: training data stays where the
user keeps it (a memmap, any indexable) and is read a bounded number of rows
at a time, results go into ``out=`` or are refused above ``max_result_bytes``,
``top_influences`` merges blocks into the same ranking as the dense matrix,
and shrinking ``working_memory`` and ``batch_size`` changes nothing but
rounding. ``score`` and class-weighted losses are checked against explicit
computations.
"""

import dataclasses
import math
import types

import numpy as np
import pytest
import sklearn
import torch
import torch.nn.functional as F
from conftest import registry_estimator, reference_gradients, reference_hessian, train
from sklearn.utils import check_random_state
from torch import nn

import skinfl
import skinfl._data
import skinfl._gradients
from skinfl._curvature import CurvatureOperator
from skinfl.base import SCORE_PROBES, BaseInfluence

ESTIMATORS = sorted(skinfl.registered_estimators().items())
NAMES = [name for name, _ in ESTIMATORS]
N_TRAIN = 200


make = registry_estimator


def assert_close(actual, expected, rtol=1e-12):
    """Relative agreement, measured against the largest magnitude of ``expected``."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def working_memory_for(rows, estimator):
    """A ``working_memory`` (MiB) in which ``rows`` inverse-curvature gradients of ``estimator`` fit."""
    return (rows * estimator.n_params_ * 8 + 1) / 2**20


def make_data(n, seed):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = (X[:, 0] + X[:, 1] ** 2 > 1).astype(np.int64) + (X[:, 2] > 0.5)
    return X, y


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem():
    """A trained 4-6-3 float64 MLP; rows 0..199 are its training set, the rest held out."""
    X, y = make_data(400, seed=3)
    assert set(np.unique(y[:N_TRAIN])) == {0, 1, 2}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    train(model, torch.tensor(X[:N_TRAIN]), torch.tensor(y[:N_TRAIN]), F.cross_entropy, steps=100,
          weight_decay=1e-3)
    return model, X, y


class RecordingRows:
    """An indexable along axis 0 (no ``__array__``) that records how many rows each read returns."""

    def __init__(self, array):
        self._array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.reads = []  # rows per slice / integer-array read
        self.scalar_reads = 0  # reads of a single row by integer position

    def __len__(self):
        return len(self._array)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            self.scalar_reads += 1
            return self._array[index]
        if not isinstance(index, slice):
            index = np.asarray(index)
            assert index.ndim == 1 and index.dtype.kind in "iu", index
        rows = self._array[index]
        self.reads.append(len(rows))
        return rows


def arrays_with_rows(root, n_rows, skip=()):
    """Every numpy array or tensor reachable from ``root`` with an axis of length ``n_rows``.

    Walks dicts, sequences, dataclasses, modules (their state too) and any
    object's ``vars``; the objects in ``skip`` are not entered.
    """
    found, seen, stack = [], set(), [root]
    while stack:
        value = stack.pop()
        if id(value) in seen or any(value is s for s in skip):
            continue
        seen.add(id(value))
        if isinstance(value, (np.ndarray, torch.Tensor)):
            if n_rows in tuple(value.shape):
                found.append(value)
            continue
        if isinstance(value, (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType)):
            continue
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            stack.extend(value)
        else:
            if isinstance(value, nn.Module):
                stack.extend(value.state_dict(keep_vars=True).values())
            if dataclasses.is_dataclass(value):
                stack.extend(getattr(value, f.name) for f in dataclasses.fields(value))
            if hasattr(value, "__dict__"):
                stack.extend(vars(value).values())
    return found


# ------------------------------------------------------------------ 1. data kept where it is
@pytest.mark.parametrize("name", NAMES)
def test_memmap_training_data_is_referenced_not_copied(problem, name, tmp_path):
    model, X, y = problem
    for array, file in ((X[:N_TRAIN], "X.npy"), (y[:N_TRAIN], "y.npy")):
        written = np.lib.format.open_memmap(tmp_path / file, mode="w+", dtype=array.dtype, shape=array.shape)
        written[:] = array
        written.flush()
        del written
    X_map = np.load(tmp_path / "X.npy", mmap_mode="r")
    y_map = np.load(tmp_path / "y.npy", mmap_mode="r")
    assert isinstance(X_map, np.memmap) and not X_map.flags.writeable

    est = make(name, model, batch_size=16).fit(X_map, y_map)

    assert est._fit_data.X is X_map and est._fit_data.y is y_map
    # The walk below finds arrays inside the fitted state: here exactly the two memmaps.
    found = arrays_with_rows(vars(est), N_TRAIN)
    assert sorted(map(id, found)) == sorted([id(X_map), id(y_map)])
    # Read from disk in batches, the results are those of the same data in memory.
    in_memory = make(name, model, batch_size=16).fit(X[:N_TRAIN].copy(), y[:N_TRAIN].copy())
    X_test, y_test = X[300:305], y[300:305]
    assert np.array_equal(est.influences(X_test, y_test), in_memory.influences(X_test, y_test))


@pytest.mark.parametrize("name", NAMES)
def test_indexable_training_data_is_read_in_bounded_batches(problem, name, monkeypatch):
    model, X, y = problem
    batch_size = 16
    # Validation reads chunks of a byte budget: shrink it to 128 bytes (4 rows of X, 16 labels),
    # so that a whole-data read anywhere would show.
    monkeypatch.setattr(skinfl._data, "_VALIDATION_CHUNK_BYTES", 128)
    X_rows, y_rows = RecordingRows(X[:N_TRAIN].copy()), RecordingRows(y[:N_TRAIN].copy())
    held_X, held_y = RecordingRows(X[200:350].copy()), RecordingRows(y[200:350].copy())
    X_test, y_test = X[350:357], y[350:357]

    est = make(name, model, batch_size=batch_size).fit(X_rows, y_rows)
    assert est._fit_data.X is X_rows and est._fit_data.y is y_rows
    assert X_rows.reads and y_rows.reads
    results = {
        "influences": est.influences(X_test, y_test),
        "perturbation": est.influences(X_test[:2], y_test[:2], mode="perturbation"),
        "top_influences": est.top_influences(X_test, y_test, k=4, which="both"),
        "self_influence": est.self_influence(X_rows, y_rows),
        "transform": est.transform(X_rows, y_rows),
        "score": est.score(held_X, held_y),
    }
    assert est._fit_data.X is X_rows
    for data in (X_rows, y_rows, held_X, held_y):
        assert data.reads and max(data.reads) <= batch_size, sorted(set(data.reads))
        assert data.scalar_reads == 0
    # Every training row was read (the data was used), in many reads.
    assert sum(X_rows.reads) >= 5 * N_TRAIN

    # Nothing in the fitted estimator holds an array of the training set's length besides the references.
    assert arrays_with_rows(vars(est), N_TRAIN, skip=(X_rows, y_rows)) == []
    # The same results as with the arrays themselves.
    plain = make(name, model, batch_size=batch_size).fit(X[:N_TRAIN], y[:N_TRAIN])
    assert np.array_equal(results["influences"], plain.influences(X_test, y_test))
    perturbation = plain.influences(X_test[:2], y_test[:2], mode="perturbation")
    assert np.array_equal(results["perturbation"], perturbation)
    top = plain.top_influences(X_test, y_test, k=4, which="both")
    for got, expected in zip(results["top_influences"], top):
        assert np.array_equal(got, expected)
    assert np.array_equal(results["self_influence"], plain.self_influence(X[:N_TRAIN], y[:N_TRAIN]))
    assert np.array_equal(results["transform"], plain.transform(X[:N_TRAIN], y[:N_TRAIN]))
    assert results["score"] == plain.score(X[200:350], y[200:350])


# ------------------------------------------------------------------ 2. out=
@pytest.mark.parametrize("name", NAMES)
def test_out_receives_the_result(problem, name, tmp_path):
    model, X, y = problem
    est = make(name, model).fit(X[:N_TRAIN], y[:N_TRAIN])
    X_test, y_test = X[300:307], y[300:307]
    dense = est.influences(X_test, y_test)
    assert dense.shape == (7, N_TRAIN) and dense.dtype == np.float64

    path = tmp_path / "influences.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype="float64", shape=(7, N_TRAIN))
    assert est.influences(X_test, y_test, out=out) is out
    assert np.array_equal(out, dense)
    out.flush()
    assert np.array_equal(np.load(path), dense)

    # A float32 memmap receives the float64 values rounded once.
    out32 = np.lib.format.open_memmap(tmp_path / "f32.npy", mode="w+", dtype="float32", shape=(7, N_TRAIN))
    assert est.influences(X_test, y_test, out=out32) is out32
    assert np.array_equal(out32, dense.astype(np.float32))

    tensor_out = torch.full((7, N_TRAIN), float("nan"), dtype=torch.float64)
    assert est.influences(X_test, y_test, out=tensor_out) is tensor_out
    assert np.array_equal(tensor_out.numpy(), dense)

    with pytest.raises(ValueError, match=r"out has shape \(7, 199\), but influences has shape \(7, 200\)"):
        est.influences(X_test, y_test, out=np.empty((7, N_TRAIN - 1)))
    with pytest.raises(ValueError, match="out has shape"):
        est.influences(X_test, y_test, out=torch.empty(N_TRAIN, 7, dtype=torch.float64))
    read_only = np.load(path, mmap_mode="r")
    with pytest.raises(ValueError, match="read-only"):
        est.influences(X_test, y_test, out=read_only)
    assert np.array_equal(read_only, dense)  # untouched

    # Perturbation influences: (n_test, n_train, *input_shape).
    dense_perturbation = est.influences(X_test[:3], y_test[:3], mode="perturbation")
    assert dense_perturbation.shape == (3, N_TRAIN, 4)
    out_perturbation = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype="float64",
                                                 shape=(3, N_TRAIN, 4))
    returned = est.influences(X_test[:3], y_test[:3], mode="perturbation", out=out_perturbation)
    assert returned is out_perturbation
    assert np.array_equal(out_perturbation, dense_perturbation)
    with pytest.raises(ValueError, match="out has shape"):
        est.influences(X_test[:3], y_test[:3], mode="perturbation", out=np.empty((3, N_TRAIN)))


# ------------------------------------------------------------------ 3. top_influences
def expected_top(dense, k, which):
    helpful = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    harmful = np.argsort(dense, axis=1, kind="stable")[:, :k]
    both = np.concatenate([helpful, harmful], axis=1)
    indices = {"helpful": helpful, "harmful": harmful, "both": both}[which]
    return indices, np.take_along_axis(dense, indices, axis=1)


def assert_no_ties(dense):
    """Rankings are only comparable when each row's values are distinct (by more than rounding)."""
    gaps = np.diff(np.sort(dense, axis=1), axis=1)
    assert gaps.min() > 1e-9 * np.abs(dense).max()


@pytest.mark.parametrize("name", NAMES)
def test_top_influences_is_the_dense_ranking(problem, name):
    model, X, y = problem
    est = make(name, model).fit(X[:60], y[:60])
    X_test, y_test = X[300:310], y[300:310]
    dense = est.influences(X_test, y_test)
    assert_no_ties(dense)
    k = 6
    for which in ("helpful", "harmful", "both"):
        indices, values = est.top_influences(X_test, y_test, k=k, which=which)
        expected_indices, expected_values = expected_top(dense, k, which)
        assert isinstance(indices, np.ndarray) and isinstance(values, np.ndarray)
        assert indices.dtype == np.int64 and values.dtype == np.float64
        assert indices.shape == values.shape == (10, 2 * k if which == "both" else k)
        assert np.array_equal(indices, expected_indices)
        assert np.array_equal(values, expected_values)
    # The default is "helpful" with k=10.
    indices, values = est.top_influences(X_test, y_test)
    assert np.array_equal(indices, expected_top(dense, 10, "helpful")[0])

    # Torch in, torch out, with the same values.
    torch_indices, torch_values = est.top_influences(torch.tensor(X_test), torch.tensor(y_test), k=k,
                                                     which="both")
    assert isinstance(torch_indices, torch.Tensor) and isinstance(torch_values, torch.Tensor)
    assert torch_indices.dtype == torch.int64 and torch_values.dtype == torch.float64
    expected_indices, expected_values = expected_top(dense, k, "both")
    assert np.array_equal(torch_indices.numpy(), expected_indices)
    assert np.array_equal(torch_values.numpy(), expected_values)

    # Against other training points given as X, y.
    X_other, y_other = X[200:250], y[200:250]
    other = est.influences(X_test, y_test, X_other, y_other)
    assert_no_ties(other)
    for which in ("helpful", "harmful", "both"):
        indices, values = est.top_influences(X_test, y_test, k=k, X=X_other, y=y_other, which=which)
        expected_indices, expected_values = expected_top(other, k, which)
        assert np.array_equal(indices, expected_indices)
        assert np.array_equal(values, expected_values)
    # k may be every training point.
    indices, _ = est.top_influences(X_test, y_test, k=50, X=X_other, y=y_other, which="harmful")
    assert np.array_equal(indices, expected_top(other, 50, "harmful")[0])

    with pytest.raises(ValueError, match="k must be an integer from 1 to the 60 training points"):
        est.top_influences(X_test, y_test, k=61)
    with pytest.raises(ValueError, match="k must be an integer from 1 to the 50 training points"):
        est.top_influences(X_test, y_test, k=51, X=X_other, y=y_other)
    with pytest.raises(ValueError, match="k must be"):
        est.top_influences(X_test, y_test, k=0)
    with pytest.raises(ValueError, match="which must be 'helpful', 'harmful' or 'both', got 'worst'"):
        est.top_influences(X_test, y_test, which="worst")


@pytest.fixture
def held_chunk_sizes(monkeypatch):
    """Rows of every chunk of inverse-curvature gradients held at once, as ``_held_chunks`` hands them out."""
    sizes = []
    original = BaseInfluence._held_chunks

    def recording(self, n_rows):
        chunks = original(self, n_rows)
        sizes.append([chunk.stop - chunk.start for chunk in chunks])
        return chunks

    monkeypatch.setattr(BaseInfluence, "_held_chunks", recording)
    return sizes


@pytest.mark.parametrize("name", NAMES)
def test_top_influences_merged_over_chunks_and_batches(problem, name, held_chunk_sizes):
    model, X, y = problem
    X_train, y_train = X[:40], y[:40]
    X_test, y_test = X[300:312], y[300:312]
    reference = make(name, model).fit(X_train, y_train)
    reference_dense = reference.influences(X_test, y_test)
    assert_no_ties(reference_dense)

    est = make(name, model, batch_size=3).fit(X_train, y_train)
    held_chunk_sizes.clear()
    with sklearn.config_context(working_memory=working_memory_for(5, est)):
        dense = est.influences(X_test, y_test)
        results = {which: est.top_influences(X_test, y_test, k=7, which=which)
                   for which in ("helpful", "harmful", "both")}
    # 12 test points held 5 at a time (the budget, above batch_size); 40 training points in 14 batches.
    assert held_chunk_sizes == [[5, 5, 2]] * 4
    for which, (indices, values) in results.items():
        expected_indices, expected_values = expected_top(dense, 7, which)
        assert np.array_equal(indices, expected_indices)
        assert np.array_equal(values, expected_values)
        # And the same ranking as unchunked, unbatched influences.
        assert np.array_equal(indices, expected_top(reference_dense, 7, which)[0])
        assert_close(values, expected_top(reference_dense, 7, which)[1])


# ------------------------------------------------------------------ 4. max_result_bytes
@pytest.mark.parametrize("name", NAMES)
def test_max_result_bytes(problem, name, tmp_path):
    model, X, y = problem
    est = make(name, model).fit(X[:N_TRAIN], y[:N_TRAIN])
    X_test, y_test = X[300:307], y[300:307]
    n_bytes = 7 * N_TRAIN * 8  # 11200 bytes
    dense = est.influences(X_test, y_test, max_result_bytes=n_bytes)  # at the limit: allowed
    with pytest.raises(ValueError) as error:
        est.influences(X_test, y_test, max_result_bytes=n_bytes - 1)
    message = str(error.value)
    for part in ("out=", "top_influences", "max_result_bytes=11,199", "(7, 200)", "10.9 KiB"):
        assert part in message, (part, message)
    assert np.array_equal(est.influences(X_test, y_test, max_result_bytes=None), dense)
    # With out=, no limit applies.
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype="float64", shape=(7, N_TRAIN))
    assert est.influences(X_test, y_test, out=out, max_result_bytes=1) is out
    assert np.array_equal(out, dense)
    # Perturbation results count their input axes: 7 x 200 x 4 values.
    with pytest.raises(ValueError, match=r"shape \(7, 200, 4\) \(43.8 KiB\)"):
        est.influences(X_test, y_test, mode="perturbation", max_result_bytes=n_bytes * 4 - 1)

    # The default limit, 2 GiB, is checked before any work (the test set is a broadcast view: no memory).
    n_huge = 2**31 // (8 * N_TRAIN) + 1
    X_huge, y_huge = np.broadcast_to(X_test[:1], (n_huge, 4)), np.broadcast_to(y_test[:1], (n_huge,))
    with pytest.raises(ValueError, match=r"\(2\.0 GiB\), above max_result_bytes=2,147,483,648\. Pass out="):
        est.influences(X_huge, y_huge)


# ------------------------------------------------------------------ 5. X and y go together
@pytest.mark.parametrize("name", NAMES)
def test_training_points_need_both_x_and_y(problem, name):
    model, X, y = problem
    est = make(name, model).fit(X[:60], y[:60])
    X_test, y_test = X[300:303], y[300:303]
    with pytest.raises(ValueError, match="y is required with X"):
        est.influences(X_test, y_test, X[:10])
    with pytest.raises(ValueError, match="y was given without X"):
        est.influences(X_test, y_test, y=y[:10])
    with pytest.raises(ValueError, match="y is required with X"):
        est.top_influences(X_test, y_test, k=2, X=X[:10])
    with pytest.raises(ValueError, match="y was given without X"):
        est.top_influences(X_test, y_test, k=2, y=y[:10])
    with pytest.raises(ValueError, match="y is required with X"):
        est.influences(X_test, y_test, X[:10], mode="perturbation")


# ------------------------------------------------------------------ 6. chunking invariance
@pytest.mark.parametrize("name", NAMES)
def test_results_do_not_depend_on_chunking(problem, name, held_chunk_sizes, monkeypatch):
    model, X, y = problem
    X_train, y_train = X[:40], y[:40]
    few_test = (X[300:310], y[300:310])  # held: the test points
    many_test = (X[300:360], y[300:360])  # held: the training points
    default = make(name, model).fit(X_train, y_train)
    expected = {
        "few": default.influences(*few_test),
        "many": default.influences(*many_test),
        "perturbation": default.influences(few_test[0][:4], few_test[1][:4], mode="perturbation"),
        "self_influence": default.self_influence(*many_test),
        "transform": default.transform(*few_test),
        "measurement": default.transform(few_test[0]),
    }
    # With the default working memory, everything is held in one chunk.
    assert all(len(sizes) == 1 for sizes in held_chunk_sizes)

    # Per-sample gradients of a batch differentiated a row at a time, as for a batch above the byte limit.
    monkeypatch.setattr(skinfl._gradients, "_GRADIENT_PIECE_BYTES", 1)
    est = make(name, model, batch_size=3).fit(X_train, y_train)
    held_chunk_sizes.clear()
    with sklearn.config_context(working_memory=1e-9):  # below one row: batch_size rows at a time
        got = {
            "few": est.influences(*few_test),
            "many": est.influences(*many_test),
            "perturbation": est.influences(few_test[0][:4], few_test[1][:4], mode="perturbation"),
            "self_influence": est.self_influence(*many_test),
            "transform": est.transform(*few_test),
            "measurement": est.transform(few_test[0]),
        }
    # Calls that hold chunks: few (test side), many (training side), perturbation (test side).
    assert held_chunk_sizes == [[3, 3, 3, 1], [3] * 13 + [1], [3, 1]]
    for key, value in expected.items():
        assert_close(got[key], value)


# ------------------------------------------------------------------ 7. score
def explicit_score(model, X_fit, y_fit, X_val, y_val, regularization, probes, loss_fn=F.cross_entropy):
    """The score's formula, from an explicit Hessian inverse and looped gradients."""
    fit_curvature = reference_hessian(model, X_fit, y_fit, loss_fn)
    val_curvature = reference_hessian(model, X_val, y_val, loss_fn)
    gradients = reference_gradients(model, X_val, y_val, loss_fn)[probes]
    system = fit_curvature + regularization * torch.eye(len(fit_curvature), dtype=fit_curvature.dtype)
    solved = torch.linalg.solve(system, gradients.T).T
    residuals = solved @ val_curvature - gradients
    return float(-((residuals**2).sum(dim=1) / (gradients**2).sum(dim=1)).mean())


def test_score_matches_its_formula(problem):
    model, X, y = problem
    X_fit, y_fit = torch.tensor(X[:N_TRAIN]), torch.tensor(y[:N_TRAIN])
    est = skinfl.DirectInfluence(model, regularization=0.1, random_state=7).fit(X[:N_TRAIN], y[:N_TRAIN])
    assert SCORE_PROBES == 100

    # m = 60 <= 100 held-out points: every one is a probe.
    X_val, y_val = torch.tensor(X[200:260]), torch.tensor(y[200:260])
    expected = explicit_score(model, X_fit, y_fit, X_val, y_val, 0.1, np.arange(60))
    score = est.score(X[200:260], y[200:260])
    assert score < 0
    assert score == pytest.approx(expected, rel=1e-10)

    # m = 150 > 100: the probes are the first 100 of the seeded permutation (every gradient is nonzero).
    X_val, y_val = torch.tensor(X[200:350]), torch.tensor(y[200:350])
    norms = reference_gradients(model, X_val, y_val, F.cross_entropy).norm(dim=1)
    assert float(norms.min()) > 1e-6
    probes = check_random_state(7).permutation(150)[:100]
    expected = explicit_score(model, X_fit, y_fit, X_val, y_val, 0.1, probes)
    score = est.score(X[200:350], y[200:350])
    assert score == pytest.approx(expected, rel=1e-10)
    # The choice of probes matters at this precision: neither all points nor the first 100 give it.
    for other in (np.arange(150), np.arange(100)):
        elsewhere = explicit_score(model, X_fit, y_fit, X_val, y_val, 0.1, other)
        assert abs(elsewhere - expected) > 1e-6 * abs(expected)

    # The same random_state gives the same score, call after call; another gives another.
    assert est.score(X[200:350], y[200:350]) == score
    again = skinfl.DirectInfluence(model, regularization=0.1, random_state=7).fit(X[:N_TRAIN], y[:N_TRAIN])
    assert again.score(X[200:350], y[200:350]) == score
    reseeded = skinfl.DirectInfluence(model, regularization=0.1, random_state=8).fit(X[:N_TRAIN], y[:N_TRAIN])
    assert reseeded.score(X[200:350], y[200:350]) == pytest.approx(
        explicit_score(model, X_fit, y_fit, X_val, y_val, 0.1, check_random_state(8).permutation(150)[:100]),
        rel=1e-10,
    )
    assert reseeded.score(X[200:350], y[200:350]) != score


def test_score_skips_zero_gradients_and_uses_every_point_for_the_curvature():
    """Least squares without bias: a point with x = 0, y = 0 has a zero gradient but counts in C_val."""
    rng = np.random.default_rng(5)
    weights = rng.normal(size=(4, 1))
    X_fit = rng.normal(size=(80, 4))
    y_fit = X_fit @ weights + 0.3 * rng.normal(size=(80, 1))
    X_val = rng.normal(size=(180, 4))
    y_val = X_val @ weights + 0.3 * rng.normal(size=(180, 1))
    zero = np.arange(180) % 3 == 1  # 60 points with a zero gradient, 120 with a nonzero one
    X_val[zero], y_val[zero] = 0.0, 0.0
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weights.T * 0.9))
    est = skinfl.DirectInfluence(model, loss="mse", regularization=0.05, random_state=3).fit(X_fit, y_fit)

    order = check_random_state(3).permutation(180)
    probes = order[~zero[order]][:100]
    last_probe = np.flatnonzero(~zero[order])[99]
    assert len(probes) == 100 and zero[order[:last_probe]].any()  # zero points come up among the candidates
    tensors = [torch.tensor(a) for a in (X_fit, y_fit, X_val, y_val)]
    expected = explicit_score(model, *tensors, 0.05, probes, loss_fn=F.mse_loss)
    assert est.score(X_val, y_val) == pytest.approx(expected, rel=1e-10)

    with pytest.warns(UserWarning, match="Every held-out sample has a zero gradient"):
        assert math.isnan(est.score(np.zeros((5, 4)), np.zeros((5, 1))))


def test_score_cost_is_linear(problem, monkeypatch):
    model, X, y = problem
    est = skinfl.DirectInfluence(model, regularization=0.1, random_state=0).fit(X[:N_TRAIN], y[:N_TRAIN])
    products, gradient_rows = [], []
    original_matmat = CurvatureOperator.matmat
    original_gradients = skinfl.base.gradients_of

    def counting_matmat(self, vectors):
        products.append((len(vectors), self.n_samples))
        return original_matmat(self, vectors)

    def counting_gradients(fmodel, data, batch_size, rows):
        gradient_rows.append(len(rows))
        return original_gradients(fmodel, data, batch_size, rows)

    monkeypatch.setattr(CurvatureOperator, "matmat", counting_matmat)
    monkeypatch.setattr(skinfl.base, "gradients_of", counting_gradients)
    est.score(X[200:350], y[200:350])
    # One product of the 100 probes with the curvature over all 150 held-out points; 100 gradients.
    assert products == [(100, 150)]
    assert gradient_rows == [100]


# ------------------------------------------------------------------ 8. class weights
def test_class_weights_are_honoured(problem):
    model, X, y = problem
    X_fit, y_fit = torch.tensor(X[:N_TRAIN]), torch.tensor(y[:N_TRAIN])
    X_test, y_test = torch.tensor(X[300:308]), torch.tensor(y[300:308])
    weight = torch.tensor([0.4, 2.5, 1.3], dtype=torch.float64)
    regularization = 0.1

    est = skinfl.DirectInfluence(model, loss=nn.CrossEntropyLoss(weight=weight),
                                 regularization=regularization).fit(X[:N_TRAIN], y[:N_TRAIN])
    got = est.influences(X[300:308], y[300:308])

    # torch's weighted mean: sum_i w[y_i] l_i / sum_i w[y_i].
    hessian = reference_hessian(model, X_fit, y_fit, lambda out, t: F.cross_entropy(out, t, weight=weight))
    mean_weight = weight[y_fit].mean()

    def weighted_sample_loss(out, t):  # one sample: w[y_i] l_i / mean_j w[y_j]
        return weight[t].sum() * F.cross_entropy(out, t) / mean_weight

    train_gradients = reference_gradients(model, X_fit, y_fit, weighted_sample_loss)
    # The mean of the per-sample losses is the weighted training loss, so n * influence is its removal effect.
    with torch.no_grad():
        total = sum(weighted_sample_loss(model(X_fit[i:i + 1]), y_fit[i:i + 1]) for i in range(N_TRAIN))
        weighted_mean = F.cross_entropy(model(X_fit), y_fit, weight=weight)
        assert float(total) / N_TRAIN == pytest.approx(float(weighted_mean), rel=1e-12)
    test_gradients = reference_gradients(model, X_test, y_test, weighted_sample_loss)
    system = hessian + regularization * torch.eye(len(hessian), dtype=torch.float64)
    expected = (test_gradients @ torch.linalg.solve(system, train_gradients.T)).numpy()
    assert_close(got, expected, rtol=1e-12)

    unweighted = skinfl.DirectInfluence(model, regularization=regularization).fit(X[:N_TRAIN], y[:N_TRAIN])
    difference = np.abs(unweighted.influences(X[300:308], y[300:308]) - got).max()
    assert difference > 1e-2 * np.abs(got).max()
