"""Results as lazy dask arrays, computed block by block on the workers.

When the data of a call are dask arrays, ``transform``, ``self_influence``,
``influences`` and ``top_influences`` return dask arrays: nothing runs until
they are computed, and then on the current Dask client (or dask's local
scheduler). A fitted estimator is shipped to the workers once per
computation, without its training data unless its inverse reads them (CG,
LiSSA and DataInf solve against them).

``influences`` is factor-first: one task per test block solves its
inverse-curvature gradients, which stay on the workers; then one task per
training block computes that block's gradients once and multiplies them by
the factors of a group of test blocks (as many as fit in scikit-learn's
``working_memory``). No gradient and no solve is computed twice for one
test group. ``top_influences`` keeps the best ``k`` of each training
block and merges them in a tree of tasks.
"""

from __future__ import annotations

import functools
import operator
import pickle
import threading

import numpy as np
import torch
from sklearn import get_config

from ._dask import RowBlocks, import_dask, is_dask, tree_reduce
from ._gradients import index_batches, iter_gradients
from ._removal import RemovalSteps, group_codes, loss_changes, rows_by_group
from ._results import RunningTopK, write


def numpy_dtype(dtype):
    """The numpy dtype of a torch dtype."""
    return torch.empty((), dtype=dtype).numpy().dtype


class ShippedEstimator:
    """A fitted estimator as the tasks of one computation take it: its pickle, unpickled once per thread.

    Workers pickle what they hold again to pass it to each other, in a
    thread of their own, while their task threads compute: a live estimator
    would then be pickled in the middle of a call (``torch.func`` swaps a
    module's parameters during one). The pickle made here, before anything
    runs, is what travels; each thread computes with its own estimator.
    """

    def __init__(self, estimator):
        self._pickle = pickle.dumps(estimator, protocol=pickle.HIGHEST_PROTOCOL)
        self._local = threading.local()

    def __getstate__(self):
        return {"_pickle": self._pickle}

    def __setstate__(self, state):
        self._pickle = state["_pickle"]
        self._local = threading.local()

    def get(self):
        """This thread's estimator."""
        estimator = getattr(self._local, "estimator", None)
        if estimator is None:
            estimator = self._local.estimator = pickle.loads(self._pickle)
        return estimator


def _shipped(estimator):
    """The delayed :class:`ShippedEstimator` of ``estimator`` as the workers need it (see ``_worker_copy``)."""
    dask, _ = import_dask()
    return dask.delayed(ShippedEstimator(estimator._worker_copy()), traverse=False, pure=False)


def _task(function):
    dask, _ = import_dask()
    return dask.delayed(function, pure=False)


def _transform_block(shipped, x, y):
    return shipped.get().transform(x, y)


def _self_influence_block(shipped, x, y):
    return shipped.get().self_influence(x, y)


def _inverse_gradients_block(shipped, x, y, normalize=None):
    estimator = shipped.get()
    data = estimator._check_data(x, y, names=("X_test", "y_test"))
    return estimator._inverse_gradients_of(data, slice(0, len(data)), normalize, "test").cpu()


def _held(estimator, factors):
    return torch.cat([factor.to(estimator.device_) for factor in factors])


def _influence_block(shipped, factors, x, y, normalize=None):
    """Influences of a group of test points (their ``factors``) on the training rows ``(x, y)``."""
    estimator = shipped.get()
    held = _held(estimator, factors)
    data = estimator._check_data(x, y)
    result = np.empty((len(held), len(data)), dtype=numpy_dtype(held.dtype))
    for position, gradients in iter_gradients(estimator._functional_model(), data, estimator.batch_size):
        write(result, (slice(None), position), held @ estimator._streamed_vectors(gradients, normalize, "train").T)
    return result


def _group_influence_block(shipped, factors, x, y, codes, n_groups):
    """First-order removal effects times ``n`` of the groups (``codes``: each row's) on the rows ``(x, y)``."""
    estimator = shipped.get()
    held = _held(estimator, factors)
    data = estimator._check_data(x, y)
    codes = torch.as_tensor(codes, device=held.device)
    sums = torch.zeros(len(held), n_groups, dtype=held.dtype, device=held.device)
    for position, gradients in iter_gradients(estimator._functional_model(), data, estimator.batch_size):
        sums.index_add_(1, codes[position], held @ gradients.T)
    return sums.cpu().numpy()


def _point_steps_block(shipped, x, y, solver):
    """Newton steps of removing each training row of ``(x, y)`` (see :mod:`skinfl._removal`)."""
    estimator = shipped.get()
    data = estimator._check_data(x, y)
    steps = RemovalSteps(estimator, data, solver)
    deltas = steps.of_points(slice(0, len(data)))
    steps.warn_indefinite("training points")
    return deltas.cpu()


def _removal_block(shipped, deltas, x, y, exact=False):
    """``<g_test, delta>`` (or, ``exact``, the test losses' change at ``theta + delta``) for the test rows
    ``(x, y)`` and the parameter changes ``deltas``."""
    estimator = shipped.get()
    data = estimator._check_data(x, y, names=("X_test", "y_test"))
    deltas = deltas.to(estimator.device_)
    fmodel = estimator._functional_model()
    result = np.empty((len(data), len(deltas)), dtype=numpy_dtype(deltas.dtype))
    if exact:
        for position, index in index_batches(slice(0, len(data)), estimator.batch_size):
            write(result, position, loss_changes(fmodel, deltas, *data.batch(index)))
        return result
    for position, gradients in iter_gradients(fmodel, data, estimator.batch_size):
        write(result, position, gradients @ deltas.T)
    return result


def _top_block(shipped, factors, x, y, k, orders, start, normalize=None):
    """``(indices, values)``: the best ``k`` training rows of ``(x, y)`` per test point and order."""
    estimator = shipped.get()
    held = _held(estimator, factors)
    data = estimator._check_data(x, y)
    tops = [RunningTopK(k, largest) for largest in orders]
    for position, gradients in iter_gradients(estimator._functional_model(), data, estimator.batch_size):
        block = held @ estimator._streamed_vectors(gradients, normalize, "train").T
        for top in tops:
            top.update(block, start + position.start)
    return (torch.cat([top.indices for top in tops], dim=1).cpu().numpy(),
            torch.cat([top.values for top in tops], dim=1).cpu().numpy())


def _merge_tops(first, second, k, orders):
    """The best ``k`` per order of two ``(indices, values)`` results over disjoint training rows."""
    merged_indices, merged_values = [], []
    for order, largest in enumerate(orders):
        pieces = [(torch.from_numpy(indices), torch.from_numpy(values))
                  for indices, values in (first, second)]
        widths = [indices.shape[1] // len(orders) for indices, _ in pieces]
        indices = torch.cat([part[0][:, order * w:(order + 1) * w] for part, w in zip(pieces, widths)], dim=1)
        values = torch.cat([part[1][:, order * w:(order + 1) * w] for part, w in zip(pieces, widths)], dim=1)
        best = torch.topk(values, min(k, values.shape[1]), dim=1, largest=largest, sorted=True)
        merged_values.append(best.values)
        merged_indices.append(torch.gather(indices, 1, best.indices))
    return torch.cat(merged_indices, dim=1).numpy(), torch.cat(merged_values, dim=1).numpy()


def _test_groups(estimator, sizes):
    """Lists of test blocks whose inverse-curvature gradients are held together: within ``working_memory``."""
    itemsize = torch.tensor([], dtype=estimator._dtype()).element_size()
    budget = max(1, get_config()["working_memory"] * 2**20 // (estimator.n_params_ * itemsize))
    groups, current, rows = [], [], 0
    for index, size in enumerate(sizes):
        if current and rows + size > budget:
            groups.append(current)
            current, rows = [], 0
        current.append(index)
        rows += size
    if current:
        groups.append(current)
    return groups


def lazy_rows(estimator, function, X, y, n_columns=None):
    """A dask array of ``function(estimator, x, y)`` over the row blocks of ``(X, y)``, concatenated."""
    _, da = import_dask()
    blocks = RowBlocks(X, y, estimator.batch_size)
    worker = _shipped(estimator)
    dtype = numpy_dtype(estimator._dtype())
    parts = [da.from_delayed(_task(function)(worker, x, t), shape=(size,) if n_columns is None else (size, n_columns),
                             dtype=dtype)
             for x, t, size in zip(blocks.inputs, blocks.targets, blocks.sizes)]
    return da.concatenate(parts, axis=0)


def lazy_transform(estimator, X, y):
    return lazy_rows(estimator, _transform_block, X, y, estimator.n_params_)


def lazy_self_influence(estimator, X, y):
    return lazy_rows(estimator, _self_influence_block, X, y)


def _training_blocks(estimator, X, y):
    if X is None:
        data = estimator._training_data(None, None)
        return RowBlocks(data.X, data.y, estimator.batch_size)
    return RowBlocks(X, y, estimator.batch_size)


def _factors(estimator, worker, test, normalize=None):
    """Delayed inverse-curvature gradients of each test block, and the groups of blocks held together."""
    factors = [_task(_inverse_gradients_block)(worker, x, t, normalize) for x, t in zip(test.inputs, test.targets)]
    return factors, _test_groups(estimator, test.sizes)


def lazy_influences(estimator, X_test, y_test, X, y, normalize=None):
    """``influences`` as a dask array of shape ``(n_test, n_train)``, factor-first (see the module docstring)."""
    _, da = import_dask()
    test = RowBlocks(X_test, y_test, estimator.batch_size, ("X_test", "y_test"))
    train = _training_blocks(estimator, X, y)
    worker = _shipped(estimator)
    factors, groups = _factors(estimator, worker, test, normalize)
    dtype = numpy_dtype(estimator._dtype())
    rows = []
    for group in groups:
        held = [factors[index] for index in group]
        n_held = sum(test.sizes[index] for index in group)
        rows.append(da.concatenate([
            da.from_delayed(_task(_influence_block)(worker, held, x, t, normalize), shape=(n_held, size),
                            dtype=dtype)
            for x, t, size in zip(train.inputs, train.targets, train.sizes)], axis=1))
    return da.concatenate(rows, axis=0)


def lazy_top_influences(estimator, X_test, y_test, X, y, k, orders, normalize=None):
    """``top_influences`` as a pair of dask arrays ``(indices, values)`` of shape ``(n_test, k * len(orders))``."""
    dask, da = import_dask()
    test = RowBlocks(X_test, y_test, estimator.batch_size, ("X_test", "y_test"))
    train = _training_blocks(estimator, X, y)
    n_train = sum(train.sizes)
    if not 1 <= k <= n_train:
        raise ValueError(f"k must be an integer from 1 to the {n_train} training points, got {k!r}.")
    worker = _shipped(estimator)
    factors, groups = _factors(estimator, worker, test, normalize)
    dtype = numpy_dtype(estimator._dtype())
    indices, values = [], []
    for group in groups:
        held = [factors[index] for index in group]
        n_held = sum(test.sizes[index] for index in group)
        parts = [_task(_top_block)(worker, held, x, t, k, orders, start, normalize)
                 for x, t, start in zip(train.inputs, train.targets, train.starts)]
        best = tree_reduce(parts, functools.partial(_merge_tops, k=k, orders=orders))
        shape = (n_held, k * len(orders))
        indices.append(da.from_delayed(dask.delayed(operator.getitem)(best, 0), shape=shape, dtype=np.int64))
        values.append(da.from_delayed(dask.delayed(operator.getitem)(best, 1), shape=shape, dtype=dtype))
    return da.concatenate(indices, axis=0), da.concatenate(values, axis=0)


def lazy_removal_effects(estimator, X_test, y_test, X, y, groups, order, solver, exact=False):
    """``removal_effects`` as a dask array of shape ``(n_test, n_train)`` or ``(n_test, n_groups)``.

    - Single points, first order: :func:`lazy_influences` divided by ``n``.
    - Single points, Newton: one task per training block computes its
      points' parameter changes, kept on the workers; one task per (test
      block, training block) pairs them with the test gradients.
    - Groups, first order: one task per (group of test blocks, training
      block) sums its influences into the groups' columns, added in a tree.
    - Groups, Newton: a group's rows are spread over the blocks, and its
      step needs them together: the steps are computed here, when the array
      is built (reading each group's rows, and for conjugate gradient making
      curvature products on the workers); the products with the test
      gradients are tasks.
    """
    dask, da = import_dask()
    n = estimator.n_samples_fit_
    if groups is None and order == "first":
        return lazy_influences(estimator, X_test, y_test, X, y) / n
    test = RowBlocks(X_test, y_test, estimator.batch_size, ("X_test", "y_test"))
    train = _training_blocks(estimator, X, y)
    worker = _shipped(estimator)
    dtype = numpy_dtype(estimator._dtype())
    if groups is None:
        steps = RemovalSteps(estimator, None, solver)
        if steps._uses_cg(steps.rows_per_point):
            raise ValueError(
                f"order='newton' for single points with {steps.rows_per_point} output values per sample solves each "
                "point's system by conjugate gradient over the fitted data, which is not run on dask arrays. Pass "
                "numpy arrays or tensors, or remove groups of points (groups=...)."
            )
        deltas = [_task(_point_steps_block)(worker, x, t, solver) for x, t in zip(train.inputs, train.targets)]
        return da.concatenate([
            da.concatenate([da.from_delayed(_task(_removal_block)(worker, delta, x, t, exact), shape=(test_size, size),
                                            dtype=dtype)
                            for delta, size in zip(deltas, train.sizes)], axis=1)
            for x, t, test_size in zip(test.inputs, test.targets, test.sizes)], axis=0)
    codes, labels = group_codes(groups, sum(train.sizes))
    if order == "first":
        factors, test_groups = _factors(estimator, worker, test)
        rows = []
        for group in test_groups:
            held = [factors[index] for index in group]
            n_held = sum(test.sizes[index] for index in group)
            parts = [_task(_group_influence_block)(worker, held, x, t, codes[start:start + size], len(labels))
                     for x, t, start, size in zip(train.inputs, train.targets, train.starts, train.sizes)]
            rows.append(da.from_delayed(tree_reduce(parts, operator.add), shape=(n_held, len(labels)), dtype=dtype)
                        / n)
        return da.concatenate(rows, axis=0)
    data = estimator._training_data(X, y)
    steps = RemovalSteps(estimator, data, solver)
    members = rows_by_group(codes, len(labels))
    columns = []
    for chunk in estimator._held_chunks(len(labels)):
        deltas = dask.delayed(steps.of_groups(members[chunk]).cpu(), pure=True)
        size = chunk.stop - chunk.start
        columns.append(da.concatenate([
            da.from_delayed(_task(_removal_block)(worker, deltas, x, t, exact), shape=(test_size, size), dtype=dtype)
            for x, t, test_size in zip(test.inputs, test.targets, test.sizes)], axis=0))
    steps.warn_indefinite("groups")
    return da.concatenate(columns, axis=1)


def store(result, out):
    """Compute the dask array ``result`` into ``out`` and return ``out``.

    An array the workers can write (a zarr array) is written by them, in
    blocks aligned with its chunks; a numpy array, memmap or tensor here is
    filled one row block at a time, computed on the workers.
    """
    _, da = import_dask()
    if tuple(out.shape) != tuple(result.shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, but the result has shape {tuple(result.shape)}.")
    if isinstance(out, (np.ndarray, torch.Tensor)):
        if isinstance(out, np.ndarray) and not out.flags.writeable:
            raise ValueError("out is read-only; open the memmap with mode='w+' or 'r+'.")
        start = 0
        for index in range(result.numblocks[0]):  # one row of blocks at a time
            block = np.asarray(result.blocks[index].compute())
            write(out, slice(start, start + len(block)), torch.from_numpy(block))
            start += len(block)
        return out
    chunks = getattr(out, "chunks", None)
    if chunks is not None and not is_dask(out) and not _on_chunk_edges(result.chunks, tuple(chunks), out.shape):
        # No two tasks may write into one chunk of out: blocks that straddle its chunks are cut to them
        # (which holds each block until all its pieces are written, so it is avoided where it can be).
        result = result.rechunk(tuple(chunks))
    da.store(result, out, lock=False)
    return out


def _on_chunk_edges(blocks, chunks, shape):
    """Whether every edge of the dask ``blocks`` (per axis, their sizes) is an edge of ``chunks`` (per axis,
    one size) or the end of the array: each chunk of ``out`` is then written by one task."""
    for sizes, chunk, length in zip(blocks, chunks, shape):
        edges = np.cumsum(sizes)
        if any(edge % chunk and edge != length for edge in edges):
            return False
    return True
