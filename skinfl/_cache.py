"""Results cached on disk as tensors plus JSON, shared between processes and sessions.

Used for what is costly, deterministic and independent of the settings being
tuned: the fitted factors of every estimator (they do not depend on
``regularization``) and the ground truth of the retraining metrics (it does
not depend on the influence estimator). Keys are hashes of everything the
result depends on.

The estimators' side is :class:`FactorCache`, which :class:`~skinfl.base.BaseInfluence`
derives from: it reads the factors of a fit from ``memory`` or computes
them, holds them in a :class:`Factors` mapping, and writes new ones back.

An entry is one file in the layout of :mod:`skinfl._tensorfile`: tensors and
JSON, written to a temporary name and renamed, so that processes sharing the
folder never read a partial file. Nothing in a cache folder is ever
unpickled: the folder may be shared, and a file there may come from anyone.
An entry that does not read back (modified, truncated, from another format)
is computed again and replaced, with a warning. Processes (or threads) that
miss the same entry at once compute it once: the first holds a lock file
beside the entry (``<key>.lock``, removed after) while it computes and
stores it, and the others wait, then read it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
import threading
from collections.abc import MutableMapping
from pathlib import Path

import joblib
import torch

from . import __version__
from ._filelock import locked
from ._fingerprint import fingerprint
from ._tensorfile import TensorFile, TensorFileError, write
from ._warnings import warn

_KEY = re.compile(r"^[0-9a-zA-Z_-]+$")


def directory_of(memory):
    """The folder behind ``memory`` (a path, a joblib.Memory, or None)."""
    if memory is None:
        return None
    if isinstance(memory, (str, os.PathLike)):
        return memory
    location = getattr(memory, "location", None)
    if location is None and hasattr(memory, "cache"):
        return None  # joblib.Memory(None): no caching on disk
    if location is None:
        raise TypeError(f"memory must be None, a directory path or a joblib.Memory, got {type(memory).__name__}.")
    return location


def token(value):
    """A stable hash of ``value`` for cache keys; ``id`` when it cannot be pickled.

    Objects with ``get_params`` (the retrain helpers, estimators) are hashed
    by type and parameters, so state they keep between calls (a warm start)
    does not change the key. (Hashing pickles; nothing is ever unpickled.)
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if hasattr(value, "get_params") and not isinstance(value, type):
        try:
            return joblib.hash((type(value).__qualname__, value.get_params(deep=False)))
        except (pickle.PicklingError, TypeError, AttributeError):
            pass
    try:
        return joblib.hash(value)
    except (pickle.PicklingError, TypeError, AttributeError):
        return f"id-{id(value)}"


def entry_path(directory, key):
    if not _KEY.match(key):
        raise ValueError(f"Invalid cache key {key!r}.")
    return Path(directory) / "skinfl_cache" / f"{key}.safetensors"


def computing(directory, key):
    """A context in which to compute the entry ``key`` and store it: it holds the entry's lock, so that
    processes (and threads) that miss the same entry at once compute it once (see :mod:`skinfl._filelock`).

    Whoever waited on the lock reads the entry again first: the holder before it stored it.
    """
    return locked(entry_path(directory, key).with_suffix(".lock"))


# Entries this process has verified, by (path, size, modification time): a search reads the
# same entry once per candidate, and hashing it again each time would cost as much as reading it.
_VERIFIED = set()


def read_entry(directory, key):
    """``(loaders, metadata)`` of the entry ``key``, or None when there is none or it does not read back.

    ``loaders`` maps each tensor's name to a function that reads it (on the
    CPU), so that a caller reads only the tensors it uses. A damaged entry
    gives a warning and None, so that it is computed again.
    """
    path = entry_path(directory, key)
    if not path.exists():
        return None
    try:
        stat = path.stat()
        stamp = (str(path), stat.st_size, stat.st_mtime_ns)
        entry = TensorFile(path)
        if stamp not in _VERIFIED:
            entry.verify()
            _VERIFIED.add(stamp)
    except (TensorFileError, OSError) as error:
        warn(f"Ignoring an unreadable cache entry and computing it again: {error}", UserWarning)
        return None
    return {name: functools.partial(entry.tensor, name) for name in entry.names()}, entry.metadata


def store_tensors(directory, key, tensors, metadata):
    """Write (or replace) the entry ``key``: tensors to the host, then one atomic rename."""
    write(entry_path(directory, key), {name: tensor.detach().cpu() for name, tensor in tensors.items()}, metadata)


def stored_tensors(directory, key, compute):
    """``compute()`` -> ``(tensors, metadata)``, stored in and read back from ``directory``.

    ``tensors`` is a dict of name -> torch tensor, ``metadata`` a JSON-able
    dict. Read-back tensors are on the CPU. With ``directory=None`` this is
    just ``compute()``.
    """
    if directory is None:
        return compute()
    entry = read_entry(directory, key)
    if entry is None:
        with computing(directory, key):
            entry = read_entry(directory, key)  # stored by another process while this one waited
            if entry is None:
                tensors, metadata = compute()
                store_tensors(directory, key, tensors, metadata)
                return tensors, metadata
    loaders, metadata = entry
    return {name: load() for name, load in loaders.items()}, metadata


def stored(directory, key, compute, encode, decode):
    """``compute()`` cached through a codec: ``encode(value) -> (tensors, metadata)``, ``decode`` back."""
    if directory is None:
        return compute()
    return decode(*stored_tensors(directory, key, lambda: encode(compute())))


# ------------------------------------------------------------ fitted factors
class Factors(MutableMapping):
    """Fitted factors by name, on the estimator's device, contiguous; read from a cache file when first used.

    Values given as functions (readers of a cache entry) are called on first
    access, so a candidate reads only the factors it uses: the curvature for
    a Cholesky factorisation, not the eigenvectors, and the other way round.
    Threads may share it: a factor is read once, whichever thread asks first.
    Pickles as a plain dict.
    """

    def __init__(self, values, device):
        self._device = device
        self._lock = threading.RLock()
        self._readers = {name: value for name, value in values.items() if callable(value)}
        self._tensors = {}
        for name, value in values.items():
            if not callable(value):
                self[name] = value

    def __getitem__(self, name):
        tensor = self._tensors.get(name)
        if tensor is not None:
            return tensor
        with self._lock:
            if name not in self._tensors:
                self._tensors[name] = self._readers.pop(name)().to(self._device).contiguous()
            return self._tensors[name]

    def __setitem__(self, name, tensor):
        # Contiguous, as they read back from a file: the same memory layout gives bitwise the same results.
        tensor = tensor.to(self._device).contiguous()
        with self._lock:
            self._readers.pop(name, None)
            self._tensors[name] = tensor

    def __delitem__(self, name):
        with self._lock:
            self._readers.pop(name, None)
            self._tensors.pop(name, None)

    def __contains__(self, name):  # without reading it
        with self._lock:
            return name in self._tensors or name in self._readers

    def __iter__(self):
        with self._lock:
            return iter([*self._tensors, *self._readers])

    def __len__(self):
        with self._lock:
            return len(self._tensors) + len(self._readers)

    def __reduce__(self):
        return dict, (dict(self.items()),)


class FactorCache:
    """The factors of a fit, read from ``memory`` when it holds them, else computed, and stored back.

    For :class:`~skinfl.base.BaseInfluence`, which builds its inverse inside
    :meth:`_fitted_factors` in ``fit`` and provides
    ``_computed_factors()``, ``memory``, ``random_state``,
    ``_factor_parameters`` (read through ``_parameter``) and the fitted
    state that :meth:`_factor_key` hashes. It keeps, as private fitted state: ``_factors`` (a
    :class:`Factors`), ``_factor_metadata`` (JSON-able), ``_factor_seed``
    (the integer seed of the fit's randomness, or None) and the cache entry's
    key.
    """

    @contextlib.contextmanager
    def _fitted_factors(self):
        """The factors of the fit, for the ``with`` block that builds the inverse from them: read from
        ``memory`` when it holds them for this fit, else computed.

        On leaving the block, even by an error (the factors are good whatever
        ``regularization`` the candidate has), a new entry is written with what
        building the inverse added (see :meth:`_add_factors`). Processes that
        share ``memory`` compute an entry once: the first to miss it holds its
        lock (:func:`computing`) until it is written, and the others, having
        waited, read it.
        """
        directory = directory_of(self.memory)
        # In the cache key: None when random_state is None (the factors of any draw will do).
        self._factor_seed = None if self.random_state is None else self._seed
        self._factor_cache_key = None if directory is None else self._factor_key()
        entry = None if directory is None else read_entry(directory, self._factor_cache_key)
        with contextlib.ExitStack() as lock:
            if directory is not None and entry is None:
                lock.enter_context(computing(directory, self._factor_cache_key))
                entry = read_entry(directory, self._factor_cache_key)  # stored while this process waited
            if entry is None:
                tensors, metadata = self._computed_factors()
            else:
                tensors, metadata = entry
            self._factors = Factors(tensors, self.device_)
            self._factor_metadata = metadata
            self._factors_unstored = directory is not None and entry is None
            try:
                yield
            finally:
                self._store_new_factors()

    def _add_factors(self, tensors, metadata=None):
        """Add factors derived later, still independent of ``regularization`` (an
        eigendecomposition the first candidate needed, say), and their ``metadata``: the
        next candidates of a search find them in the cache."""
        self._factors.update(tensors)
        if metadata:
            self._factor_metadata = {**self._factor_metadata, **metadata}
        self._factors_unstored = self._factor_cache_key is not None  # a key only with memory

    def _store_new_factors(self):
        if self._factors_unstored:
            store_tensors(directory_of(self.memory), self._factor_cache_key, dict(self._factors.items()),
                          self._factor_metadata)
        self._factors_unstored = False

    def _factor_key(self):
        """Hash of everything the factors depend on (see :mod:`skinfl._fingerprint`)."""
        settings = {name: self._parameter(name) for name in self._factor_parameters if name != "random_state"}
        if "random_state" in self._factor_parameters:
            settings["random_state"] = self._factor_seed
        return fingerprint(
            "skinfl-factors", __version__, type(self).__name__, settings, self.second_order,
            self.model_, self.trainable_parameters_, self.loss_.kind, self.loss_.function,
            self.loss_.normalizer, self.loss_.takes_probabilities, self.loss_.sequence, self.loss_.shift,
            self._fit_data.X, self._fit_data.y,
        )
