"""Results cached on disk, shared between processes and sessions.

Used for what is costly, deterministic and independent of the settings being
tuned: the ground truth of the retraining metrics (it does not depend on the
influence estimator) and DirectInfluence's curvature matrix (it does not
depend on ``regularization``). Keys are hashes of everything the result
depends on (see :func:`token`).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import joblib
import torch


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
    does not change the key.
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


def stored(directory, key, compute):
    """``compute()``, stored in and read back from ``directory`` under ``key``.

    One joblib file per key, written to a temporary name and then renamed,
    so that processes sharing the directory never read a partial file. (A
    ``joblib.Memory`` on a function would also work, but it validates the
    function's code per process and may discard entries written by another
    process.)
    """
    if directory is None:
        return compute()
    folder = Path(directory) / "skinfl_cache"
    path = folder / f"{key}.joblib"
    if path.exists():
        try:
            return joblib.load(path)
        except (OSError, EOFError, pickle.UnpicklingError, ValueError):
            pass  # unreadable (for example written by another version): compute again
    value = compute()
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, suffix=".tmp")
    os.close(handle)
    joblib.dump(value, temporary)
    os.replace(temporary, path)
    return value
