"""``save`` and ``load``: a fitted estimator as tensors plus JSON; loading runs no code.

A saved estimator is one file in the safetensors layout (see
:mod:`skinfl._tensorfile`): the model's weights, the fitted factors, the
loss's tensor arguments and, optionally, the training data as tensors; the
estimator's parameters and fitted attributes as JSON. The code, the model's
architecture, comes from the caller of :func:`load`: the saved weights are
loaded into a copy of the model it passes. Nothing is unpickled, so a file
from an untrusted source cannot run code; a file that was modified after it
was written is refused (its SHA-256 digest no longer matches).

An :class:`~skinfl.InfluenceEnsemble` is one such file: each member's
tensors under the prefix ``members.<i>.``, its metadata in a list, the
training data once (top-level ``data.``) when every member holds the same
arrays, and the ensemble's weights in JSON.
"""

from __future__ import annotations

import copy
import numbers
import os
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from . import __version__
from ._cache import Factors, directory_of
from ._data import DataSource, TargetSpec
from ._deprecation import renamed_params
from ._devices import available_device
from ._model import evaluation_copy, has_lazy_parameters
from ._model_source import loss_on_device, model_source
from ._sklearn_models import is_sklearn_model
from ._skorch_nets import is_skorch_net
from ._tensorfile import TensorFile, write
from ._threads import thread_module
from ._validation import validate_estimator_params
from ._warnings import warn
from .base import BaseInfluence, estimator_class, model_dtype, registered_name
from .ensemble import InfluenceEnsemble

FORMAT_VERSION = 1
_FITTED = ("n_params_", "n_samples_fit_", "n_features_in_", "input_shape_", "output_shape_", "trainable_parameters_",
           "regularization_", "unpenalized_parameters_")


# ------------------------------------------------------------------ saving
def save(estimator, path, include_data=True):
    """Save a fitted estimator as tensors and JSON, safe to load from any source.

    The file holds the estimator's parameters, its fitted factors, the
    weights of its model and, with ``include_data=True``, the training data
    it was fitted on (written in chunks, so a memmap is never loaded whole).
    The model's code is not saved: :func:`load` takes the model again.

    Parameters
    ----------
    estimator : BaseInfluence or InfluenceEnsemble
        A fitted skinfl estimator, or an ensemble of them (fitted, or of
        fitted members): each member is saved as an estimator is, and the
        training data once when the members share it.
    path : str or os.PathLike
        Where to write; the file appears there once complete. The suffix
        ``.skinfl`` is customary; the file is also a valid safetensors file.
    include_data : bool, default=True
        Save the training data. Without it the file holds parameters and
        factors only; ``influences`` on the loaded estimator then needs the
        training points ``X, y``, and estimators that solve with curvature
        products over the training data (``CgInfluence``) need them to be
        saved.

    Returns
    -------
    path : pathlib.Path
        The path written.

    See Also
    --------
    load : Read the estimator back.

    Examples
    --------
    >>> import tempfile, torch, skinfl
    >>> from pathlib import Path
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Linear(3, 2)
    >>> X, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    >>> est = skinfl.DirectInfluence(model, regularization=0.1).fit(X, y)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = skinfl.save(est, Path(folder) / "est.skinfl")
    ...     loaded = skinfl.load(path, model)
    >>> torch.equal(loaded.influences(X[:2], y[:2]), est.influences(X[:2], y[:2]))
    True
    """
    if isinstance(estimator, InfluenceEnsemble):
        tensors, metadata = _ensemble_contents(estimator, include_data)
    elif isinstance(estimator, BaseInfluence):
        check_is_fitted(estimator)
        tensors, metadata = _contents(estimator, include_data)
    else:
        raise TypeError(f"save takes a skinfl influence estimator or an InfluenceEnsemble, got "
                        f"{type(estimator).__name__}.")
    write(path, tensors, metadata)
    return Path(path)


def _contents(estimator, include_data):
    """The tensors and the JSON metadata of a fitted estimator's file."""
    tensors = {f"model.{name}": tensor.detach().cpu()
               for name, tensor in thread_module(estimator.model_).state_dict().items()}
    tensors.update({f"factors.{name}": tensor.detach().cpu() for name, tensor in estimator._factors.items()})
    loss_description, loss_tensors = _describe_loss(estimator.loss)
    tensors.update({f"loss.{name}": tensor for name, tensor in loss_tensors.items()})
    data = estimator._fit_data
    saved_data = include_data and data is not None
    if saved_data:
        if isinstance(data.X, dict):
            tensors.update({f"data.X.{key}": _savable(value, f"X[{key!r}]") for key, value in data.X.items()})
        else:
            tensors["data.X"] = _savable(data.X, "X")
        if data.y is not None:
            tensors["data.y"] = _savable(data.y, "y")
    metadata = {
        "format_version": FORMAT_VERSION,
        "skinfl_version": __version__,
        "estimator": registered_name(type(estimator)),
        "params": _json_params(estimator),
        "loss": loss_description,
        "loss_normalizer": estimator.loss_.normalizer,
        "fitted": {name: _jsonable(getattr(estimator, name)) for name in _FITTED},
        "feature_names_in": (None if not hasattr(estimator, "feature_names_in_")
                             else [str(name) for name in estimator.feature_names_in_]),
        "device": str(estimator.device_),
        "model": {"class": f"{type(estimator.model).__module__}.{type(estimator.model).__qualname__}",
                  "training": bool(getattr(estimator.model, "training", False))},
        "factor_metadata": estimator._factor_metadata,
        "factor_seed": estimator._factor_seed,
        "seed": estimator._seed,
        "data": {"included": bool(saved_data), "input_dtype": str(estimator._input_dtype),
                 "keys": list(data.X) if saved_data and isinstance(data.X, dict) else None},
    }
    return tensors, metadata


def _ensemble_contents(ensemble, include_data):
    """The tensors and metadata of an ensemble's file: each member's under ``members.<i>.``, the training data
    once (top-level ``data.``) when every member holds the same arrays, and the weights in JSON."""
    check_is_fitted(ensemble)
    fitted = hasattr(ensemble, "estimators_")
    members = ensemble._members()
    contents = [_contents(member, include_data) for member in members]
    shared = include_data and all(member._fit_data is not None for member in members) and all(
        _same_data(member._fit_data, members[0]._fit_data) for member in members[1:])
    tensors = {}
    for index, (member_tensors, _) in enumerate(contents):
        for name, tensor in member_tensors.items():
            if not (shared and name.startswith("data.")):
                tensors[f"members.{index}.{name}"] = tensor
            elif index == 0:
                tensors[name] = tensor
    weights = ensemble.weights
    metadata = {
        "format_version": FORMAT_VERSION,
        "skinfl_version": __version__,
        "estimator": "InfluenceEnsemble",
        "params": {"weights": None if weights is None else [float(w) for w in np.asarray(weights, dtype=float)],
                   "n_jobs": _jsonable(ensemble.n_jobs)},
        "fitted": fitted,
        "shared_data": bool(shared),
        "members": [member_metadata for _, member_metadata in contents],
    }
    return tensors, metadata


def _same_data(first, second):
    """Whether two fitted data sources hold the same arrays (the same objects, or views of the same memory or
    file region), so that an ensemble's file holds them once."""
    return _same_array(first.X, second.X) and _same_array(first.y, second.y)


def _same_array(first, second):
    if first is second:
        return True
    if isinstance(first, dict) or isinstance(second, dict):
        return (isinstance(first, dict) and isinstance(second, dict) and first.keys() == second.keys()
                and all(_same_array(first[key], second[key]) for key in first))
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return (first.device == second.device and first.dtype == second.dtype and first.shape == second.shape
                and first.stride() == second.stride() and first.data_ptr() == second.data_ptr())
    if isinstance(first, np.ndarray) and isinstance(second, np.ndarray):
        if first.dtype != second.dtype or first.shape != second.shape or first.strides != second.strides:
            return False
        if first.__array_interface__["data"][0] == second.__array_interface__["data"][0]:
            return True
        files = [getattr(array, "filename", None) for array in (first, second)]  # two maps of one file region
        return (files[0] is not None and files[0] == files[1]
                and getattr(first, "offset", None) == getattr(second, "offset", None))
    return False


def _savable(data, name):
    if isinstance(data, torch.Tensor):
        return data.detach().cpu()
    if isinstance(data, np.ndarray) or (hasattr(data, "shape") and hasattr(data, "dtype")):
        if np.dtype(data.dtype).kind not in "biuf":
            raise TypeError(f"The training {name} has dtype {data.dtype}, which cannot be saved; use include_data=False.")
        return data
    return np.asarray(data)


def _jsonable(value):
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not saved as JSON")


def _json_params(estimator):
    params = {}
    for name, value in estimator.get_params(deep=False).items():
        if name in ("model", "loss"):
            continue
        if name == "memory":
            value = directory_of(value)
        elif name == "random_state" and not (value is None or isinstance(value, numbers.Integral)):
            value = None  # a RandomState instance: the factors were drawn with it already (factor_seed)
        try:
            params[name] = _jsonable(value)
        except TypeError as error:
            raise TypeError(f"The parameter {name}={value!r} cannot be saved: {error}.") from error
    return params


def _describe_loss(loss):
    """The ``loss`` parameter as JSON plus tensors: a name, a torch loss class with its arguments, or custom."""
    if isinstance(loss, str):
        return {"kind": "builtin", "name": loss}, {}
    cls = type(loss)
    if isinstance(loss, nn.modules.loss._Loss) and getattr(nn, cls.__name__, None) is cls:
        # Its options: the public plain attributes (torch keeps the module's own state private).
        attributes = {key: _jsonable(value) for key, value in vars(loss).items()
                      if not key.startswith("_") and key != "training"}
        buffers = {name: tensor.detach().cpu() for name, tensor in loss.named_buffers()}
        return {"kind": "torch", "class": cls.__name__, "attributes": attributes, "buffers": sorted(buffers)}, buffers
    name = getattr(loss, "__qualname__", cls.__qualname__)
    return {"kind": "custom", "name": f"{getattr(loss, '__module__', cls.__module__)}.{name}"}, {}


# ------------------------------------------------------------------ loading
def load(path, model, loss=None):
    """Load an estimator saved by :func:`save`; no code in the file runs.

    Parameters
    ----------
    path : str or os.PathLike
        The saved file.
    model : torch.nn.Module, skorch net, scikit-learn model or list of them
        A model of the saved architecture (its weights do not matter): the
        saved weights are loaded into a copy of it, which becomes the
        estimator's ``model``. A model whose parameters do not match raises
        a ``ValueError``. For a skorch net or a scikit-learn model, pass the
        fitted model again: the estimator's ``model`` is that model, and its
        module gets the saved weights. For an :class:`InfluenceEnsemble`, a
        list of one model per member, in the members' order (one torch
        module also serves as the architecture of every member).
    loss : str, torch.nn.Module, callable or list of them, default=None
        The training loss. Built-in losses and torch loss modules are saved
        and rebuilt; a custom callable is not saved and must be passed
        again. A loss given here is used instead of the saved one. For an
        ensemble, one loss for every member or a list of one per member.

    Returns
    -------
    estimator : BaseInfluence or InfluenceEnsemble
        The fitted estimator, on the device it was fitted on when that
        exists here (else the first GPU, else the CPU, with a warning).

    See Also
    --------
    save : Write an estimator.
    """
    for one in model if isinstance(model, (list, tuple)) else [model]:
        if not (isinstance(one, nn.Module) or is_skorch_net(one) or is_sklearn_model(one)):
            raise TypeError(f"load needs the model (a torch.nn.Module of the saved architecture, or the fitted "
                            f"skorch net or scikit-learn model), got {type(one).__name__}.")
    file = TensorFile(path).verify()
    meta = file.metadata
    try:
        if meta.get("estimator") == "InfluenceEnsemble":
            return _restore_ensemble(file, meta, model, loss)
        if isinstance(model, (list, tuple)):
            raise ValueError(f"{path} holds one {meta.get('estimator')}, not an InfluenceEnsemble: pass one model.")
        return _restore(file, meta, model, loss)
    except (KeyError, TypeError, AttributeError, RuntimeError) as error:
        raise ValueError(f"{path} is not a valid skinfl file: its metadata is invalid ({error!r}).") from error


def _restore(file, meta, model, loss):
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file.path} uses skinfl file format {meta.get('format_version')!r}; this skinfl "
            f"({__version__}) reads format {FORMAT_VERSION}."
        )
    cls = estimator_class(meta["estimator"])  # a former name reads as the estimator's name now
    if cls is None:
        raise ValueError(f"{file.path} holds an unknown estimator {meta['estimator']!r}.")
    saved = meta["device"]
    device = available_device(saved)
    if torch.device(saved) != device:
        warn(f"This estimator was fitted on {saved}, which is not available here; it was loaded on {device}.",
             UserWarning)
    # Files from before "auto" regularization: the parameter itself, on every parameter.
    fitted = {"regularization_": meta["params"].get("regularization"), "unpenalized_parameters_": [],
              **meta["fitted"]}
    trainable = list(fitted["trainable_parameters_"])
    loss_param = loss if loss is not None else _rebuild_loss(file, meta["loss"])
    source = model_source(model, loss_param)
    module = _model_with_saved_weights(file, meta, source.module, trainable)
    user_model = module if isinstance(model, nn.Module) else model
    # Parameters renamed since the file was written are read under their new names.
    params = renamed_params(cls, meta["params"])
    estimator = cls(**{**params, "model": user_model, "loss": loss_param})
    validate_estimator_params(estimator)

    input_dtype = getattr(torch, meta["data"]["input_dtype"].replace("torch.", ""))
    if not isinstance(input_dtype, torch.dtype):
        raise ValueError(f"{file.path} names an unknown input dtype {meta['data']['input_dtype']!r}.")
    example = None
    if has_lazy_parameters(module):
        shape = fitted["input_shape_"]
        example = ({key: torch.zeros((1, *value), dtype=input_dtype, device=device) for key, value in shape.items()}
                   if isinstance(shape, dict) else torch.zeros((1, *shape), dtype=input_dtype, device=device))
    estimator.model_ = evaluation_copy(module, device, example=example)
    resolved = loss_on_device(source.loss, device)
    estimator.loss_ = resolved.for_outputs(tuple(fitted["output_shape_"])).replace(
        normalizer=float(meta["loss_normalizer"]))
    if source.classes is not None:
        estimator.classes_ = source.classes
    estimator.device_ = device
    for name in _FITTED:
        value = fitted[name]
        if name.endswith("shape_"):
            value = ({key: tuple(shape) for key, shape in value.items()} if isinstance(value, dict) else tuple(value))
        setattr(estimator, name, value)
    if meta.get("feature_names_in") is not None:
        estimator.feature_names_in_ = np.asarray(meta["feature_names_in"], dtype=object)
    estimator._input_dtype = input_dtype
    estimator._fit_data = _saved_data(file, meta, estimator) if meta["data"]["included"] else None
    estimator._factors = Factors({name[len("factors."):]: file.tensor(name, device)
                                  for name in file.names() if name.startswith("factors.")}, device)
    estimator._factor_cache_key = None  # not from the cache: nothing is written back
    estimator._factor_metadata = meta["factor_metadata"]
    estimator._factor_seed = meta["factor_seed"]
    # Files from before the seed was saved: the factors' seed, else a new draw (as they were read then).
    estimator._seed = meta.get("seed", meta["factor_seed"])
    if estimator._seed is None:
        estimator._seed = int(np.random.randint(2**31 - 1))
    estimator._build_inverse()
    return estimator


class _MemberFile:
    """One member of a saved ensemble, read as the file of a single estimator: its tensors under their own
    names (``members.<i>.model.weight`` as ``model.weight``), and the ensemble's shared training data."""

    def __init__(self, file, index, shared_data):
        prefix = f"members.{index}."
        self.path = file.path
        self._file = file
        self._names = {name[len(prefix):]: name for name in file.table if name.startswith(prefix)}
        if shared_data:
            self._names.update({name: name for name in file.table if name.startswith("data.")})
        self.table = {name: file.table[stored_as] for name, stored_as in self._names.items()}

    def names(self):
        return list(self._names)

    def tensor(self, name, device="cpu"):
        return self._file.tensor(self._names[name], device)

    def memmap(self, name):
        return self._file.memmap(self._names[name])


def _per_member(value, n_members, what):
    """``value`` for each of ``n_members``: a list or tuple of one per member, or one value for all."""
    if isinstance(value, (list, tuple)):
        if len(value) != n_members:
            raise ValueError(f"The file holds an InfluenceEnsemble of {n_members} members, and {len(value)} "
                             f"{what} were passed; pass one per member.")
        return list(value)
    return [value] * n_members


def _restore_ensemble(file, meta, model, loss):
    """An :class:`InfluenceEnsemble` from its file: each member restored as a single estimator is."""
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file.path} uses skinfl file format {meta.get('format_version')!r}; this skinfl "
            f"({__version__}) reads format {FORMAT_VERSION}."
        )
    members_meta = meta["members"]
    if not isinstance(model, (list, tuple, nn.Module)):
        raise ValueError(
            f"{file.path} holds an InfluenceEnsemble of {len(members_meta)} members: pass their models as a "
            "list (one torch module also serves as the architecture of every member; skorch nets and "
            "scikit-learn models are passed one per member)."
        )
    models = _per_member(model, len(members_meta), "models")
    losses = _per_member(loss, len(members_meta), "losses")
    shared = bool(meta["shared_data"])
    members = [_restore(_MemberFile(file, index, shared), member_meta, member_model, member_loss)
               for index, (member_meta, member_model, member_loss) in enumerate(zip(members_meta, models, losses))]
    params = meta["params"]
    ensemble = InfluenceEnsemble(members, weights=params["weights"], n_jobs=params["n_jobs"])
    validate_estimator_params(ensemble)
    if meta["fitted"]:
        ensemble._set_fitted(list(members))
    else:
        ensemble._members()  # the checks of an ensemble of fitted members
    return ensemble


def _model_with_saved_weights(file, meta, model, trainable):
    weights = {name[len("model."):]: file.tensor(name) for name in file.names() if name.startswith("model.")}
    current = model.state_dict()
    for name, tensor in weights.items():
        # load_state_dict would cast silently, and the factors were computed in the saved dtype.
        if name in current and current[name].dtype != tensor.dtype:
            raise ValueError(
                f"The weights saved in {file.path} do not fit the model passed to load: {name} was saved as "
                f"{tensor.dtype} and the model has {current[name].dtype}. Pass the model in the saved dtype "
                f"(for example model.to({tensor.dtype}))."
            )
    restored = copy.deepcopy(model)
    target = next((t.device for t in restored.parameters() if not isinstance(t, nn.parameter.UninitializedParameter)),
                  torch.device("cpu"))
    try:
        restored.load_state_dict({name: t.to(target) for name, t in weights.items()}, strict=True)
    except RuntimeError as error:
        raise ValueError(
            f"The weights saved in {file.path} do not fit the model passed to load: {error}. Pass a model "
            f"of the saved architecture ({meta['model']['class']})."
        ) from error
    names = dict(restored.named_parameters())
    missing = [name for name in trainable if name not in names]
    if missing:
        raise ValueError(f"The model passed to load has no parameters {missing} that the saved estimator used.")
    for name, parameter in names.items():
        parameter.requires_grad_(name in trainable)
    return restored.train(meta["model"]["training"])


def _rebuild_loss(file, description):
    kind = description["kind"]
    if kind == "builtin":
        return description["name"]
    if kind == "custom":
        raise ValueError(
            f"The estimator in {file.path} was fitted with a custom loss ({description['name']}), which is code "
            "and is not saved: pass it again, load(path, model, loss=...)."
        )
    cls = getattr(nn, description["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, nn.modules.loss._Loss)):
        raise ValueError(f"{file.path} names an unknown torch loss {description['class']!r}.")
    loss = cls()
    for key, value in description["attributes"].items():
        # Only the options the class has: a file cannot add attributes or touch private ones.
        if key.startswith("_") or not hasattr(loss, key) or isinstance(getattr(loss, key), (nn.Module, torch.Tensor)):
            raise ValueError(f"{file.path} gives {description['class']} an unknown option {key!r}.")
        setattr(loss, key, value)
    for name in description["buffers"]:
        loss.register_buffer(name, file.tensor(f"loss.{name}"))
    return loss


def _saved_data(file, meta, estimator):
    def array(name):
        mapped = file.memmap(name)
        return mapped if mapped is not None else file.tensor(name)

    keys = meta["data"].get("keys")
    X = {key: array(f"data.X.{key}") for key in keys} if keys is not None else array("data.X")
    y = array("data.y") if "data.y" in file.table else None
    targets = TargetSpec(estimator.loss_, estimator.output_shape_, model_dtype(estimator.model_),
                         getattr(estimator, "classes_", None))
    return DataSource(X, y, input_dtype=model_dtype(estimator.model_), device=estimator.device_, targets=targets)
