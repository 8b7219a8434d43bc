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

import torch
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap

from ._gradients import batch_slices
from ._progress import progress_bar

SECOND_ORDER_MODES = ("hessian", "gauss_newton")

# Floats that one batched product may hold in saved activations: the product
# of (vectors in a block) x (samples in a sub-batch) x (activations saved per
# sample). Around 2**25 (128 MB in float32) the work stays cache-friendly on a
# CPU yet gives matrix kernels enough to do; measured on MLPs and small CNNs.
_WORKING_SET_FLOATS = 2**25
# Vectors per block in a product; more per call amortises the pass over data.
_MAX_VECTOR_BLOCK = 128
_MIN_VECTOR_BLOCK = 32
# Upper bound on elements of a per-sample Jacobian block (diagonal estimate).
_MAX_JACOBIAN_ELEMENTS = 2**25


def _hessian_products(fmodel, x, y):
    """Products with the Hessian of the summed loss of one batch.

    Reverse-over-reverse: the gradient's graph is built once per batch and
    its pullback is applied to every block of vectors, so the forward and
    backward passes are not recomputed per block.
    """

    def batch_loss(params):
        return fmodel.per_sample_objective(params, x, y).sum()

    _, pullback = vjp(grad(batch_loss), fmodel.params)
    return vmap(lambda tangent: pullback(tangent)[0])


def _gauss_newton_products(fmodel, x, y):
    """Products with ``sum_i J_i^T H_i J_i`` of one batch (H_i: loss Hessian in outputs)."""

    def outputs(params):
        return fmodel.output(params, x)

    def loss_of_outputs(output):
        return fmodel.loss.per_sample(output, y).sum()

    output, pullback = vjp(outputs, fmodel.params)
    output_gradient = grad(loss_of_outputs)

    def products(tangents):
        jacobian_products = vmap(lambda t: jvp(outputs, (fmodel.params,), (t,))[1])(tangents)
        output_hessian_products = vmap(lambda u: jvp(output_gradient, (output,), (u,))[1])(
            jacobian_products
        )
        return vmap(pullback)(output_hessian_products)[0]

    return products


_BATCH_PRODUCTS = {"hessian": _hessian_products, "gauss_newton": _gauss_newton_products}


def saved_floats_per_sample(fmodel, X, y):
    """Elements autograd saves per sample of the loss: a measure of activations.

    Counted on two samples minus one sample, so that tensors saved once per
    batch (the weights) are not counted as per-sample memory.
    """

    def count(n):
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel()
            return tensor

        params = {name: p.detach().requires_grad_(True) for name, p in fmodel.params.items()}
        y_n = None if y is None else y[:n]
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fmodel.per_sample_objective(params, X[:n], y_n).sum()
        return total

    if len(X) < 2:
        return max(count(1), 1)
    return max(count(2) - count(1), 1)


class CurvatureOperator:
    """Hessian or Gauss-Newton products of the mean loss over ``(X, y)``.

    Parameters
    ----------
    fmodel : FunctionalModel
    X, y : torch.Tensor
        Inputs and validated targets, on the model's device.
    second_order : {"hessian", "gauss_newton"}
    batch_size : int
        Most samples per pass; passes are smaller when the activations saved
        per sample would exceed the working set (``_WORKING_SET_FLOATS``).
    progress : bool
        Show a progress bar over batches of ``dense``.
    """

    def __init__(self, fmodel, X, y, second_order, batch_size, progress=False):
        self.fmodel = fmodel
        self.X = X
        self.y = y
        self.second_order = second_order
        self.batch_size = batch_size
        self.progress = progress
        self._batch_products = _BATCH_PRODUCTS[second_order]
        self._saved_per_sample = None

    @property
    def n_params(self):
        return self.fmodel.n_params

    @property
    def n_samples(self):
        return len(self.X)

    def _blocking(self, n_vectors):
        """(vectors per block, samples per sub-batch) for ``n_vectors`` products."""
        if self._saved_per_sample is None:
            self._saved_per_sample = saved_floats_per_sample(self.fmodel, self.X, self.y)
        block = max(1, min(n_vectors, _MAX_VECTOR_BLOCK))
        sub_batch = _WORKING_SET_FLOATS // (block * self._saved_per_sample)
        if sub_batch < 16 and block > _MIN_VECTOR_BLOCK:
            block = max(1, min(n_vectors, _MIN_VECTOR_BLOCK))
            sub_batch = _WORKING_SET_FLOATS // (block * self._saved_per_sample)
        return block, int(min(max(sub_batch, 1), self.batch_size))

    def _accumulate(self, vector_rows, out, progress_desc=None):
        """Add the rows ``C_sum v`` (summed, not averaged, over samples) into ``out``.

        ``vector_rows(rows)`` gives the vectors of a slice of rows, so callers
        need not hold all vectors at once (``dense`` makes identity blocks).
        """
        layout = self.fmodel.layout
        block, sub_batch = self._blocking(len(out))
        vector_blocks = batch_slices(len(out), block)
        batches = batch_slices(self.n_samples, sub_batch)
        with torch.no_grad():
            for batch in progress_bar(batches, self.progress and progress_desc is not None, progress_desc):
                y = None if self.y is None else self.y[batch]
                products = self._batch_products(self.fmodel, self.X[batch], y)
                for rows in vector_blocks:
                    out[rows] += layout.flatten(products(layout.unflatten(vector_rows(rows))))
        return out

    def matmat(self, vectors):
        """Rows ``C v`` for the rows ``v`` of ``vectors`` (shape ``(k, n_params)``)."""
        return self._accumulate(lambda rows: vectors[rows], torch.zeros_like(vectors)) / self.n_samples

    def dense(self):
        """The explicit ``(n_params, n_params)`` curvature matrix, symmetrised."""
        fmodel = self.fmodel
        n_params = self.n_params

        def identity_rows(rows):
            basis = torch.zeros(rows.stop - rows.start, n_params, dtype=fmodel.dtype, device=fmodel.device)
            basis[:, rows].fill_diagonal_(1.0)
            return basis

        matrix = torch.zeros(n_params, n_params, dtype=fmodel.dtype, device=fmodel.device)
        self._accumulate(identity_rows, matrix, "curvature matrix")
        matrix /= self.n_samples
        # Reverse-over-reverse products are symmetric only up to rounding.
        return (matrix + matrix.T) / 2

    def gauss_newton_diagonal(self):
        """Exact diagonal of the Gauss-Newton matrix, shape ``(n_params,)``.

        ``diag(1/n sum_i J_i^T H_i J_i)`` with ``J_i`` the Jacobian of sample
        ``i``'s outputs and ``H_i`` the Hessian of its loss in the outputs.
        It is nonnegative for convex losses, so it is a safe preconditioner
        for the Hessian as well.
        """
        fmodel = self.fmodel

        def sample_outputs(params, x_i):
            return fmodel.output(params, x_i.unsqueeze(0))[0].reshape(-1)

        output_shape = fmodel.output(fmodel.params, self.X[:1]).shape[1:]

        def sample_loss_of_output(output_i, target_i):
            output_i = output_i.reshape(output_shape).unsqueeze(0)
            return fmodel.loss.per_sample(output_i, target_i.unsqueeze(0))[0]

        jacobians = vmap(jacrev(sample_outputs), in_dims=(None, 0))
        output_hessians = vmap(hessian(sample_loss_of_output))
        n_outputs = output_shape.numel()
        sub_batch = max(1, _MAX_JACOBIAN_ELEMENTS // (n_outputs * self.n_params))

        diagonal = torch.zeros(self.n_params, dtype=fmodel.dtype, device=fmodel.device)
        with torch.no_grad():
            for batch in batch_slices(self.n_samples, sub_batch):
                x, y = self.X[batch], self.y[batch]
                jacobian = fmodel.layout.flatten(jacobians(fmodel.params, x), n_leading=2)
                out = fmodel.output(fmodel.params, x)
                out_hessian = output_hessians(out.reshape(len(x), -1), y)
                weighted = torch.bmm(out_hessian.reshape(len(x), n_outputs, n_outputs), jacobian)
                diagonal += (weighted * jacobian).sum(dim=(0, 1))
        return diagonal / self.n_samples
