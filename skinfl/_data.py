"""Data referenced where the user keeps it, validated in chunks, streamed to the device.

An estimator never copies a data set whole, onto the device or anywhere
else: it keeps a reference to what it was given (a numpy array or memmap, a
torch tensor, any object indexable along axis 0) and reads row batches when
it needs them, converting each batch to the model's dtype and moving it to
the device (through pinned memory, without blocking, on CUDA). A memmap, an
h5py dataset or a zarr array (indexable, with a ``shape`` but no ``len``)
thus stays on disk, and a pickled data source holds where a memmap or an
h5py dataset lies, not its data (see :mod:`skinfl._references`). Lists and
tuples are turned into one numpy array, and pandas objects into their numpy
values, since they are in memory already.

Inputs may also be a dict of such arrays sharing the first axis, for a
model called with keyword arguments (``model(**batch)``): each is kept by
reference, and a batch is the dict of their rows.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ._dask import check_known_chunks, compute, is_dask
from ._references import is_h5py_dataset, portable, restored
from ._validation import (
    as_target_tensor,
    check_input_shape,
    check_keyword_input_shapes,
    input_chunk_to_tensor,
)

# Rows read at a time when a whole data set is checked or hashed: about this many bytes.
_VALIDATION_CHUNK_BYTES = 32 * 2**20


def reference(data, name="X"):
    """``data`` as something indexed by rows, without copying arrays and tensors (a dict: each value)."""
    data = restored(data)  # a reference to an array on disk: the array
    if hasattr(data, "toarray") or hasattr(data, "tocsr"):  # scipy.sparse (a dok_matrix is a dict, too)
        raise TypeError(f"Sparse data is not supported for {name}; convert it with {name}.toarray().")
    if isinstance(data, Mapping):
        if not data:
            raise ValueError(f"{name} is an empty dict; pass the model's keyword inputs as arrays.")
        bad = [key for key in data if not isinstance(key, str)]
        if bad:
            raise TypeError(f"The keys of a dict {name} are the model's keyword arguments, so they must be "
                            f"strings; got {bad[:3]}.")
        return {key: reference(value, f"{name}[{key!r}]") for key, value in data.items()}
    if isinstance(data, torch.Tensor) and data.layout != torch.strided:
        raise TypeError(f"Sparse tensors are not supported for {name}; convert with {name}.to_dense().")
    if isinstance(data, (torch.Tensor, np.ndarray)):
        return data
    if hasattr(data, "toarray") or hasattr(data, "tocsr"):  # scipy.sparse
        raise TypeError(f"Sparse data is not supported for {name}; convert it with {name}.toarray().")
    if hasattr(data, "iloc") and hasattr(data, "to_numpy"):  # pandas: [rows] would select columns
        return data.to_numpy()
    has_rows = hasattr(data, "__len__") or len(getattr(data, "shape", None) or ()) > 0  # zarr: a shape, no len
    if isinstance(data, (list, tuple)) or not (hasattr(data, "__getitem__") and has_rows):
        return np.asarray(data)
    return data


def rows_of(data, index):
    """Rows ``index`` (a slice or a 1-D integer array) of referenced data."""
    if isinstance(data, dict):
        return {key: rows_of(value, index) for key, value in data.items()}
    if is_dask(data):  # read into this process
        return compute(data[index])[0]
    if isinstance(index, slice) or isinstance(data, np.ndarray):
        return data[index]
    if isinstance(data, torch.Tensor):
        return data[torch.as_tensor(index, device=data.device)]
    if hasattr(data, "oindex"):  # zarr: an integer array selects along its axis with .oindex
        return data.oindex[np.asarray(index)]
    if is_h5py_dataset(data):  # h5py reads strictly increasing rows only: those, then in the order asked
        rows, order = np.unique(np.asarray(index), return_inverse=True)
        return data[rows][order]
    try:
        return data[index]
    except (TypeError, IndexError, KeyError, ValueError):  # indexables without fancy indexing
        return np.stack([np.asarray(data[int(i)]) for i in index])


def sample_shape(data):
    """Shape of the whole data set, read from its first row when it has no ``shape`` (a dict: of each value)."""
    if isinstance(data, dict):
        return {key: sample_shape(value) for key, value in data.items()}
    shape = getattr(data, "shape", None)
    if is_dask(data):
        check_known_chunks(data, "X")
    if shape is not None:
        return tuple(int(s) for s in shape)
    if len(data) == 0:
        return (0,)
    return (len(data), *np.asarray(data[0]).shape)


def chunk_rows(shape, itemsize=8, budget=None):
    """Rows per chunk so that one chunk holds about ``budget`` bytes (default ``_VALIDATION_CHUNK_BYTES``)."""
    budget = _VALIDATION_CHUNK_BYTES if budget is None else budget
    shapes = shape.values() if isinstance(shape, dict) else [shape]
    per_row = max(1, sum(int(np.prod(s[1:], dtype=np.int64)) for s in shapes) * itemsize)
    return max(1, budget // per_row)


@dataclass
class TargetSpec:
    """How targets are checked and converted: for ``loss`` on outputs of ``output_shape``.

    With ``classes`` (a scikit-learn classifier's ``classes_``), targets are
    labels, encoded to their index in ``classes``.
    """

    loss: object
    output_shape: tuple
    dtype: torch.dtype
    classes: np.ndarray | None = None

    def convert(self, chunk, name):
        """Checked target tensor of ``chunk``, where the rows were."""
        if self.classes is not None:
            chunk = encoded_labels(chunk, self.classes, name)
        return as_target_tensor(chunk, self.loss, self.output_shape, self.dtype, None, name)


def encoded_labels(labels, classes, name):
    """The index of each label of ``labels`` in the sorted array ``classes``."""
    if isinstance(labels, torch.Tensor):
        labels = labels.cpu().numpy()
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class labels, got shape {labels.shape}.")
    index = np.clip(np.searchsorted(classes, labels), 0, len(classes) - 1)
    unknown = classes[index] != labels
    if unknown.any():
        raise ValueError(
            f"{name} holds labels {np.unique(labels[unknown])[:5].tolist()} that the model was not trained on; "
            f"its classes_ are {classes.tolist()}."
        )
    return index


class DataSource:
    """Inputs (and targets) of one data set, read in batches on ``device``.

    Parameters
    ----------
    X : array-like, torch.Tensor or dict of them
        Inputs, samples on the first axis; kept by reference (see :func:`reference`).
        A dict holds keyword inputs of the model, sharing the first axis.
    y : array-like, torch.Tensor or None
        Targets, or None (the prediction measurement is used instead).
    input_dtype : torch.dtype
        The model's floating dtype; floating inputs are cast to it, integer
        inputs (token ids) keep their type.
    device : torch.device
        Where batches go.
    targets : TargetSpec or None
        How targets are converted; None while the model's output shape is
        not known yet (only inputs can be read then).
    names : tuple of str
        Names of X and y in error messages.
    """

    def __init__(self, X, y, *, input_dtype, device, targets=None, names=("X", "y")):
        if X is None:
            raise ValueError(f"{names[0]} is None; pass the model inputs as an array or tensor.")
        self.X = reference(X, names[0])
        self.y = None if y is None else reference(y, names[1])
        self.input_dtype = input_dtype
        self.device = torch.device(device)
        self.targets = targets
        self.names = names
        self.shape = sample_shape(self.X)
        if isinstance(self.X, dict):
            check_keyword_input_shapes(self.shape, names[0])
        else:
            check_input_shape(self.shape, names[0])

    def __len__(self):
        if isinstance(self.shape, dict):
            return next(iter(self.shape.values()))[0]
        return self.shape[0]

    @property
    def input_shape(self):
        """Per-sample input shape (a dict of them for keyword inputs)."""
        if isinstance(self.shape, dict):
            return {key: shape[1:] for key, shape in self.shape.items()}
        return self.shape[1:]

    def with_targets(self, targets):
        """The same data, with targets converted by ``targets`` (a TargetSpec)."""
        source = copy.copy(self)
        source.targets = targets
        return source

    def __copy__(self):  # the same arrays, not arrays reopened from their pickled references
        source = DataSource.__new__(DataSource)
        source.__dict__.update(self.__dict__)
        return source

    def __getstate__(self):
        # A memmap or an h5py dataset pickles as where it lies (a dict X: each value); the rest as itself.
        state = dict(self.__dict__)
        state["X"] = _each(self.X, portable)
        state["y"] = portable(self.y)
        return state

    def __setstate__(self, state):
        state = dict(state)
        state["X"] = _each(state["X"], restored)
        state["y"] = restored(state["y"])
        self.__dict__.update(state)

    def _to_device(self, tensor):
        if tensor.device == self.device:
            return tensor
        if self.device.type == "cuda" and tensor.device.type == "cpu":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def _input_tensor(self, chunk, name):
        return self._to_device(input_chunk_to_tensor(chunk, self.input_dtype, name))

    def inputs(self, index):
        """Inputs of rows ``index`` on the device (a dict of tensors for keyword inputs)."""
        if isinstance(self.X, dict):
            return {key: self._input_tensor(rows_of(value, index), f"{self.names[0]}[{key!r}]")
                    for key, value in self.X.items()}
        return self._input_tensor(rows_of(self.X, index), self.names[0])

    def batch(self, index):
        """``(inputs, targets)`` of rows ``index`` on the device; targets None without y."""
        x = self.inputs(index)
        if self.y is None:
            return x, None
        return x, self._to_device(self.targets.convert(rows_of(self.y, index), self.names[1]))

    @property
    def is_sharded(self):
        """Whether the data are dask arrays: passes over them run where their blocks are."""
        return is_dask(self.X) or is_dask(self.y)

    def check_target_count(self):
        """Check that there is one target per sample, from the shapes alone (nothing is read)."""
        if self.y is None:
            return
        target_shape = sample_shape(self.y)
        if len(target_shape) == 0:
            raise ValueError(f"{self.names[1]} is a scalar; pass one target per sample.")
        if target_shape[0] != len(self):
            raise ValueError(f"{self.names[0]} and {self.names[1]} have different numbers of samples: "
                             f"{len(self)} and {target_shape[0]}.")

    def validate(self):
        """Check every value (finite, of the right kind and shape), reading in chunks.

        Raises the same errors as the conversions do, before any work starts.
        Dask arrays are checked block by block on the workers.
        """
        self.check_target_count()
        n = len(self)
        if self.is_sharded:
            from ._dask import validate_blocks

            validate_blocks(self)
            return self
        rows = chunk_rows(self.shape)
        keyword = isinstance(self.X, dict)
        for start in range(0, n, rows):
            index = slice(start, min(start + rows, n))
            if keyword:
                for key, value in self.X.items():
                    input_chunk_to_tensor(rows_of(value, index), self.input_dtype, f"{self.names[0]}[{key!r}]")
            else:
                input_chunk_to_tensor(rows_of(self.X, index), self.input_dtype, self.names[0])
            if self.y is not None and self.targets is not None:
                self.targets.convert(rows_of(self.y, index), self.names[1])
        return self

    def iter_targets(self, rows=None):
        """Converted targets in chunks, on the host (for statistics over the labels)."""
        n = len(self)
        rows = rows or chunk_rows(sample_shape(self.y))
        for start in range(0, n, rows):
            yield self.targets.convert(rows_of(self.y, slice(start, min(start + rows, n))), self.names[1])

    def arrays(self):
        """``(X, y)`` as kept: what a retraining procedure receives."""
        return self.X, self.y

    def subset(self, rows):
        """A view of rows ``rows`` (a 1-D integer array), read through this source: nothing is copied."""
        return RowSubset(self, np.asarray(rows))


def _each(data, function):
    """``function`` of ``data``, or of each value of a dict ``data``."""
    if isinstance(data, dict):
        return {key: function(value) for key, value in data.items()}
    return function(data)


class RowSubset:
    """Rows of a :class:`DataSource`, for work over part of the data (products on a mini-batch)."""

    def __init__(self, source, rows):
        self.source = source
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    @property
    def input_shape(self):
        return self.source.input_shape

    def inputs(self, index):
        return self.source.inputs(self.rows[index])

    def batch(self, index):
        return self.source.batch(self.rows[index])
