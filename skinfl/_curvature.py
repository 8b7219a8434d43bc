"""Curvature of the training loss as a linear operator over a data set.

The curvature ``C`` is the Hessian or the Gauss-Newton matrix of the mean
training loss ``L(theta) = 1/n sum_i l(theta; x_i, y_i)``. Products are taken
with a block of vectors at once: the block is one ``vmap`` axis of a
reverse-over-reverse (Hessian) or forward-then-reverse (Gauss-Newton)
product whose graph is built once per batch of data, so a block of ``k``
vectors costs one batched pass over the data, not ``k`` passes.

Vectors are rows: ``matmat(V)`` with ``V`` of shape ``(k, n_params)`` returns
``V @ C`` (``C`` is symmetric, so these are the products ``C v`` as rows).
Regularization is not part of this operator; solvers add it.
"""

from __future__ import annotations

import math

import torch
from torch.func import grad, jvp, vjp, vmap

from ._batches import n_rows, take_rows
from ._cotangents import (
    cross_entropy_curvature_scale,
    elementwise_curvature,
    output_cotangents,
    resolve_target_draws,
)
from ._gradients import batch_slices, pullback_batch
from ._progress import progress_bar
from ._threads import FORWARD_AD

SECOND_ORDER_MODES = ("hessian", "gauss_newton")

# Floats that one batched product may hold in saved activations: the product
# of (vectors in a block) x (samples in a sub-batch) x (activations saved per
# sample). At 2**24 (64 MB in float32) the batched tensors of the element-wise
# steps (activation derivatives, sums of cotangents) mostly stay in a CPU's
# cache while matrix kernels still have enough to do: on small CNNs products
# ran about 20% faster than at 2**25, on MLPs as fast.
_WORKING_SET_FLOATS = 2**24
# Vectors per block in a product; more per call amortises the pass over data.
_MAX_VECTOR_BLOCK = 128
_MIN_VECTOR_BLOCK = 32
# The sampled Gauss-Newton diagonal averages at least this many draws in all
# (several passes over a small data set): relative noise about 1/sqrt(draws).
_MIN_DIAGONAL_DRAWS = 1024


def _hessian_products(fmodel, x, y):
    """Products with the Hessian of the summed loss of one batch.

    Reverse-over-reverse: the gradient's graph is built once per batch and
    its pullback is applied to every block of vectors, so the forward and
    backward passes are not recomputed per block. It measured as fast as or
    faster than forward-over-reverse (``jvp`` of ``grad``) on MLPs and CNNs.
    """

    def batch_loss(params):
        return fmodel.per_sample_objective(params, x, y).sum()

    _, pullback = vjp(grad(batch_loss), fmodel.params)
    return vmap(lambda tangent: pullback(tangent)[0])


def _output_hessian_products(loss, output, target):
    """``u -> H u`` for the Hessian ``H`` of the summed loss in the outputs, ``u`` of shape ``(k, *output.shape)``.

    Built-in losses have closed forms that cost a few element-wise
    operations per vector; any other loss takes a forward-mode derivative of
    its output gradient per vector.
    """
    if loss.sequence:
        # Summed over positions: the Hessian is block-diagonal, one softmax block per predicted position.
        logits, targets = loss.positions(output, target)
        n_classes = logits.shape[-1]
        scale = cross_entropy_curvature_scale(loss.position_loss(), logits.reshape(-1, n_classes),
                                              targets.reshape(-1)).reshape(logits.shape[:2])
        probabilities = torch.softmax(logits, dim=-1)
        scaled = scale[..., None] * probabilities

        def position_products(u):
            u_positions, _ = loss.positions(u.reshape(-1, *output.shape[1:]))
            u_positions = u_positions.reshape(*u.shape[:-output.ndim], *logits.shape)
            products = scaled * (u_positions - (u_positions * probabilities).sum(dim=-1, keepdim=True))
            return loss.scatter_positions(products, output)

        return position_products
    if loss.kind == "cross_entropy" and output.ndim == 2 and output.shape[1] > 1:
        scale = cross_entropy_curvature_scale(loss, output, target)
        probabilities = torch.softmax(output, dim=1)
        scaled = scale[:, None] * probabilities

        def cross_entropy_products(u):
            return scaled * (u - (u * probabilities).sum(dim=-1, keepdim=True))

        return cross_entropy_products

    if loss.kind in ("mse", "bce_with_logits"):
        # Element-wise losses (targets have the outputs' shape): the Hessian is diagonal.
        diagonal = elementwise_curvature(loss, output, target)
        return lambda u: diagonal * u
    output_gradient = grad(lambda o: loss.per_sample(o, target).sum())
    forward_products = vmap(lambda u: jvp(output_gradient, (output,), (u,))[1])

    def products(u):
        with FORWARD_AD:
            return forward_products(u)

    return products


def _gauss_newton_products(fmodel, x, y):
    """Products with ``sum_i J_i^T H_i J_i`` of one batch (H_i: loss Hessian in outputs)."""

    def outputs(params):
        return fmodel.output(params, x)

    output, pullback = vjp(outputs, fmodel.params)
    output_hessian = _output_hessian_products(fmodel.loss, output, y)

    def products(tangents):
        with FORWARD_AD:
            jacobian_products = vmap(lambda t: jvp(outputs, (fmodel.params,), (t,))[1])(tangents)
        return vmap(pullback)(output_hessian(jacobian_products))[0]

    return products


_BATCH_PRODUCTS = {"hessian": _hessian_products, "gauss_newton": _gauss_newton_products}


def saved_floats_per_sample(fmodel, data):
    """Elements autograd saves per sample of the loss: a measure of activations.

    Counted on two samples minus one sample, so that tensors saved once per
    batch (the weights) are not counted as per-sample memory.
    """
    x, y = data.batch(slice(0, min(2, len(data))))

    def count(n):
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel()
            return tensor

        params = {name: p.detach().requires_grad_(True) for name, p in fmodel.params.items()}
        y_n = None if y is None else y[:n]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fmodel.per_sample_objective(params, take_rows(x, slice(0, n)), y_n).sum()
        return total

    if n_rows(x) < 2:
        return max(count(1), 1)
    return max(count(2) - count(1), 1)


def symmetrize_(matrix, block=1024):
    """``matrix <- (matrix + matrix.T) / 2`` in place, one pair of blocks at a time."""
    for rows in batch_slices(len(matrix), block):
        for columns in batch_slices(rows.stop, block):
            if columns.start > rows.start:
                break
            upper = matrix[columns, rows]
            mean = (matrix[rows, columns] + upper.T) / 2
            matrix[rows, columns] = mean
            matrix[columns, rows] = mean.T
    return matrix


class CurvatureOperator:
    """Hessian or Gauss-Newton products of the mean loss over ``(X, y)``.

    Parameters
    ----------
    fmodel : FunctionalModel
    data : DataSource
        The samples, read in batches on the model's device; targets required.
    second_order : {"hessian", "gauss_newton"}
    batch_size : int
        Most samples per pass; passes are smaller when the activations saved
        per sample would exceed the working set (``_WORKING_SET_FLOATS``).
    progress : bool
        Show a progress bar over batches of ``dense``.
    """

    def __init__(self, fmodel, data, second_order, batch_size, progress=False):
        self.fmodel = fmodel
        self.data = data
        self.second_order = second_order
        self.batch_size = batch_size
        self.progress = progress
        self._batch_products = _BATCH_PRODUCTS[second_order]
        self._saved_per_sample = None

    @property
    def n_params(self):
        return self.fmodel.n_params

    def with_second_order(self, second_order):
        """The same data and model, with the curvature ``second_order``."""
        return CurvatureOperator(self.fmodel, self.data, second_order, self.batch_size, self.progress)

    def on_rows(self, rows):
        """The same curvature over rows ``rows`` (a 1-D integer array) of the data, read through it.

        The operator shares this one's measure of activations per sample, so
        that the many small operators of a stochastic solver (one per
        mini-batch) do not each run a forward pass to measure it (measured
        anew per mini-batch, resident memory also grew by about 1 MB per
        iteration, 1.4 GB over 1,000 LiSSA iterations on a small MLP).
        """
        subset = CurvatureOperator(self.fmodel, self.data.subset(rows), self.second_order, self.batch_size)
        subset._saved_per_sample = self._activations_per_sample()
        return subset

    def _activations_per_sample(self):
        """Floats autograd saves per sample (see :func:`saved_floats_per_sample`), measured once."""
        if self._saved_per_sample is None:
            self._saved_per_sample = saved_floats_per_sample(self.fmodel, self.data)
        return self._saved_per_sample

    @property
    def n_samples(self):
        return len(self.data)

    def _blocking(self, n_vectors):
        """(vectors per block, samples per sub-batch) for ``n_vectors`` products."""
        per_sample = self._activations_per_sample()
        block = max(1, min(n_vectors, _MAX_VECTOR_BLOCK))
        sub_batch = _WORKING_SET_FLOATS // (block * per_sample)
        if sub_batch < 16 and block > _MIN_VECTOR_BLOCK:
            block = max(1, min(n_vectors, _MIN_VECTOR_BLOCK))
            sub_batch = _WORKING_SET_FLOATS // (block * per_sample)
        sub_batch = int(min(max(sub_batch, 1), self.batch_size, self.n_samples))
        # Equal sub-batches: 459 + 53 samples costs nearly two full passes, 256 + 256 one.
        n_sub_batches = -(-self.n_samples // sub_batch)
        return block, -(-self.n_samples // n_sub_batches)

    def _accumulate(self, vector_rows, out, progress_desc=None):
        """Write the rows ``C_sum v`` (summed, not averaged, over samples) into ``out``.

        ``vector_rows(rows)`` gives the vectors of a slice of rows, so callers
        need not hold all vectors at once (``dense`` makes identity blocks).
        Products are summed in place into the rows of ``out`` seen per
        parameter: no flat copy of them is made per batch.
        """
        layout = self.fmodel.layout
        block, sub_batch = self._blocking(len(out))
        vector_blocks = batch_slices(len(out), block)
        batches = batch_slices(self.n_samples, sub_batch)
        with torch.no_grad():
            for position, batch in enumerate(
                progress_bar(batches, self.progress and progress_desc is not None, progress_desc)
            ):
                x, y = self.data.batch(batch)
                products = self._batch_products(self.fmodel, x, y)
                for rows in vector_blocks:
                    block_products = products(layout.unflatten(vector_rows(rows)))
                    for name, total in layout.unflatten(out[rows]).items():  # views into out
                        if position == 0:
                            total.copy_(block_products[name])
                        else:
                            total += block_products[name]
        return out

    def sum_over_shards(self, statistic, *args, bar=None):
        """``statistic(operator, *args, bar=bar)`` summed over the shards of the data.

        This is the seam through which every pass over the training data
        goes: a statistic returns *sums* over the samples of the operator it
        is given (a tensor, or dicts, lists and tuples of them), never means,
        so that sums over parts of the data add up to the sum over all of it.
        Here the data is one shard, and the statistic runs on it; a sharded
        operator (:class:`skinfl._shards.ShardedCurvature`) runs it on each
        shard where the shard lives and adds the results. ``bar``, a progress
        bar stepped by samples, is only passed where the statistic runs here.
        """
        return statistic(self, *args, bar=bar)

    def matmat(self, vectors):
        """Rows ``C v`` for the rows ``v`` of ``vectors`` (shape ``(k, n_params)``)."""
        return self.sum_over_shards(summed_products, vectors).div_(self.n_samples)

    def dense(self, dtype=None):
        """The explicit ``(n_params, n_params)`` curvature matrix, symmetrised.

        ``dtype`` (default: the model's) is that of the matrix the products
        are accumulated into; float64 avoids a second copy for a float64
        factorisation.
        """
        matrix = self.sum_over_shards(summed_dense, dtype or self.fmodel.dtype)
        matrix /= self.n_samples
        # Reverse-over-reverse products are symmetric only up to rounding.
        return symmetrize_(matrix)

    def gauss_newton_diagonal(self, output_shape, generator):
        """The Gauss-Newton diagonal, exactly or as an unbiased estimate.

        ``diag(1/n sum_i J_i^T H_i J_i) = 1/n sum_i sum_c (J_i^T u_ic)**2``
        with the output cotangents ``u_ic`` that EK-FAC's
        ``n_target_draws="auto"`` takes (see
        :func:`skinfl._cotangents.output_cotangents`): the columns of a root
        of ``H_i`` for a few outputs per sample (exact, one pass), else one
        drawn target per sample and pass, over enough passes for at least
        ``_MIN_DIAGONAL_DRAWS`` draws in all (relative noise about
        ``1 / sqrt(draws)``). One gradient per sample and cotangent, never a
        per-sample Jacobian, so memory is that of a batch of gradients.
        """
        draws = resolve_target_draws("auto", output_shape, self.fmodel.loss)
        passes = 1 if draws is None else math.ceil(_MIN_DIAGONAL_DRAWS / self.n_samples)
        diagonal = self.sum_over_shards(summed_gauss_newton_diagonal, draws, passes, generator)
        return diagonal / (passes * self.n_samples)


def summed_products(curvature, vectors, bar=None):
    """Rows ``sum_i C_i v`` over the samples of ``curvature``, for the rows ``v`` of ``vectors``."""
    # Contiguous, whatever the layout of ``vectors``: products are written into views of its rows.
    out = torch.empty(vectors.shape, dtype=vectors.dtype, device=vectors.device)
    return curvature._accumulate(lambda rows: vectors[rows], out)


def summed_dense(curvature, dtype, bar=None):
    """The explicit ``sum_i C_i`` over the samples of ``curvature``, accumulated in ``dtype``."""
    fmodel = curvature.fmodel
    n_params = curvature.n_params

    def identity_rows(rows):
        basis = torch.zeros(rows.stop - rows.start, n_params, dtype=fmodel.dtype, device=fmodel.device)
        basis[:, rows].fill_diagonal_(1.0)
        return basis

    matrix = torch.empty(n_params, n_params, dtype=dtype, device=fmodel.device)
    return curvature._accumulate(identity_rows, matrix, "curvature matrix")


def summed_gauss_newton_diagonal(curvature, draws, passes, generator, bar=None):
    """``sum_i sum_c w_ic (J_i^T u_ic)**2`` over ``passes`` passes (see :meth:`CurvatureOperator.gauss_newton_diagonal`)."""
    fmodel = curvature.fmodel
    diagonal = torch.zeros(curvature.n_params, dtype=fmodel.dtype, device=fmodel.device)
    with torch.no_grad():
        for _ in range(passes):
            for batch in batch_slices(curvature.n_samples, curvature.batch_size):
                x, y = curvature.data.batch(batch)
                output = fmodel.output(fmodel.params, x)
                for weight, cotangent in output_cotangents(fmodel.loss, output, y, "true", draws, generator):
                    gradients = pullback_batch(fmodel, x, cotangent)
                    diagonal += weight * (gradients * gradients).sum(dim=0)
    return diagonal


class ReportingCurvature:
    """A curvature operator whose products step a progress bar, one step per vector.

    Everything else is the wrapped operator's, so that code computing
    factors from it (eigen-solves, sketches, power iterations) reports its
    progress without knowing about bars.
    """

    def __init__(self, curvature, bar):
        self._wrapped = curvature
        self._bar = bar

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def matmat(self, vectors):
        """Rows ``C v``, as :meth:`CurvatureOperator.matmat`; the bar advances by ``len(vectors)``."""
        products = self._wrapped.matmat(vectors)
        self._bar.update(len(vectors))
        return products

    def with_second_order(self, second_order):
        return ReportingCurvature(self._wrapped.with_second_order(second_order), self._bar)
