"""Arrays on disk that pickle as where they are, not as what they hold.

A ``numpy.memmap`` pickles as a copy of its data, and an h5py dataset does
not pickle at all. A fitted estimator keeps its training data by reference,
so that pickling it should write where that data lies, not the data:
:func:`portable` turns a memmap into a :class:`MemmapFile` (the file, the
byte offset, dtype and shape of the array in it) and an h5py dataset into an
:class:`H5Dataset` (the file and the dataset's name), and :func:`restored`
opens them again, read-only, on the other side. Both also serve as arrays
(``shape``, ``dtype``, ``__getitem__``), so that :func:`by_reference` can
hand one to ``dask.array.from_array`` without the data travelling in the
task graph.

A memmap that cannot be reopened from its file as it is (not C-contiguous,
not backed by a file, opened copy-on-write, whose changes are not in the
file) stays as it is and pickles its data, as numpy does. h5py is imported
only by the datasets it opens.
"""

from __future__ import annotations

import mmap
import os

import numpy as np


def is_h5py_dataset(data):
    """Whether ``data`` is an h5py dataset (without importing h5py)."""
    return type(data).__module__.startswith("h5py") and hasattr(data, "file") and hasattr(data, "name")


class _OnDisk:
    """An array read through an object opened lazily (``open()``), kept open but never pickled."""

    def __init__(self):
        self._opened = None

    def _array(self):
        if self._opened is None:
            self._opened = self.open()
        return self._opened

    @property
    def ndim(self):
        return len(self.shape)

    def __len__(self):
        if not self.shape:
            raise TypeError("len() of a 0-d array")
        return self.shape[0]

    def __getitem__(self, key):
        return self._array()[key]

    def __array__(self, dtype=None, copy=None):
        array = np.asarray(self._array()[()])
        return array if dtype is None else array.astype(dtype, copy=False)

    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key != "_opened"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._opened = None


class MemmapFile(_OnDisk):
    """A C-contiguous array of ``dtype`` and ``shape`` at byte ``offset`` of the file ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The file.
    offset : int
        Where the array's first byte is in the file.
    dtype : numpy.dtype
        Its dtype, byte order included.
    shape : tuple of int
        Its shape.
    """

    def __init__(self, path, offset, dtype, shape):
        super().__init__()
        self.path = os.fspath(path)
        self.offset = int(offset)
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(size) for size in shape)

    @classmethod
    def of(cls, array):
        """The place in its file of ``array``, a ``numpy.memmap`` or a slice of one; None where it cannot be
        reopened from there (see the module docstring)."""
        buffer = getattr(array, "_mmap", None)
        if (buffer is None or array.filename is None or array.mode == "c" or not array.flags.c_contiguous
                or array.size == 0):
            return None
        try:
            start = _address(np.frombuffer(buffer, dtype=np.uint8))
        except (ValueError, TypeError):  # a closed mmap
            return None
        position = _address(array) - start
        if position < 0 or position + array.nbytes > len(buffer):
            return None
        # numpy maps the file from the allocation boundary at or below the offset it was given.
        mapped_from = array.offset - array.offset % mmap.ALLOCATIONGRANULARITY
        return cls(array.filename, mapped_from + position, array.dtype, array.shape)

    def open(self):
        """The array as a read-only ``numpy.memmap``."""
        return np.memmap(self.path, mode="r", dtype=self.dtype, shape=self.shape, offset=self.offset)

    def __dask_tokenize__(self):
        return ("MemmapFile", self.path, _modified(self.path), self.offset, self.dtype.str, self.shape)

    def __repr__(self):
        return f"MemmapFile({self.path!r}, offset={self.offset}, dtype={self.dtype}, shape={self.shape})"


class H5Dataset(_OnDisk):
    """The h5py dataset ``name`` of the HDF5 file ``filename``, opened read-only when first read.

    Parameters
    ----------
    filename : str or os.PathLike
        The file.
    name : str
        The dataset's path in it (``"/group/data"``).
    """

    def __init__(self, filename, name):
        super().__init__()
        self.filename = os.fspath(filename)
        self.name = name

    @classmethod
    def of(cls, dataset):
        """A reference to ``dataset``; None for one that cannot be reopened by name (anonymous, or in a
        file held in memory)."""
        if dataset.name is None or dataset.file.driver == "core":
            return None
        return cls(dataset.file.filename, dataset.name)

    def open(self):
        """The dataset, from its file opened read-only."""
        import h5py

        return h5py.File(self.filename, "r")[self.name]

    @property
    def shape(self):
        return tuple(self._array().shape)

    @property
    def dtype(self):
        return self._array().dtype

    def __dask_tokenize__(self):
        return ("H5Dataset", self.filename, _modified(self.filename), self.name)

    def __repr__(self):
        return f"H5Dataset({self.filename!r}, {self.name!r})"


def portable(array):
    """``array`` as it pickles by reference: a memmap as a :class:`MemmapFile` where it can be, an h5py
    dataset as an :class:`H5Dataset`; anything else unchanged."""
    if isinstance(array, np.memmap):
        return MemmapFile.of(array) or array
    if is_h5py_dataset(array):
        return H5Dataset.of(array) or array
    return array


def restored(value):
    """The array a reference of :func:`portable` stands for, opened read-only; anything else unchanged."""
    if isinstance(value, _OnDisk):
        return value.open()
    return value


def by_reference(array):
    """``array`` for ``dask.array.from_array``: a memmap or an h5py dataset as a reference to its file (the
    conversion of :func:`portable`), so that the task graph carries where the data is, not the data."""
    return portable(array)


def _address(array):
    return array.__array_interface__["data"][0]


def _modified(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None
