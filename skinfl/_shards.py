"""Curvature over data held in shards: each pass runs where a shard lives, and the sums are added.

Every pass an estimator makes over its training data is a statistic summed
over samples, taken through
:meth:`~skinfl._curvature.CurvatureOperator.sum_over_shards` (curvature
products, the dense matrix, EK-FAC's covariances and corrected eigenvalues,
DataInf's sums). :class:`ShardedCurvature` is that operator for data given
as dask arrays: it runs the statistic as one task per row block (shard) on
the workers that hold the blocks, and adds the results in a tree of tasks,
so one product or one pass is one round trip, whatever the number of
shards. The model travels to the workers inside a :class:`ShardWork`, never
as a bare module, and each worker thread works on a copy of its own.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import torch

from ._curvature import CurvatureOperator
from ._dask import RowBlocks, add_sums, compute, current_client, import_dask, tree_reduce
from ._data import DataSource
from ._devices import available_device, moved
from ._model import FunctionalModel

_HOST = torch.device("cpu")


class ShardWork:
    """What a task on a shard needs to build the curvature of its rows.

    The model, loss and target conversion are kept on the host; on a worker
    they go to the device of the fit where it exists (a GPU per worker, say),
    else to the host. The module is copied once per thread that uses it
    (``torch.func`` swaps a module's parameters during a call, so two
    threads must not share one) and the copies are not pickled.
    """

    def __init__(self, fmodel, data, second_order, batch_size):
        self.module = moved(fmodel.module, _HOST, copy_modules=True)
        self.loss = moved(fmodel.loss, _HOST, copy_modules=True)
        self.trainable = list(fmodel.params)
        self.device = str(fmodel.device)
        self.second_order = second_order
        self.batch_size = batch_size
        self.input_dtype = data.input_dtype
        self.targets = moved(data.targets, _HOST, copy_modules=True)
        self.names = data.names
        self._local = threading.local()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def functional_model(self):
        """This thread's functional model, on the device the shard is worked on.

        Every thread, the first included, computes on a deep copy: ``self.module`` itself is what the worker
        pickles when it passes this work on, possibly while tasks run, so it is never mid-call
        (:func:`skinfl._threads.thread_module` would let the first thread compute on it).
        """
        local = self._local
        if getattr(local, "fmodel", None) is None:
            device = available_device(self.device)
            module = moved(copy.deepcopy(self.module), device, copy_modules=False)
            local.fmodel = FunctionalModel(module, moved(self.loss, device, copy_modules=False), self.trainable)
            local.targets = moved(self.targets, device, copy_modules=False)
        return local.fmodel, local.targets

    def curvature(self, x, y):
        """The curvature operator over the rows ``(x, y)`` of one shard."""
        fmodel, targets = self.functional_model()
        data = DataSource(x, y, input_dtype=self.input_dtype, device=fmodel.device, targets=targets,
                          names=self.names)
        return CurvatureOperator(fmodel, data, self.second_order, self.batch_size)


class _GeneratorSlot:
    """Stands for a generator argument of a statistic: each shard's task draws from a generator of its own."""


def run_statistic(work, statistic, x, y, seeds, args):
    """``statistic`` on one shard: the sum over its rows, on the host.

    ``args`` are the statistic's arguments, with a :class:`_GeneratorSlot`
    where it takes a generator; ``seeds`` seed those, in order.
    """
    curvature = work.curvature(x, y)
    device = curvature.fmodel.device
    seeds = iter(seeds)
    args = [torch.Generator(device=device).manual_seed(next(seeds)) if isinstance(arg, _GeneratorSlot)
            else moved(arg, device, copy_modules=False) for arg in args]
    return moved(statistic(curvature, *args), _HOST, copy_modules=False)


class ShardedCurvature(CurvatureOperator):
    """The curvature of the mean loss over data held as dask arrays, summed over their row blocks.

    Same interface as :class:`~skinfl._curvature.CurvatureOperator`;
    :meth:`sum_over_shards` runs each statistic as one task per row block
    and adds the results on the workers (a tree of additions), so the
    driver receives one sum per pass. Random draws inside a statistic come
    from one generator per shard, seeded from the driver's generator: a
    sharded fit draws other samples than a single-process one, with the
    same distribution.

    Parameters
    ----------
    fmodel, data, second_order, batch_size, progress
        As for :class:`~skinfl._curvature.CurvatureOperator`; ``data`` holds
        dask arrays (see :attr:`skinfl._data.DataSource.is_sharded`).
    """

    def __init__(self, fmodel, data, second_order, batch_size, progress=False):
        super().__init__(fmodel, data, second_order, batch_size, progress)
        self._blocks = RowBlocks(data.X, data.y, batch_size, data.names)
        self._work = None

    def with_second_order(self, second_order):
        return ShardedCurvature(self.fmodel, self.data, second_order, self.batch_size, self.progress)

    @property
    def n_shards(self):
        return len(self._blocks)

    def _delayed_work(self):
        """The :class:`ShardWork` as the tasks take it: sent to every worker once per operator when a
        distributed client runs them (an iterative solver's round trips then carry only their vectors),
        else part of each graph."""
        dask, _ = import_dask()
        if self._work is None:
            work = ShardWork(self.fmodel, self.data, self.second_order, self.batch_size)
            client = current_client()
            self._work = (dask.delayed(work, traverse=False, pure=False) if client is None
                          else client.scatter(work, broadcast=True, hash=False))
        return self._work

    def sum_over_shards(self, statistic, *args, bar=None):
        dask, _ = import_dask()
        generators = [arg for arg in args if isinstance(arg, torch.Generator)]
        # One seed per shard and generator argument, drawn here so that the driver's generator advances.
        seeds = [torch.randint(2**62, (self.n_shards,), generator=generator, device=generator.device).tolist()
                 for generator in generators]
        shared = dask.delayed([_GeneratorSlot() if isinstance(arg, torch.Generator) else arg for arg in args],
                              traverse=False, pure=False)
        work = self._delayed_work()
        parts = [dask.delayed(run_statistic, pure=False)(work, statistic, x, y,
                                                           [column[index] for column in seeds], shared)
                 for index, (x, y) in enumerate(zip(self._blocks.inputs, self._blocks.targets))]
        (total,) = compute(tree_reduce(parts, add_sums))
        if bar is not None:
            bar.update(self.n_samples)
        return moved(total, self.fmodel.device, copy_modules=False)

    def on_rows(self, rows):
        """The curvature over rows ``rows`` (sorted), read from the shards into this process."""
        rows = np.asarray(rows)
        X, y = self.data.X, self.data.y
        if isinstance(X, dict):
            fetched = compute({key: value[rows] for key, value in X.items()}, y[rows])
        else:
            fetched = compute(X[rows], y[rows])
        local = DataSource(fetched[0], fetched[1], input_dtype=self.data.input_dtype, device=self.data.device,
                           targets=self.data.targets, names=self.data.names)
        return CurvatureOperator(self.fmodel, local, self.second_order, self.batch_size)

