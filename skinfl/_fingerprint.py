"""Content fingerprints for cache keys: what a cached result depends on, hashed.

A key must change whenever the cached result could: two models that differ
only by a plain attribute (``self.scale = 3.0``) or by the code of their
``forward`` must not share a key. So modules are hashed by the qualified name
and the source of every submodule's class and its bases (``forward`` and the
methods it calls), the module-level functions those classes name, every
tensor (parameters and buffers) and every other attribute; functions by their code, defaults and
closure; arrays by their content, read in chunks so that a memmap is never
loaded whole. Anything that cannot be described by value is hashed by its
``repr``, which at worst misses the cache: it never makes two different
objects share a key.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import numbers

import numpy as np
import torch
from torch import nn

from ._dask import is_dask

# Rows of an array hashed at a time.
_CHUNK_BYTES = 32 * 2**20
# Module attributes hashed otherwise: tensors through state_dict, submodules one by one.
_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "training"}


class Fingerprint:
    """An incremental SHA-256 over a sequence of described values."""

    def __init__(self):
        self._hash = hashlib.sha256()

    def hexdigest(self):
        return self._hash.hexdigest()

    def _tag(self, text):
        self._hash.update(text.encode())
        self._hash.update(b"\x00")

    def add(self, value):
        """Add ``value`` (see the module docstring for how each kind is described)."""
        if value is None or isinstance(value, (bool, str, bytes, numbers.Number)) and not isinstance(value, np.ndarray):
            self._tag(f"{type(value).__name__}:{value!r}")
        elif isinstance(value, torch.Tensor):
            self._add_tensor(value)
        elif is_dask(value) and not isinstance(value, dict):
            # A dask array's name is a token of its graph: of the content for arrays made from memory,
            # of the store and path for arrays read from files. Hashing it reads nothing.
            self._tag(f"dask:{value.name}:{value.shape}:{value.dtype}")
        elif isinstance(value, np.ndarray) or _is_array_like(value):
            self._add_array(value)
        elif isinstance(value, (list, tuple)):
            self._tag(f"{type(value).__name__}[{len(value)}]")
            for item in value:
                self.add(item)
        elif isinstance(value, dict):
            self._tag(f"dict[{len(value)}]")
            for key in sorted(value, key=repr):
                self.add(key)
                self.add(value[key])
        elif isinstance(value, nn.Module):
            self._add_module(value)
        elif isinstance(value, torch.dtype):
            self._tag(f"dtype:{value}")
        elif inspect.isfunction(value) or inspect.ismethod(value):
            self._add_function(value)
        elif isinstance(value, type):
            self._tag(f"type:{value.__module__}.{value.__qualname__}")
        elif isinstance(value, functools.partial):
            self._tag("partial")
            self.add([value.func, list(value.args), dict(value.keywords)])
        elif inspect.isbuiltin(value) or inspect.ismethoddescriptor(value):
            self._tag(f"builtin:{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}")
        elif hasattr(value, "__dict__"):
            self._tag(f"object:{type(value).__module__}.{type(value).__qualname__}")
            self._add_source(type(value).__call__ if callable(value) else None)
            self.add(dict(vars(value)))
        else:
            self._tag(f"repr:{type(value).__qualname__}:{value!r}")
        return self

    def _add_tensor(self, tensor):
        tensor = tensor.detach()
        self._tag(f"tensor:{tensor.dtype}:{tuple(tensor.shape)}")
        flat = tensor.contiguous().reshape(-1)
        if flat.dtype == torch.bfloat16:
            flat = flat.view(torch.int16)
        step = max(1, _CHUNK_BYTES // max(flat.element_size(), 1))
        for start in range(0, flat.numel(), step):
            self._hash.update(flat[start:start + step].cpu().numpy().tobytes())

    def _add_array(self, array):
        shape = tuple(array.shape)
        first = np.asarray(array[:1]) if len(shape) else np.asarray(array)
        self._tag(f"array:{first.dtype}:{shape}")
        if not len(shape):
            self._hash.update(first.tobytes())
            return
        row_bytes = max(1, first[:1].nbytes)
        rows = max(1, _CHUNK_BYTES // row_bytes)
        for start in range(0, shape[0], rows):
            self._hash.update(np.ascontiguousarray(np.asarray(array[start:start + rows])).tobytes())

    def _add_module(self, module):
        self._tag("module")
        for name, submodule in module.named_modules():
            cls = type(submodule)
            self._tag(f"submodule:{name}:{cls.__module__}.{cls.__qualname__}")
            self._add_class_code(cls)
            attributes = {k: v for k, v in vars(submodule).items() if k not in _MODULE_INTERNALS}
            self.add(attributes)
        for name, tensor in module.state_dict(keep_vars=True).items():
            self._tag(f"state:{name}")
            if isinstance(tensor, nn.parameter.UninitializedParameter):
                self._tag("uninitialized")
            else:
                self._add_tensor(tensor)

    def _add_class_code(self, cls):
        """The source of every class a module's behaviour comes from, below ``nn.Module``.

        That covers ``forward`` and every method it calls, inherited ones
        included, and the module-level functions those classes name (one
        level deep: a helper of a helper is not followed).
        """
        for klass in cls.__mro__:
            if klass in (nn.Module, object) or not issubclass(klass, nn.Module):
                continue
            self._add_source(klass)
            namespace = vars(inspect.getmodule(klass)) if inspect.getmodule(klass) is not None else {}
            for method in vars(klass).values():
                code = getattr(method, "__code__", None)
                for name in getattr(code, "co_names", ()):
                    helper = namespace.get(name)
                    if inspect.isfunction(helper):
                        self._tag(f"helper:{name}")
                        self._add_source(helper)

    def _add_function(self, function):
        self._tag(f"function:{getattr(function, '__module__', '')}.{getattr(function, '__qualname__', '')}")
        self._add_source(function)
        bound = getattr(function, "__self__", None)
        if bound is not None:
            self.add(bound)
        code = getattr(function, "__code__", None)
        if code is not None:
            self._hash.update(code.co_code)
            self.add([c for c in code.co_consts if isinstance(c, (str, bytes, numbers.Number, type(None)))])
        self.add(list(getattr(function, "__defaults__", None) or ()))
        for cell in getattr(function, "__closure__", None) or ():
            try:
                self.add(cell.cell_contents)
            except ValueError:  # an empty cell
                self._tag("empty-cell")

    def _add_source(self, function):
        if function is not None:
            self._tag(_source(function))


@functools.lru_cache(maxsize=1024)
def _source(function):
    """Source of a class or function, read once per process (a search hashes the same classes again
    for every candidate)."""
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return f"no-source:{getattr(function, '__qualname__', repr(function))}"


def _is_array_like(value):
    """Indexable data with a shape (numpy memmaps, h5py and zarr arrays, ...), not a torch tensor."""
    return hasattr(value, "shape") and hasattr(value, "dtype") and hasattr(value, "__getitem__") and not isinstance(value, type)


def fingerprint(*values):
    """Hex SHA-256 of ``values`` described as in :class:`Fingerprint`."""
    result = Fingerprint()
    for value in values:
        result.add(value)
    return result.hexdigest()
