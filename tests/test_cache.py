"""The factor cache (``memory=``): computed once, keyed soundly, stored as tensors and JSON only.

Factors are what a solver computes before ``regularization`` enters (a
curvature matrix, a preconditioner's sketch); with ``memory`` they are
stored in ``<dir>/skinfl_cache/<sha256>.safetensors``. A key must change
whenever the factors could (a cache hit then returns exactly what a fresh
computation would), and stay the same for everything the factors do not
depend on (so that a search over those computes them once).
"""

import copy
import json
import multiprocessing
import pickle
import re
import struct
from concurrent.futures import ProcessPoolExecutor

import cache_workers
import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import registry_estimator, train
from registry import check_of
from sklearn.model_selection import GridSearchCV
from torch import nn

import skinfl
from skinfl._fingerprint import fingerprint
from skinfl._tensorfile import TensorFile

ESTIMATORS = sorted(skinfl.registered_estimators().items())
NAMES = [name for name, _ in ESTIMATORS]
N_FIT = 90

# Constructor parameters that are not about the factors' inputs (model, data, loss, second_order).
NOT_SETTINGS = {"model", "loss", "parameters", "second_order", "memory", "device", "progress"}
# A value different from make()'s for each setting (by estimator where they differ); factor parameters
# must miss the cache, others hit.
OTHER_VALUES = {
    "regularization": [1.0],
    "batch_size": [7],
    "random_state": [1],
    "rtol": [1e-11],
    "atol": [1e-14],
    "max_iter": {"CgInfluence": [4000], "ArnoldiInfluence": [4000], "LissaInfluence": [40]},
    "solver": {"DirectInfluence": ["eigh"], "CgInfluence": ["independent"], "ArnoldiInfluence": ["arpack"]},
    "max_params": [5000],
    "preconditioner": ["jacobi", "ekfac", None],
    "preconditioner_rank": [7],
    "block_structure": ["full"],
    "relative_regularization": [True],
    "rank": [5],
    "krylov_dimension": [200],
    "tol": [1e-3],
    "scale": [3.0],
    "dampen": [0.01],
    "minibatch_size": [1000],  # at least the data: still deterministic, so results are comparable
    "check_every": [3],
    "fisher": ["empirical"],
    "n_target_draws": [2],
    "correct_eigenvalues": [False],
}
# Settings that a cache entry computed at a larger value serves: a smaller rank takes the top pairs of
# the cached ones (a hit whose results are those of the truncated larger factors, not those of a fresh
# fit; the low-rank estimators' tests check them).
TRUNCATED_FROM_CACHE = {"rank"}


make = registry_estimator


def results(est, X, y):
    return np.concatenate([est.influences(X[:5], y[:5]), est.self_influence(X[:5], y[:5])[:, None]], axis=1)


def entries(directory):
    return sorted((directory / "skinfl_cache").glob("*.safetensors"))


def snapshot(directory):
    """Each entry's name, inode and modification time: a rewrite (temp file + rename) changes them."""
    return {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in entries(directory)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def problem():
    """A trained 4-6-3 float64 MLP and its 90 training points (float64 X, int64 labels)."""
    rng = np.random.default_rng(11)
    X = rng.normal(size=(N_FIT, 4))
    y = (X[:, 0] + X[:, 1] ** 2 > 1).astype(np.int64) + (X[:, 2] > 0.5)
    assert set(np.unique(y)) == {0, 1, 2}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    train(model, torch.tensor(X), torch.tensor(y), F.cross_entropy, steps=100, weight_decay=1e-3)
    return model, X, y


@pytest.fixture
def computations(monkeypatch):
    """``computations(name)``: a list that grows by one per ``_compute_factors`` call of that class."""

    def patch(name):
        cls = skinfl.registered_estimators()[name]
        calls = []
        original = cls._compute_factors

        def counting(self, curvature):
            calls.append(type(self).__name__)
            return original(self, curvature)

        monkeypatch.setattr(cls, "_compute_factors", counting)
        return calls

    return patch


class ScaledNet(nn.Module):
    """An MLP whose output is multiplied by a plain Python attribute."""

    def __init__(self, scale, body):
        super().__init__()
        self.body = copy.deepcopy(body)
        self.scale = scale

    def forward(self, x):
        return self.scale * self.body(x)

    def head(self, z):
        return z


class OtherForward(ScaledNet):
    """Another ``forward``, under the same class name (so the same repr)."""

    def forward(self, x):
        return self.scale * self.body(x) ** 2


class OtherHelper(ScaledNet):
    """``forward`` delegates to a helper method; the helper differs, the ``forward`` source does not."""

    def forward(self, x):
        return self.head(self.body(x))

    def head(self, z):
        return self.scale * z


class OtherHelperEdited(OtherHelper):
    """The same class after its helper was edited (say between two sessions sharing the cache)."""

    def head(self, z):
        return self.scale * torch.tanh(z)


OtherForward.__name__ = OtherForward.__qualname__ = "ScaledNet"
OtherHelperEdited.__name__ = OtherHelperEdited.__qualname__ = "OtherHelper"


# ------------------------------------------------------------------ 1. once across regularization
@pytest.mark.parametrize("name", NAMES)
def test_factors_are_computed_once_across_regularization(problem, name, tmp_path, computations):
    model, X, y = problem
    calls = computations(name)
    cached = [results(make(name, model, regularization=r, memory=str(tmp_path)).fit(X, y), X, y)
              for r in (0.1, 1.0, 0.1)]
    assert len(calls) == 1
    assert len(entries(tmp_path)) == 1
    uncached = {r: results(make(name, model, regularization=r).fit(X, y), X, y) for r in (0.1, 1.0)}
    assert len(calls) == 3
    # Factors read back from the file are bitwise those computed: the results are identical.
    assert np.array_equal(cached[0], uncached[0.1])
    assert np.array_equal(cached[1], uncached[1.0])
    assert np.array_equal(cached[2], uncached[0.1])
    assert not np.allclose(uncached[0.1], uncached[1.0])


# ------------------------------------------------------------------ 2. grid search
@pytest.mark.parametrize("name", NAMES)
def test_grid_search_computes_factors_once_per_training_set(problem, name, tmp_path, computations):
    model, X, y = problem
    grid = {"regularization": [0.01, 0.1, 1.0]}
    plain = GridSearchCV(make(name, model), grid, cv=3).fit(X, y)
    calls = computations(name)
    search = GridSearchCV(make(name, model, memory=str(tmp_path)), grid, cv=3).fit(X, y)
    # One computation per fold (3 candidates each), and one for the refit on all the data.
    assert len(calls) == 3 + 1
    assert len(entries(tmp_path)) == 3 + 1
    for key in ("mean_test_score", "split0_test_score", "split1_test_score", "split2_test_score"):
        assert np.array_equal(search.cv_results_[key], plain.cv_results_[key])
    assert np.all(np.isfinite(search.cv_results_["mean_test_score"]))
    # Searching again computes nothing.
    GridSearchCV(make(name, model, memory=str(tmp_path)), grid, cv=3).fit(X, y)
    assert len(calls) == 4


@pytest.mark.parametrize("name", NAMES)
def test_parallel_grid_search_shares_the_cache(problem, name, tmp_path, computations):
    model, X, y = problem
    grid = {"regularization": [0.01, 0.1, 1.0]}
    first = GridSearchCV(make(name, model, memory=str(tmp_path)), grid, cv=3, n_jobs=2).fit(X, y)
    before = snapshot(tmp_path)
    assert len(before) == 3 + 1
    assert not [p for p in (tmp_path / "skinfl_cache").iterdir() if p.suffix != ".safetensors"]
    second = GridSearchCV(make(name, model, memory=str(tmp_path)), grid, cv=3, n_jobs=2).fit(X, y)
    # The workers (other processes) found every entry: none was written again.
    assert snapshot(tmp_path) == before
    assert np.array_equal(second.cv_results_["mean_test_score"], first.cv_results_["mean_test_score"])
    # Keys computed in the workers are those of this process.
    calls = computations(name)
    serial = GridSearchCV(make(name, model, memory=str(tmp_path)), grid, cv=3).fit(X, y)
    assert calls == []
    assert snapshot(tmp_path) == before
    assert np.array_equal(serial.cv_results_["mean_test_score"], first.cv_results_["mean_test_score"])


# ------------------------------------------------------------------ processes at once
N_PROCESSES = 3


@pytest.fixture(scope="module")
def workers():
    """Three spawned processes, whose tasks start together (cache_workers.start's barrier)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(N_PROCESSES, mp_context=context, initializer=cache_workers.start,
                             initargs=(context.Barrier(N_PROCESSES),)) as pool:
        yield pool


@pytest.mark.parametrize("name", NAMES)
def test_processes_fitting_at_once_compute_the_factors_once(problem, name, tmp_path, workers):
    """Processes that miss the same entry at once (the workers of a parallel search, fitting the same fold)
    compute it once: the first holds its lock while it computes and stores it, the others wait and read it.
    The computation is slowed down so that every process misses the entry before it is stored."""
    model, X, y = problem
    log = tmp_path / "computations.log"
    directory = tmp_path / "memory"
    futures = [workers.submit(cache_workers.fit_with_memory, name, model, X, y, str(directory), str(log), 0.5)
               for _ in range(N_PROCESSES)]
    got = [future.result(timeout=300) for future in futures]
    assert len(log.read_text().splitlines()) == 1
    assert len(entries(directory)) == 1
    assert [path.name for path in (directory / "skinfl_cache").iterdir() if path.suffix != ".safetensors"] == []
    for other in got[1:]:  # read back bitwise as computed
        assert np.array_equal(other, got[0])
    assert np.array_equal(got[0], results(make(name, model).fit(X, y), X, y))


# ------------------------------------------------------------------ 3. sound keys
class CacheCheck:
    """Fits with the cache and without it, and says whether the cached fit computed."""

    def __init__(self, name, directory, calls, X_test, y_test):
        self.name, self.directory, self.calls = name, str(directory), calls
        self.X_test, self.y_test = X_test, y_test

    def __call__(self, model, X, y, *, exact=True, **params):
        """Fit with the cache; returns whether it missed, after checking its results against no cache."""
        before = len(self.calls)
        memory = params.pop("memory", self.directory)
        cached = make(self.name, model, memory=memory, **params).fit(X, y)
        missed = len(self.calls) - before
        assert missed in (0, 1)
        fresh = make(self.name, model, **params).fit(X, y)
        got, expected = results(cached, self.X_test, self.y_test), results(fresh, self.X_test, self.y_test)
        outcome = f"cache {'miss' if missed else 'hit'} with {params or 'the same settings'}"
        if exact is None:  # served by larger cached factors (TRUNCATED_FROM_CACHE): not those of a fresh fit
            pass
        elif exact:
            assert np.array_equal(got, expected), (
                f"{outcome}: results differ from an uncached fit by up to {np.abs(got - expected).max():.3g}"
            )
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12 * np.abs(expected).max(),
                                       err_msg=outcome)
        self.last = got
        return bool(missed)


@pytest.mark.parametrize("name", NAMES)
def test_keys_change_with_what_the_factors_depend_on(problem, name, tmp_path, computations):
    model, X, y = problem
    fit = CacheCheck(name, tmp_path, computations(name), X, y)
    assert fit(model, X, y)
    base = fit.last

    # The model: a plain attribute used in forward.
    scaled = ScaledNet(3.0, model)
    assert fit(scaled, X, y)
    scaled_results = fit.last
    unscaled = copy.deepcopy(scaled)
    unscaled.scale = 1.0
    assert fit(unscaled, X, y)
    assert not np.allclose(fit.last, scaled_results)
    # The model: another forward, same weights, same class name and repr.
    other_forward = OtherForward(3.0, model)
    assert repr(other_forward) == repr(scaled)
    assert fit(other_forward, X, y)
    assert not np.allclose(fit.last, scaled_results)

    # The data: one input value, one label.
    X_changed = X.copy()
    X_changed[17, 2] += 1e-3
    assert fit(model, X_changed, y)
    y_changed = y.copy()
    y_changed[5] = (y_changed[5] + 1) % 3
    assert fit(model, X, y_changed)

    # The curvature and the loss, down to its class weights.
    cls = skinfl.registered_estimators()[name]
    if "hessian" in check_of(cls).second_order:
        assert fit(model, X, y, second_order="hessian")
    weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    assert fit(model, X, y, loss=nn.CrossEntropyLoss(weight=weights))
    weighted = fit.last
    assert fit(model, X, y, loss=nn.CrossEntropyLoss(weight=weights * torch.tensor([1.0, 1.0, 1.5])))
    assert not np.allclose(fit.last, weighted)
    assert not fit(model, X, y, loss=nn.CrossEntropyLoss(weight=weights.clone()))

    # The solver's factor parameters miss; every other setting hits.
    # Deprecated names stand for their new ones (tests/test_deprecations.py).
    settings = set(make(name, model).get_params(deep=False)) - NOT_SETTINGS - set(cls._renamed_parameters)
    unknown = settings - set(OTHER_VALUES)
    if unknown:
        pytest.fail(f"{name} has settings {sorted(unknown)}: add other values for them to OTHER_VALUES.")
    assert set(cls._factor_parameters) <= settings
    for setting in sorted(settings):
        values = OTHER_VALUES[setting]
        for value in values[name] if isinstance(values, dict) else values:
            if setting in TRUNCATED_FROM_CACHE:
                assert not fit(model, X, y, exact=None, **{setting: value}), (setting, value)
                continue
            missed = fit(model, X, y, exact=setting != "batch_size", **{setting: value})
            assert missed == (setting in cls._factor_parameters), (setting, value)

    # The same content in other objects hits.
    assert not fit(copy.deepcopy(model), X.copy(), y.copy())
    assert np.array_equal(fit.last, base)
    assert not fit(ScaledNet(3.0, model), X, y)
    assert np.array_equal(fit.last, scaled_results)
    memmap = np.lib.format.open_memmap(tmp_path / "X.npy", mode="w+", dtype=X.dtype, shape=X.shape)
    memmap[:] = X
    assert not fit(model, memmap, y)
    assert not fit(model, X, y, memory=joblib.Memory(tmp_path, verbose=0))
    n_entries = len(entries(tmp_path))
    assert fit(model, X, y, memory=joblib.Memory(None, verbose=0))  # no location: nothing cached
    assert len(entries(tmp_path)) == n_entries


@pytest.mark.parametrize("name", NAMES)
def test_keys_change_with_helper_methods_of_forward(problem, name, tmp_path, computations):
    """Editing a method that ``forward`` calls changes the model as much as editing ``forward``."""
    model, X, y = problem
    fit = CacheCheck(name, tmp_path, computations(name), X, y)
    original, edited = OtherHelper(3.0, model), OtherHelperEdited(3.0, model)
    assert repr(original) == repr(edited)
    assert type(original).__qualname__ == type(edited).__qualname__
    assert fit(original, X, y)
    assert fit(edited, X, y), "a model whose helper method changed got the factors of the old model"


# ------------------------------------------------------------------ 4. tensors and JSON only
def forbid(*args, **kwargs):
    raise AssertionError("the factor cache must never unpickle")


@pytest.mark.parametrize("name", NAMES)
def test_entries_are_tensors_and_json_never_unpickled(problem, name, tmp_path, computations, monkeypatch):
    model, X, y = problem
    calls = computations(name)
    first = make(name, model, memory=tmp_path).fit(X, y)
    (path,) = entries(tmp_path)
    assert re.fullmatch(r"[0-9a-f]{64}\.safetensors", path.name)
    entry = TensorFile(path).verify()
    assert set(entry.names()) == set(first._factors)
    for tensor_name in entry.names():
        assert torch.equal(entry.tensor(tensor_name), first._factors[tensor_name].cpu())
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_length])
    assert header["__metadata__"]["format"] == "skinfl"
    assert json.loads(header["__metadata__"]["skinfl"]) == entry.metadata

    for module, attribute in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (joblib, "load"),
                              (torch, "load")):
        monkeypatch.setattr(module, attribute, forbid)
    second = make(name, model, memory=tmp_path, regularization=0.5).fit(X, y)
    assert len(calls) == 1  # a hit
    monkeypatch.undo()
    fresh = make(name, model, regularization=0.5).fit(X, y)
    assert np.array_equal(results(second, X, y), results(fresh, X, y))


# ------------------------------------------------------------------ 5. corrupted entries
@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
@pytest.mark.parametrize("name", NAMES)
def test_corrupted_entry_is_recomputed_with_a_warning(problem, name, damage, tmp_path, computations):
    model, X, y = problem
    calls = computations(name)
    expected = results(make(name, model, memory=tmp_path).fit(X, y), X, y)
    (path,) = entries(tmp_path)
    original = path.read_bytes()
    entry = TensorFile(path)
    damaged = bytearray(original)
    if damage == "flipped byte":
        position = entry.data_start + entry.data_size // 2 if entry.data_size else 8 + 2
        damaged[position] ^= 0x01
    else:
        damaged = damaged[:-8]
    path.write_bytes(bytes(damaged))

    with pytest.warns(UserWarning, match="unreadable cache entry"):
        est = make(name, model, memory=tmp_path).fit(X, y)
    assert len(calls) == 2
    assert np.array_equal(results(est, X, y), expected)
    TensorFile(path).verify()
    assert path.read_bytes() == original
    # The rewritten entry is used again.
    make(name, model, memory=tmp_path).fit(X, y)
    assert len(calls) == 2


# ------------------------------------------------------------------ 6. fingerprint
def test_fingerprint_of_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).double()
    assert fingerprint(model) == fingerprint(copy.deepcopy(model))
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[1].running_mean[3] += 1e-9  # a buffer
    assert fingerprint(changed) != fingerprint(model)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        weight = changed[2].weight
        weight[1, 4] = torch.nextafter(weight[1, 4], torch.tensor(np.inf, dtype=torch.float64))  # one ulp
    assert fingerprint(changed) != fingerprint(model)
    changed = copy.deepcopy(model)
    changed[1].eps = 2e-5  # a plain attribute of a submodule
    assert fingerprint(changed) != fingerprint(model)

    scaled = ScaledNet(3.0, model)
    assert fingerprint(scaled) == fingerprint(ScaledNet(3.0, model))
    assert fingerprint(scaled) != fingerprint(ScaledNet(1.0, model))
    assert fingerprint(OtherForward(3.0, model)) != fingerprint(scaled)


def test_fingerprint_of_arrays(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(300, 7))
    assert fingerprint(array) == fingerprint(array.copy())
    assert fingerprint(array) == fingerprint(np.asfortranarray(array))  # content, not layout
    changed = array.copy()
    changed[299, 6] = np.nextafter(changed[299, 6], np.inf)
    assert fingerprint(changed) != fingerprint(array)
    changed = array.copy()
    changed[0, 0] = -changed[0, 0]
    assert fingerprint(changed) != fingerprint(array)
    assert fingerprint(array.astype(np.float32)) != fingerprint(array.astype(np.float32).astype(np.float64))
    assert fingerprint(array.reshape(700, 3)) != fingerprint(array)
    assert fingerprint(np.arange(6)) != fingerprint(np.arange(6).reshape(2, 3))

    memmap = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=array.dtype, shape=array.shape)
    memmap[:] = array
    memmap.flush()
    assert fingerprint(np.load(tmp_path / "a.npy", mmap_mode="r")) == fingerprint(array)
    # Read in chunks (here of 16 rows): the same content gives the same fingerprint whatever the chunking.
    monkeypatch.setattr("skinfl._fingerprint._CHUNK_BYTES", 16 * 7 * 8)
    reads = []

    class Rows:
        shape, dtype = array.shape, array.dtype

        def __len__(self):
            return len(array)

        def __getitem__(self, index):
            reads.append(len(array[index]))
            return array[index]

    assert fingerprint(Rows()) == fingerprint(array)
    assert max(reads) == 16 and sum(reads) >= len(array)


def test_fingerprint_of_functions():
    def scaled_loss(scale):
        return lambda output, target: scale * F.cross_entropy(output, target)

    assert fingerprint(scaled_loss(1.0)) == fingerprint(scaled_loss(1.0))
    assert fingerprint(scaled_loss(1.0)) != fingerprint(scaled_loss(2.0))

    def weighted_loss(weights):
        return lambda output, target: F.cross_entropy(output, target, weight=torch.tensor(weights))

    assert fingerprint(weighted_loss(np.ones(3))) == fingerprint(weighted_loss(np.ones(3)))
    assert fingerprint(weighted_loss(np.ones(3))) != fingerprint(weighted_loss(np.array([1.0, 2.0, 1.0])))

    def with_default(output, target, scale=1.0):
        return scale * F.mse_loss(output, target)

    def with_other_default(output, target, scale=2.0):
        return scale * F.mse_loss(output, target)

    assert fingerprint(with_default) != fingerprint(with_other_default)
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint([1, 2]) != fingerprint((1, 2))
    assert re.fullmatch("[0-9a-f]{64}", fingerprint(with_default))
