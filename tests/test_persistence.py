"""skinfl.save / skinfl.load: safe files (tensors plus JSON, nothing unpickled), and pickling.

Every registered estimator is covered through the registry: a new estimator
is tested here by declaring its class (with its registry entry's parameters).
Saved and loaded estimators must give bit-identical results.
"""

import io
import json
import os
import pickle
import re
import struct
import warnings

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn

import skinfl
from conftest import quick_params

from skinfl import load, registered_estimators, save
from skinfl._devices import available_device
from skinfl._tensorfile import TensorFile, TensorFileError, write

ESTIMATORS = list(registered_estimators().values())
over_registry = pytest.mark.parametrize("cls", ESTIMATORS, ids=[cls.__name__ for cls in ESTIMATORS])

FITTED_ATTRIBUTES = ("n_params_", "n_samples_fit_", "n_features_in_", "input_shape_", "output_shape_",
                     "trainable_parameters_", "device_")

# safetensors dtype names and their item sizes, for the independent reader.
SAFETENSORS_DTYPES = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "I16": np.int16, "U16": np.uint16,
                      "I32": np.int32, "U32": np.uint32, "I64": np.int64, "U64": np.uint64, "F16": np.float16,
                      "F32": np.float32, "F64": np.float64}
SAFETENSORS_ITEMSIZE = {name: np.dtype(dtype).itemsize for name, dtype in SAFETENSORS_DTYPES.items()}
SAFETENSORS_ITEMSIZE["BF16"] = 2

NOT_AVAILABLE = "which is not available here; it was loaded on cpu"


# ------------------------------------------------------------------ helpers
def custom_cross_entropy(output, target):
    """A custom loss callable: code, so it is not saved."""
    return F.cross_entropy(output, target)


class DoubledCrossEntropy(nn.CrossEntropyLoss):
    """A subclass of a torch loss with another forward: custom, not the torch class."""

    def forward(self, output, target):
        return 2 * super().forward(output, target)


def mlp(hidden=5, seed=0):
    """The architecture of conftest's classification model (4 -> hidden -> 3), freshly initialised."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3)).double()


def make(cls, model, **overrides):
    """An estimator of ``cls`` under its exact parameters, seeded when it takes a seed."""
    params = {"regularization": 0.1, **quick_params(cls, model)}
    if "random_state" in cls(model).get_params():
        params["random_state"] = 0
    params.update(overrides)
    return cls(model, **params)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def held_out():
    generator = torch.Generator().manual_seed(7)
    X_test = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    y_test = torch.arange(6) % 3
    X_val = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    y_val = (X_val[:, 0] + X_val[:, 1] ** 2 > 1).long() + (X_val[:, 2] > 0.5).long()
    return X_test, y_test, X_val, y_val


def results(est, X_test, y_test, X_val=None, y_val=None):
    """What an estimator computes, for bitwise comparison: everything when given held-out data to score."""
    computed = {
        "influences": est.influences(X_test, y_test),
        "top both": est.top_influences(X_test, y_test, k=3, which="both"),
        "self influence": est.self_influence(X_test, y_test),
    }
    if X_val is not None:
        computed.update({
            "influences without y_test": est.influences(X_test),
            "influences on given points": est.influences(X_test, y_test, X_val, y_val),
            "perturbation influences": est.influences(X_test[:2], y_test[:2], mode="perturbation"),
            "top helpful": est.top_influences(X_test, y_test, k=5),
            "transform": est.transform(X_test, y_test),
            "transform without y": est.transform(X_test),
            "score": est.score(X_val, y_val),
        })
    return computed


def assert_same(actual, expected, what=""):
    """Bitwise equality, with the same container type, dtype and device."""
    if isinstance(expected, tuple):
        assert isinstance(actual, tuple) and len(actual) == len(expected), what
        for a, e in zip(actual, expected):
            assert_same(a, e, what)
    elif isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), what
        assert actual.dtype == expected.dtype and actual.device == expected.device, what
        assert torch.equal(actual, expected), what
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray), what
        assert actual.dtype == expected.dtype, what
        assert np.array_equal(actual, expected), what
    else:
        assert isinstance(actual, float) and isinstance(expected, float), what
        assert actual == expected, what


def assert_identical(actual, expected):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert_same(actual[key], expected[key], key)


def assert_same_weights(module, reference):
    state, expected = module.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name in expected:
        assert torch.equal(state[name], expected[name]), name


def not_available_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and "not available" in str(w.message)]


def read_file(path):
    """A minimal independent reader of the safetensors layout: (header, metadata, data bytes, data start)."""
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_length].decode("utf-8"))
    metadata = header.pop("__metadata__")
    return header, metadata, raw[8 + header_length:], 8 + header_length


def tensor_of(entry, data):
    begin, end = entry["data_offsets"]
    dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]]).newbyteorder("<")
    return np.frombuffer(data[begin:end], dtype=dtype).reshape(entry["shape"])


def header_span(path):
    """Byte range of the JSON header in the file."""
    (header_length,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8, 8 + header_length


def replaced_once(raw, old, new):
    """``raw`` with ``old`` replaced by ``new`` (same length), which must occur exactly once."""
    assert len(old) == len(new) and raw.count(old) == 1, (old, raw.count(old))
    return raw.replace(old, new)


@pytest.fixture
def fitted(classification_problem):
    """``fitted(cls, **params)``: an estimator of ``cls`` fitted on the classification problem."""
    model, X, y = classification_problem

    def fit(cls, **params):
        return make(cls, model, **params).fit(X, y)

    return fit


# ------------------------------------------------------------------ 1. round trip
def training_set(kind, X, y, tmp_path):
    if kind == "torch":
        return X, y
    if kind == "numpy":
        return X.numpy().copy(), y.numpy().copy()
    X_map = np.memmap(tmp_path / "X.dat", dtype=np.float64, mode="w+", shape=tuple(X.shape))
    X_map[:] = X.numpy()
    X_map.flush()
    y_map = np.memmap(tmp_path / "y.dat", dtype=np.int64, mode="w+", shape=tuple(y.shape))
    y_map[:] = y.numpy()
    y_map.flush()
    return np.memmap(tmp_path / "X.dat", dtype=np.float64, mode="r", shape=tuple(X.shape)), \
        np.memmap(tmp_path / "y.dat", dtype=np.int64, mode="r", shape=tuple(y.shape))


@over_registry
@pytest.mark.parametrize("kind", ["torch", "numpy", "memmap"])
def test_round_trip_is_bit_identical(cls, kind, classification_problem, held_out, tmp_path):
    model, X, y = classification_problem
    X_fit, y_fit = training_set(kind, X, y, tmp_path)
    inputs = held_out if kind == "torch" else tuple(a.numpy() for a in held_out)
    est = make(cls, model).fit(X_fit, y_fit)
    expected = results(est, *inputs)
    assert np.count_nonzero(np.asarray(expected["influences"])) > 0

    path = tmp_path / "saved" / "est.skinfl"  # the folder does not exist yet
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        returned = save(est, str(path))
        loaded = load(path, model)
    assert not not_available_warnings(record)
    assert returned == path and isinstance(returned, os.PathLike)
    assert sorted(p.name for p in path.parent.iterdir()) == ["est.skinfl"]  # no temporary file left behind

    assert type(loaded) is cls
    assert_identical(results(loaded, *inputs), expected)

    original, restored = est.get_params(deep=False), loaded.get_params(deep=False)
    assert restored.keys() == original.keys()
    for name, value in original.items():
        if name != "model":
            assert restored[name] == value and type(restored[name]) is type(value), name
    assert loaded.model is not model
    assert_same_weights(loaded.model, model)
    assert loaded.model.training == model.training
    assert [p.requires_grad for p in loaded.model.parameters()] == \
        [p.requires_grad for p in model.parameters()]
    for name in FITTED_ATTRIBUTES:
        assert getattr(loaded, name) == getattr(est, name), name
        assert type(getattr(loaded, name)) is type(getattr(est, name)), name

    assert np.array_equal(np.asarray(loaded._fit_data.X), X.numpy())
    assert np.array_equal(np.asarray(loaded._fit_data.y), y.numpy())
    if kind == "memmap":
        # The training data stays on disk: a read-only memmap into the saved file, not a copy in memory.
        assert isinstance(loaded._fit_data.X, np.memmap)
        assert os.path.samefile(loaded._fit_data.X.filename, path)
        assert not loaded._fit_data.X.flags.writeable


@over_registry
def test_loaded_estimator_clones_refits_and_saves_again(cls, fitted, classification_problem, held_out,
                                                        tmp_path):
    model, X, y = classification_problem
    est = fitted(cls)
    expected = results(est, *held_out[:2])
    path = save(est, tmp_path / "est.skinfl")
    loaded = load(path, model)

    refitted = clone(loaded).fit(X, y)
    assert_identical(results(refitted, *held_out[:2]), expected)

    # Saving again, here over the very file the loaded training data is mapped from.
    save(loaded, path)
    assert_identical(results(load(path, model), *held_out[:2]), expected)
    again = save(loaded, tmp_path / "again.skinfl")
    assert_identical(results(load(again, mlp(seed=5)), *held_out[:2]), expected)


@over_registry
def test_random_state_instance_and_memory_round_trip(cls, classification_problem, held_out, tmp_path):
    model, X, y = classification_problem
    memory = joblib.Memory(tmp_path / "cache", verbose=0)
    est = make(cls, model, memory=memory)
    if "random_state" in est.get_params():
        est.set_params(random_state=np.random.RandomState(0))
    est.fit(X, y)
    X_test, y_test, _, _ = held_out
    loaded = load(save(est, tmp_path / "est.skinfl"), model)
    assert_same(loaded.influences(X_test, y_test), est.influences(X_test, y_test))
    assert_same(loaded.self_influence(X_test, y_test), est.self_influence(X_test, y_test))
    assert os.fspath(loaded.memory) == os.fspath(memory.location)


# ------------------------------------------------------------------ 2. include_data=False
def solves_with_training_curvature(est, X_test, y_test):
    """Whether solving (transform) takes curvature products over the fitted data."""
    calls = []
    real = est._curvature

    def spy(data=None):
        calls.append(data)
        return real(data)

    est._curvature = spy
    try:
        est.transform(X_test, y_test)
    finally:
        del est._curvature
    return any(data is None for data in calls)


@over_registry
def test_without_training_data(cls, fitted, classification_problem, held_out, tmp_path):
    model, X, y = classification_problem
    X_test, y_test, X_val, y_val = held_out
    est = fitted(cls)
    with_data = save(est, tmp_path / "with.skinfl")
    without = save(est, tmp_path / "without.skinfl", include_data=False)
    assert with_data.stat().st_size - without.stat().st_size >= X.numel() * 8 + y.numel() * 8
    loaded = load(without, model)

    for call in (lambda: loaded.influences(X_test, y_test),
                 lambda: loaded.top_influences(X_test, y_test, k=3)):
        with pytest.raises(ValueError) as error:
            call()
        assert "include_data=False" in str(error.value) and "X, y" in str(error.value)

    needs_data = solves_with_training_curvature(est, X_test, y_test)
    # Sanity check of the detection on the estimators known today.
    if cls.__name__ == "CgInfluence":
        assert needs_data
    if cls.__name__ == "DirectInfluence":
        assert not needs_data

    calls = {
        "transform": (lambda e: e.transform(X_test, y_test)),
        "self_influence": (lambda e: e.self_influence(X_test, y_test)),
        "influences with X, y": (lambda e: e.influences(X_test, y_test, X, y)),
        "top_influences with X, y": (lambda e: e.top_influences(X_test, y_test, k=3, X=X, y=y)),
        "score": (lambda e: e.score(X_val, y_val)),
    }
    for what, call in calls.items():
        if needs_data:
            with pytest.raises(ValueError, match="saved without its training data") as error:
                call(loaded)
            assert "include_data=True" in str(error.value), what
        else:
            assert_same(call(loaded), call(est), what)
    if not needs_data:
        assert_same(loaded.influences(X_test, y_test, X, y), est.influences(X_test, y_test))


# ------------------------------------------------------------------ 3. nothing is unpickled
def refuse_to_unpickle(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("skinfl.load unpickled or torch.load-ed something")

    class RefusingUnpickler:
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(joblib, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    monkeypatch.setattr(np, "load", refuse)


@over_registry
def test_load_never_unpickles(cls, fitted, classification_problem, held_out, tmp_path, monkeypatch):
    model, _, _ = classification_problem
    est = fitted(cls)
    expected = results(est, *held_out[:2])
    path = save(est, tmp_path / "est.skinfl")
    refuse_to_unpickle(monkeypatch)
    loaded = load(path, model)
    assert_identical(results(loaded, *held_out[:2]), expected)


def test_a_pickle_file_is_refused_without_being_unpickled(fitted, classification_problem, tmp_path,
                                                          monkeypatch):
    model, _, _ = classification_problem
    path = tmp_path / "est.joblib"
    joblib.dump(fitted(ESTIMATORS[0]), path)
    refuse_to_unpickle(monkeypatch)
    with pytest.raises(ValueError, match="not a valid skinfl file"):
        load(path, model)


# ------------------------------------------------------------------ 4. tampering
@pytest.fixture
def saved(fitted, tmp_path):
    return save(fitted(ESTIMATORS[0]), tmp_path / "est.skinfl")


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_data_byte_is_refused(saved, classification_problem, where):
    model, _, _ = classification_problem
    raw = bytearray(saved.read_bytes())
    _, start = header_span(saved)
    position = {"first": start, "middle": (start + len(raw)) // 2, "last": len(raw) - 1}[where]
    raw[position] ^= 0x01
    saved.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="modified or corrupted"):
        load(saved, model)


@pytest.mark.parametrize("edit", ["regularization", "dtype", "digest"])
def test_an_edited_header_of_the_same_length_is_refused(saved, classification_problem, edit):
    model, _, _ = classification_problem
    raw = saved.read_bytes()
    if edit == "regularization":
        raw = replaced_once(raw, b'\\"regularization\\": 0.1,', b'\\"regularization\\": 0.2,')
    elif edit == "dtype":  # the training targets read as another dtype of the same size
        header, _, _, _ = read_file(saved)
        name = next(name for name, entry in header.items() if entry["dtype"] == "I64")
        old = json.dumps({name: header[name]}, separators=(",", ":"))[1:-1].encode()
        raw = replaced_once(raw, old, old.replace(b'"I64"', b'"F64"'))
    else:
        _, metadata, _, _ = read_file(saved)
        digest = metadata["sha256"].encode()
        raw = replaced_once(raw, digest, digest[:-1] + (b"0" if digest[-1:] != b"0" else b"1"))
    saved.write_bytes(raw)
    header, metadata, _, _ = read_file(saved)  # still a well-formed file
    if edit == "regularization":
        assert json.loads(metadata["skinfl"])["params"]["regularization"] == 0.2
    with pytest.raises(ValueError, match="modified or corrupted"):
        load(saved, model)


def test_a_header_that_is_not_json_is_refused(saved, classification_problem):
    model, _, _ = classification_problem
    raw = bytearray(saved.read_bytes())
    begin, _ = header_span(saved)
    assert raw[begin:begin + 1] == b"{"
    raw[begin] = ord("x")
    saved.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="not a valid skinfl file"):
        load(saved, model)


@pytest.mark.parametrize("keep", ["nothing", "half the length", "the length", "half the header", "the header",
                                  "all but one byte"])
def test_a_truncated_file_is_refused(saved, classification_problem, keep):
    model, _, _ = classification_problem
    raw = saved.read_bytes()
    _, header_end = header_span(saved)
    size = {"nothing": 0, "half the length": 4, "the length": 8, "half the header": header_end // 2,
            "the header": header_end, "all but one byte": len(raw) - 1}[keep]
    saved.write_bytes(raw[:size])
    with pytest.raises(ValueError, match="not a valid skinfl file"):
        load(saved, model)


def test_an_extended_file_is_refused(saved, classification_problem):
    model, _, _ = classification_problem
    saved.write_bytes(saved.read_bytes() + b"\x00" * 8)
    with pytest.raises(ValueError, match="not a valid skinfl file"):
        load(saved, model)


def safetensors_bytes(header):
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("content", ["random bytes", "text", "npy", "huge header length", "json array",
                                     "plain safetensors", "no digest"])
def test_a_file_that_is_not_skinfl_is_refused(classification_problem, tmp_path, content):
    model, _, _ = classification_problem
    path = tmp_path / "other.skinfl"
    weights = np.arange(6, dtype=np.float64).tobytes()
    if content == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes())
    elif content == "text":
        path.write_text("regularization = 0.1\n" * 50)
    elif content == "npy":
        with open(path, "wb") as file:
            np.save(file, np.arange(100.0))
    elif content == "huge header length":
        path.write_bytes(struct.pack("<Q", 2**63) + b"{}" * 100)
    elif content == "json array":
        path.write_bytes(safetensors_bytes([1, 2, 3]))
    elif content == "plain safetensors":  # a valid safetensors file, not written by skinfl
        table = {"weight": {"dtype": "F64", "shape": [2, 3], "data_offsets": [0, 48]},
                 "__metadata__": {"format": "pt"}}
        path.write_bytes(safetensors_bytes(table) + weights)
    else:  # skinfl metadata without the digest
        table = {"weight": {"dtype": "F64", "shape": [2, 3], "data_offsets": [0, 48]},
                 "__metadata__": {"format": "skinfl",
                                  "skinfl": json.dumps({"estimator": ESTIMATORS[0].__name__})}}
        path.write_bytes(safetensors_bytes(table) + weights)
    with pytest.raises(ValueError, match="not a valid skinfl file"):
        load(path, model)


CRAFTED = {
    "unchanged": (lambda meta: None, None),
    "unknown estimator": (lambda meta: meta.update(estimator="NoSuchInfluence"), "unknown estimator"),
    "newer format": (lambda meta: meta.update(format_version=meta["format_version"] + 1), "format"),
    "no fitted attributes": (lambda meta: meta.pop("fitted"), "not a valid skinfl file"),
    "unknown parameter": (lambda meta: meta["params"].update(no_such_parameter=1), "not a valid skinfl file"),
    "invalid parameter": (lambda meta: meta["params"].update(regularization=-1.0), "regularization"),
    "unknown torch loss": (
        lambda meta: meta.update(loss={"kind": "torch", "class": "Module", "attributes": {}, "buffers": []}),
        "unknown torch loss"),
    "invalid device": (lambda meta: meta.update(device="cuda:banana"), "cuda:banana"),
}


@pytest.mark.parametrize("edit", list(CRAFTED))
def test_crafted_metadata_with_a_valid_digest_is_refused(saved, classification_problem, tmp_path, edit):
    """A digest is no signature: a file written with edited metadata must still fail with a ValueError."""
    model, _, _ = classification_problem
    original = TensorFile(saved)
    metadata = json.loads(json.dumps(original.metadata))
    change, message = CRAFTED[edit]
    change(metadata)
    crafted = tmp_path / "crafted.skinfl"
    write(crafted, {name: original.tensor(name) for name in original.names()}, metadata)
    if message is None:  # the crafting itself gives a loadable file
        assert type(load(crafted, model)).__name__ == metadata["estimator"]
        return
    with pytest.raises(ValueError, match=message):
        load(crafted, model)


def test_tensor_file_errors_are_value_errors():
    assert issubclass(TensorFileError, ValueError)


# ------------------------------------------------------------------ 5. the model passed to load
@pytest.mark.parametrize("other", ["wider", "other layers"])
def test_a_model_of_another_architecture_is_refused(saved, other):
    model = mlp(hidden=7) if other == "wider" else nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match="do not fit the model"):
        load(saved, model)


@over_registry
def test_a_model_of_another_dtype_is_refused_or_given_the_saved_weights(cls, fitted, held_out, tmp_path):
    """The saved estimator computes in float64: a float32 model must not silently change it."""
    est = fitted(cls)
    X_test, y_test = held_out[:2]
    path = save(est, tmp_path / "est.skinfl")
    try:
        loaded = load(path, mlp().float())
    except ValueError as error:
        assert "do not fit the model" in str(error) or "dtype" in str(error)
    else:
        assert_identical(results(loaded, X_test, y_test), results(est, X_test, y_test))


@over_registry
def test_the_saved_weights_replace_those_of_the_model_passed(cls, fitted, classification_problem, held_out,
                                                             tmp_path):
    model, _, _ = classification_problem
    est = fitted(cls)
    expected = results(est, *held_out[:2])
    path = save(est, tmp_path / "est.skinfl")
    random_model = mlp(seed=123)
    random_weights = {name: t.clone() for name, t in random_model.state_dict().items()}
    assert not torch.equal(random_weights["0.weight"], model.state_dict()["0.weight"])

    loaded = load(path, random_model)
    assert_same_weights(loaded.model, model)
    assert loaded.model is not random_model
    for name, tensor in random_model.state_dict().items():  # the model passed is left as it was
        assert torch.equal(tensor, random_weights[name]), name
    assert_identical(results(loaded, *held_out[:2]), expected)


@over_registry
def test_frozen_parameters_stay_frozen(cls, classification_problem, held_out, tmp_path):
    model, X, y = classification_problem
    partly_frozen = mlp()
    partly_frozen.load_state_dict(model.state_dict())
    partly_frozen[0].requires_grad_(False)
    est = make(cls, partly_frozen).fit(X, y)
    assert est.trainable_parameters_ == ["2.weight", "2.bias"]
    expected = results(est, *held_out[:2])

    loaded = load(save(est, tmp_path / "est.skinfl"), mlp(seed=3))  # every parameter trainable
    assert loaded.trainable_parameters_ == ["2.weight", "2.bias"] and loaded.n_params_ == est.n_params_ == 18
    assert [p.requires_grad for p in loaded.model.parameters()] == [False, False, True, True]
    assert_identical(results(loaded, *held_out[:2]), expected)


# ------------------------------------------------------------------ 6. losses
def targets_for(loss, X):
    """Targets of ``X`` for a loss name: class labels, or 3 values per sample."""
    if loss == "cross_entropy":
        return (X[:, 0] + X[:, 1] ** 2 > 1).long() + (X[:, 2] > 0.5).long()
    signs = torch.stack([X[:, 0] > 0, X[:, 1] > 0, X[:, 0] + X[:, 3] > 0], dim=1).double()
    return signs if loss == "bce_with_logits" else 2 * signs - 1 + 0.1 * X[:, :3]


@over_registry
@pytest.mark.parametrize("name", ["cross_entropy", "mse", "bce_with_logits"])
def test_builtin_loss_round_trip(cls, name, classification_problem, held_out, tmp_path):
    model, X, _ = classification_problem
    X_test = held_out[0]
    y, y_test = targets_for(name, X), targets_for(name, X_test)
    est = make(cls, model, loss=name, second_order="gauss_newton").fit(X, y)
    loaded = load(save(est, tmp_path / "est.skinfl"), model)
    assert loaded.loss == name and loaded.loss_.kind == est.loss_.kind
    assert_identical(results(loaded, X_test, y_test), results(est, X_test, y_test))


def torch_losses():
    return {
        "weighted cross entropy": (
            nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.5, 0.5], dtype=torch.float64),
                                label_smoothing=0.1),
            "cross_entropy"),
        "bce with pos_weight": (
            nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)),
            "bce_with_logits"),
        "mse sum": (nn.MSELoss(reduction="sum"), "mse"),
    }


@over_registry
@pytest.mark.parametrize("which", list(torch_losses()))
def test_torch_loss_module_round_trip(cls, which, classification_problem, held_out, tmp_path):
    model, X, _ = classification_problem
    loss, kind = torch_losses()[which]
    X_test = held_out[0]
    y, y_test = targets_for(kind, X), targets_for(kind, X_test)
    est = make(cls, model, loss=loss, second_order="gauss_newton").fit(X, y)
    loaded = load(save(est, tmp_path / "est.skinfl"), model)

    assert type(loaded.loss) is type(loss) and loaded.loss is not loss
    for attribute in ("reduction", "ignore_index", "label_smoothing"):
        assert getattr(loaded.loss, attribute, None) == getattr(loss, attribute, None), attribute
    for buffer in ("weight", "pos_weight"):
        original, restored = getattr(loss, buffer, None), getattr(loaded.loss, buffer, None)
        assert (original is None) == (restored is None), buffer
        if original is not None:
            assert restored.dtype == original.dtype and torch.equal(restored, original), buffer
    assert loaded.loss_.kind == est.loss_.kind == kind
    assert loaded.loss_.normalizer == est.loss_.normalizer
    if which == "weighted cross entropy":
        assert est.loss_.normalizer != 1.0  # the class weights matter here
    assert_identical(results(loaded, X_test, y_test), results(est, X_test, y_test))


@over_registry
@pytest.mark.parametrize("custom", [custom_cross_entropy, DoubledCrossEntropy()],
                         ids=["function", "subclass"])
def test_custom_loss_must_be_passed_again(cls, custom, classification_problem, held_out, tmp_path):
    model, X, y = classification_problem
    X_test, y_test, _, _ = held_out
    est = make(cls, model, loss=custom).fit(X, y)
    assert est.loss_.kind == "custom"
    path = save(est, tmp_path / "est.skinfl")
    with pytest.raises(ValueError, match="pass it again") as error:
        load(path, model)
    assert "loss=" in str(error.value)
    name = "custom_cross_entropy" if custom is custom_cross_entropy else "DoubledCrossEntropy"
    assert name in str(error.value)

    loaded = load(path, model, loss=custom)
    assert loaded.loss is custom
    assert_identical(results(loaded, X_test, y_test), results(est, X_test, y_test))


# ------------------------------------------------------------------ 7. devices
@over_registry
def test_loading_where_the_fitted_gpu_is_missing(cls, fitted, classification_problem, held_out, tmp_path,
                                                 monkeypatch):
    model, _, _ = classification_problem
    est = fitted(cls)
    expected = results(est, *held_out[:2])
    est.device_ = torch.device("cuda", 3)  # as if fitted on a fourth GPU; its tensors stay on the CPU
    path = save(est, tmp_path / "est.skinfl")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match=f"fitted on cuda:3, {NOT_AVAILABLE}") as record:
        loaded = load(path, model)
    assert [w.filename for w in not_available_warnings(record)] == [__file__]  # points at the call to load
    assert loaded.device_ == torch.device("cpu")
    assert_identical(results(loaded, *held_out[:2]), expected)


def test_loading_on_the_cpu_it_was_fitted_on_does_not_warn(saved, classification_problem, monkeypatch):
    model, _, _ = classification_problem
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = load(saved, model)
    assert not not_available_warnings(record)
    assert loaded.device_ == torch.device("cpu")


def test_available_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for saved in ("cuda:3", "cuda:0", "cuda", torch.device("cuda", 1)):
        assert available_device(saved) == torch.device("cpu"), saved
    assert available_device("cpu") == torch.device("cpu")
    assert available_device(None) is None


def test_available_device_with_one_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert available_device("cuda:3") == torch.device("cuda", 0)
    assert available_device(torch.device("cuda", 1)) == torch.device("cuda", 0)
    assert available_device("cuda:0") == torch.device("cuda", 0)
    assert available_device("cuda") == torch.device("cuda")
    assert available_device("cpu") == torch.device("cpu")
    assert available_device(None) is None
    assert isinstance(available_device("cuda:3"), torch.device)


def test_available_device_without_mps(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert available_device("mps") == torch.device("cpu")


# ------------------------------------------------------------------ 8. pickling (trusted files)
@over_registry
@pytest.mark.parametrize("via", ["joblib", "pickle"])
def test_pickle_round_trip_is_bit_identical(cls, via, fitted, held_out, tmp_path):
    est = fitted(cls)
    expected = results(est, *held_out[:2])
    if via == "joblib":
        buffer = io.BytesIO()
        joblib.dump(est, buffer)
        buffer.seek(0)
        loaded = joblib.load(buffer)
    else:
        loaded = pickle.loads(pickle.dumps(est))
    assert type(loaded) is cls
    assert loaded._fit_data is not None  # the training data comes along: influences without X work
    assert_identical(results(loaded, *held_out[:2]), expected)
    for name in FITTED_ATTRIBUTES:
        assert getattr(loaded, name) == getattr(est, name), name


@over_registry
def test_unpickling_where_the_fitted_gpu_is_missing(cls, fitted, held_out, monkeypatch):
    est = fitted(cls)
    X_test, y_test, _, _ = held_out
    expected = est.influences(X_test, y_test)
    state = est.__getstate__()
    state["skinfl_state"]["device_"] = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    restored = cls.__new__(cls)
    with pytest.warns(UserWarning, match=f"fitted on cuda:0, {NOT_AVAILABLE}"):
        restored.__setstate__(state)
    assert restored.device_ == torch.device("cpu")
    assert_same(restored.influences(X_test, y_test), expected)
    assert_same(restored.self_influence(X_test, y_test), est.self_influence(X_test, y_test))


# ------------------------------------------------------------------ 9. argument errors
@over_registry
def test_saving_an_unfitted_estimator_raises(cls, classification_problem, tmp_path):
    model, _, _ = classification_problem
    with pytest.raises(NotFittedError):
        save(make(cls, model), tmp_path / "est.skinfl")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("thing", ["string", "model", "sklearn estimator"])
def test_saving_something_else_raises_type_error(thing, classification_problem, tmp_path):
    from sklearn.linear_model import Ridge

    model, X, y = classification_problem
    other = {"string": "DirectInfluence", "model": model,
             "sklearn estimator": Ridge().fit(X.numpy(), y.numpy())}[thing]
    with pytest.raises(TypeError):
        save(other, tmp_path / "est.skinfl")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("thing", ["state_dict", "None", "path"])
def test_loading_without_a_module_raises_type_error(thing, saved, classification_problem):
    model, _, _ = classification_problem
    other = {"state_dict": model.state_dict(), "None": None, "path": str(saved)}[thing]
    with pytest.raises(TypeError):
        load(saved, other)


# ------------------------------------------------------------------ 10. an independent reader
@over_registry
def test_the_file_reads_with_an_independent_reader(cls, fitted, classification_problem, tmp_path):
    model, X, y = classification_problem
    est = fitted(cls)
    path = save(est, tmp_path / "est.skinfl")
    header, metadata, data, data_start = read_file(path)

    assert data_start % 8 == 0  # tensor data is 8-byte aligned
    # safetensors allows only strings as metadata values
    assert isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    assert metadata["format"] == "skinfl"
    assert re.fullmatch(r"[0-9a-f]{64}", metadata["sha256"])
    meta = json.loads(metadata["skinfl"])
    assert meta["estimator"] == cls.__name__
    assert meta["params"] == {name: value for name, value in est.get_params(deep=False).items()
                              if name not in ("model", "loss")}

    end = 0
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"]):
        assert set(entry) == {"dtype", "shape", "data_offsets"}, name
        assert entry["dtype"] in SAFETENSORS_ITEMSIZE, name
        assert all(isinstance(s, int) and s >= 0 for s in entry["shape"]), name
        begin, stop = entry["data_offsets"]
        assert begin == end, name  # contiguous, no gaps, no overlaps
        n_values = int(np.prod(entry["shape"], dtype=np.int64))
        assert stop - begin == n_values * SAFETENSORS_ITEMSIZE[entry["dtype"]], name
        end = stop
    assert end == len(data)

    saved_tensors = [tensor_of(entry, data) for entry in header.values() if entry["dtype"] in SAFETENSORS_DTYPES]

    def is_saved(array):
        return any(t.shape == array.shape and t.dtype == array.dtype and np.array_equal(t, array)
                   for t in saved_tensors)

    for name, tensor in model.state_dict().items():
        assert is_saved(tensor.numpy()), name
    assert is_saved(X.numpy()) and is_saved(y.numpy())

    # Saving is deterministic: the same estimator gives the same bytes.
    assert save(est, tmp_path / "again.skinfl").read_bytes() == path.read_bytes()


def test_save_and_load_are_exported():
    assert skinfl.save is save and skinfl.load is load
    assert "save" in skinfl.__all__ and "load" in skinfl.__all__
