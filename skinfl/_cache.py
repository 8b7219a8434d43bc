"""Results cached on disk as tensors plus JSON, shared between processes and sessions.

Used for what is costly, deterministic and independent of the settings being
tuned: the fitted factors of every estimator (they do not depend on
``regularization``) and the ground truth of the retraining metrics (it does
not depend on the influence estimator). Keys are hashes of everything the
result depends on.

An entry is one file in the layout of :mod:`skinfl._tensorfile`: tensors and
JSON, written to a temporary name and renamed, so that processes sharing the
folder never read a partial file. Nothing in a cache folder is ever
unpickled: the folder may be shared, and a file there may come from anyone.
An entry that does not read back (modified, truncated, from another format)
is computed again and replaced, with a warning.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from pathlib import Path

import joblib
import torch

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
    if entry is not None:
        loaders, metadata = entry
        return {name: load() for name, load in loaders.items()}, metadata
    tensors, metadata = compute()
    store_tensors(directory, key, tensors, metadata)
    return tensors, metadata


def stored(directory, key, compute, encode, decode):
    """``compute()`` cached through a codec: ``encode(value) -> (tensors, metadata)``, ``decode`` back."""
    if directory is None:
        return compute()
    return decode(*stored_tensors(directory, key, lambda: encode(compute())))
