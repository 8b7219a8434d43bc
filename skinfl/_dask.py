"""Dask arrays as data: recognising them, cutting them into aligned row blocks, computing them.

Dask is optional: nothing here imports it until a dask array is given.
Data given as dask arrays (or a dict of them, for keyword inputs) are cut
along the first axis into the array's own chunks; the other arrays of the
same data set (targets, other keyword inputs) are rechunked to the same
rows, so that block ``i`` of every array holds the same samples. Each block
is then one task's data, read where it lives.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._references import by_reference

# Rows per block when data that is not a dask array (the fitted numpy data, a memmap, a zarr array)
# is cut into blocks for tasks: about this many bytes of inputs each.
_BLOCK_BYTES = 64 * 2**20


def is_dask(value):
    """Whether ``value`` is a dask array, or a dict holding one."""
    if isinstance(value, dict):
        return any(is_dask(item) for item in value.values())
    return type(value).__module__.split(".")[0] == "dask" and hasattr(value, "chunks")


def import_dask():
    """``(dask, dask.array)``, with an error that says how to install them."""
    try:
        import dask
        import dask.array
    except ImportError as error:  # pragma: no cover - the extra is installed where dask arrays exist
        raise ImportError("Dask arrays need dask: pip install 'skinfl[dask]'.") from error
    return dask, dask.array


def check_known_chunks(array, name):
    """Refuse a dask array whose chunk sizes are unknown (after boolean indexing, say)."""
    if any(math.isnan(size) for size in array.shape) or any(
            math.isnan(size) for sizes in array.chunks for size in sizes):
        raise ValueError(
            f"{name} is a dask array with unknown chunk sizes {array.chunks}; call "
            f"{name} = {name}.compute_chunk_sizes() first, so that its samples can be counted and aligned."
        )


def _as_dask_array(array, rows, name):
    """``array`` as a dask array: itself, or chunked by ``rows`` along the first axis and whole along the others."""
    _, da = import_dask()
    if not is_dask(array):
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        # Files (memmaps, h5py) travel as their path: a task reads its own rows.
        array = da.from_array(by_reference(array), chunks=(rows,) + tuple(array.shape[1:]), asarray=True)
    check_known_chunks(array, name)
    return array


def _whole_rows(pieces, cuts):
    """Rows of one block from the chunks that hold them: ``pieces[j]`` is a row of chunks along the other
    axes (nested lists, as ``numpy.block`` takes them), ``cuts[j]`` the slice of its rows to keep."""
    return np.concatenate([np.block(piece)[cut] for piece, cut in zip(pieces, cuts)], axis=0)


def _blocks_on_rows(array, bounds):
    """One delayed value per ``(start, stop)`` of ``bounds``: the rows of ``array`` there, whole.

    Where the array's chunks are those rows already, its own chunks are
    taken; elsewhere a task assembles the rows from the chunks that hold
    them. The tasks' names are tokens of what they read, the same in each
    computation (dask's rechunk would give keys that change between
    computations of one array).
    """
    dask, _ = import_dask()
    grid = array.to_delayed()
    edges = np.cumsum((0,) + tuple(array.chunks[0]))
    whole = all(len(chunks) == 1 for chunks in array.chunks[1:])
    blocks = []
    for start, stop in bounds:
        first = int(np.searchsorted(edges, start, side="right")) - 1
        if whole and edges[first] == start and edges[first + 1] == stop:
            blocks.append(grid[(first,) + (0,) * (array.ndim - 1)])
            continue
        pieces, cuts, index = [], [], first
        while edges[index] < stop:
            pieces.append(grid[index].tolist())
            cuts.append(slice(max(start, edges[index]) - edges[index], min(stop, edges[index + 1]) - edges[index]))
            index += 1
        blocks.append(dask.delayed(_whole_rows, pure=True)(pieces, cuts))
    return blocks


def default_rows(shape, batch_size):
    """Row chunks for data that is not a dask array: about ``_BLOCK_BYTES`` of inputs, whole batches."""
    shapes = shape.values() if isinstance(shape, dict) else [shape]
    n = next(iter(shapes))[0]
    per_row = max(1, sum(int(np.prod(s[1:], dtype=np.int64)) for s in shapes) * 8)
    rows = max(batch_size, _BLOCK_BYTES // per_row // batch_size * batch_size)
    return min(rows, max(n, 1))


class RowBlocks:
    """Inputs and targets of one data set cut into aligned row blocks, one delayed value per block.

    Parameters
    ----------
    X : dask array, array-like or dict of them
        Inputs; the row chunks are those of the first dask array found in
        ``X`` (or ``y``), else ``default_rows``.
    y : dask array, array-like or None
        Targets, cut into the same rows.
    batch_size : int
        For the rows of data without chunks of its own.
    names : tuple of str
        Names of X and y in error messages.

    Attributes
    ----------
    sizes : list of int
        Samples per block (empty blocks are left out).
    starts : list of int
        First row of each block.
    inputs : list
        Delayed inputs of each block (a dict of them for keyword inputs).
    targets : list
        Delayed targets of each block, or None without ``y``.
    """

    def __init__(self, X, y, batch_size, names=("X", "y")):
        inputs = dict(X) if isinstance(X, dict) else {None: X}
        chunked = next((array for array in [*inputs.values(), y] if is_dask(array)), None)
        if chunked is not None:
            check_known_chunks(chunked, names[0])
            rows = chunked.chunks[0]
        else:
            rows = default_rows({key: tuple(value.shape) for key, value in inputs.items()}, batch_size)
        arrays = {key: _as_dask_array(array, rows, names[0] if key is None else f"{names[0]}[{key!r}]")
                  for key, array in inputs.items()}
        sizes = next(iter(arrays.values())).chunks[0] if chunked is None else rows
        edges = np.cumsum((0,) + tuple(sizes))
        bounds = [(int(edges[index]), int(edges[index + 1])) for index in range(len(sizes)) if sizes[index] > 0]
        self.sizes = [stop - start for start, stop in bounds]
        self.starts = [start for start, _ in bounds]
        blocks = {key: _blocks_on_rows(array, bounds) for key, array in arrays.items()}
        self.inputs = [{key: blocks[key][index] for key in blocks} for index in range(len(bounds))] \
            if isinstance(X, dict) else blocks[None]
        self.targets = [None] * len(bounds) if y is None else _blocks_on_rows(_as_dask_array(y, rows, names[1]), bounds)

    def __len__(self):
        return len(self.sizes)


def compute(*collections):
    """``dask.compute(*collections)``, from a task on a worker too (a nested computation, run through the
    worker's client so that the task gives up its thread while it waits)."""
    dask, _ = import_dask()
    try:
        from distributed import get_worker, worker_client

        get_worker()
    except (ImportError, ValueError):
        return dask.compute(*collections)
    with worker_client() as client:
        return tuple(client.compute(list(collections), sync=True))


def current_client():
    """The distributed client this process computes with, or None (dask's local scheduler, or a task on a
    worker, whose nested computations go through :func:`compute`)."""
    dask, _ = import_dask()
    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None  # a local scheduler chosen explicitly
    try:
        from distributed import default_client, get_worker
    except ImportError:
        return None
    try:
        get_worker()
        return None
    except ValueError:
        pass
    try:
        return default_client()
    except ValueError:
        return None


def tree_reduce(parts, add):
    """One delayed value: ``add`` applied pairwise to the delayed ``parts``, in a tree of depth log2."""
    dask, _ = import_dask()
    while len(parts) > 1:
        parts = [dask.delayed(add, pure=True)(parts[index], parts[index + 1]) if index + 1 < len(parts)
                 else parts[index] for index in range(0, len(parts), 2)]
    return parts[0]


def add_sums(a, b):
    """``a + b`` for sums as statistics return them: tensors, numbers, None, and dicts, lists and tuples of
    them (dicts are united: a key missing from one side counts as zero)."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        return {key: add_sums(a.get(key), b.get(key)) for key in {**a, **b}}
    if isinstance(a, (list, tuple)):
        return type(a)(add_sums(x, z) for x, z in zip(a, b))
    return a + b


def _validate_block(source, x, y):
    source.__class__(x, y, input_dtype=source.input_dtype, device="cpu", targets=source.targets,
                     names=source.names).validate()


def validate_blocks(source):
    """Check the values of a :class:`~skinfl._data.DataSource` holding dask arrays, one task per row block."""
    dask, _ = import_dask()
    from ._devices import moved

    blocks = RowBlocks(source.X, source.y, 1024, source.names)
    host = moved(source, torch.device("cpu"), copy_modules=True)
    host.X = host.y = None  # the blocks carry the data
    checker = dask.delayed(host, traverse=False, pure=False)
    compute([dask.delayed(_validate_block, pure=False)(checker, x, y) for x, y in zip(blocks.inputs, blocks.targets)])
