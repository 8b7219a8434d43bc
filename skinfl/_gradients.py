"""Per-sample gradients, streamed in batches, with torch.func (vmap over grad)."""

from __future__ import annotations

import numpy as np
import torch
from torch.func import grad, vjp, vmap

from ._batches import as_batch_of_one, n_rows, over_samples, take_rows
from ._progress import progress_bar


def batch_slices(n_samples, batch_size):
    """Consecutive slices of ``batch_size`` samples covering ``range(n_samples)``."""
    return [slice(start, min(start + batch_size, n_samples)) for start in range(0, n_samples, batch_size)]


def index_batches(rows, batch_size):
    """``rows`` (a slice or an integer array) cut into pieces of at most ``batch_size``.

    Yields ``(position, index)``: where the piece sits among ``rows`` (a
    slice) and the data rows it holds (a slice or an integer array).
    """
    if isinstance(rows, slice):
        start, stop = rows.start or 0, rows.stop
        for piece in batch_slices(stop - start, batch_size):
            yield piece, slice(start + piece.start, start + piece.stop)
        return
    rows = np.asarray(rows)
    for piece in batch_slices(len(rows), batch_size):
        yield piece, rows[piece]


# Per-sample gradients come from torch.func one tensor per parameter, and flattening them copies
# them: a batch whose flat gradients would exceed this many bytes is differentiated a piece at a
# time into the flat result, so that the copy costs a piece, not a second batch.
_GRADIENT_PIECE_BYTES = 8 * 2**20


def gradient_batch(fmodel, x, y, out=None):
    """Flat per-sample gradients of one batch, shape ``(len(x), n_params)``.

    ``y=None`` differentiates the model's measurement instead of the loss.
    ``out``, a tensor of that shape, receives them.
    """
    piece = max(1, _GRADIENT_PIECE_BYTES // (fmodel.n_params * fmodel.dtype.itemsize))
    n = n_rows(x)
    if out is None and n <= piece:
        return _flat_gradients(fmodel, x, y)
    if out is None:
        out = torch.empty(n, fmodel.n_params, dtype=fmodel.dtype, device=fmodel.device)
    for rows in batch_slices(n, piece):
        out[rows] = _flat_gradients(fmodel, take_rows(x, rows), None if y is None else y[rows])
    return out


def pullback_batch(fmodel, x, cotangents):
    """Flat per-sample ``J_i^T u_i``: the gradients of ``<output_i, u_i>``, shape ``(len(x), n_params)``."""

    def pseudo_loss(params, x_i, u_i):
        return (fmodel.output(params, as_batch_of_one(x_i))[0] * u_i).sum()

    with torch.no_grad():
        per_sample = over_samples(grad(pseudo_loss), fmodel.module, in_dims=(None, 0, 0))
        return fmodel.layout.flatten(per_sample(fmodel.params, x, cotangents))


def _flat_gradients(fmodel, x, y):
    if y is None:
        per_sample = over_samples(grad(lambda p, x_i: fmodel.sample_objective(p, x_i, None)), fmodel.module,
                                  in_dims=(None, 0))
        gradients = per_sample(fmodel.params, x)
    else:
        per_sample = over_samples(grad(fmodel.sample_objective), fmodel.module, in_dims=(None, 0, 0))
        gradients = per_sample(fmodel.params, x, y)
    return fmodel.layout.flatten(gradients)


def iter_gradients(fmodel, data, batch_size, rows=None, progress=False, desc="gradients"):
    """Yield ``(position, gradients)`` over ``rows`` of ``data`` (all rows by default).

    ``position`` is a slice into ``rows``; ``gradients`` has one row per
    sample of the piece. At most ``batch_size`` samples are read at a time.
    """
    for position, x, y in _read_batches(data, batch_size, rows, progress, desc):
        with torch.no_grad():
            yield position, gradient_batch(fmodel, x, y)


def _read_batches(data, batch_size, rows=None, progress=False, desc=""):
    """Yield ``(position, x, y)``: ``rows`` of ``data`` (all by default) read ``batch_size`` at a time."""
    rows = slice(0, len(data)) if rows is None else rows
    for position, index in progress_bar(list(index_batches(rows, batch_size)), progress, desc):
        yield (position, *data.batch(index))


def gradients_of(fmodel, data, batch_size, rows):
    """Gradients of ``rows`` of ``data`` as one ``(n_rows, n_params)`` tensor.

    Callers keep ``rows`` to a bounded number (a chunk), never a whole data set.
    """
    n_rows = (rows.stop - (rows.start or 0)) if isinstance(rows, slice) else len(rows)
    gradients = torch.empty(n_rows, fmodel.n_params, dtype=fmodel.dtype, device=fmodel.device)
    for position, x, y in _read_batches(data, batch_size, rows):
        with torch.no_grad():
            gradient_batch(fmodel, x, y, out=gradients[position])
    return gradients


def perturbation_batch(fmodel, inverse_gradients, x, y):
    """``<u_i, grad_x grad_theta l(x_j)>`` for every inverse-curvature gradient ``u_i`` and sample.

    Returns shape ``(len(inverse_gradients), len(x), *x.shape[1:])``. Per
    sample, the graph of ``x -> grad_theta l(x)`` is built once and pulled
    back along every ``u_i`` (reverse over reverse). Not the cheaper-looking
    input gradient of a directional derivative (reverse over forward): in
    torch 2.13, torch.func's reverse-over-forward derivatives through
    ``layer_norm`` are wrong (off by a factor of ten against finite
    differences; pytorch/pytorch#196700 reports its second-order forward
    derivative), and transformers are full of layer norms.
    """
    tangents = fmodel.layout.unflatten(inverse_gradients)

    def per_sample(x_j, target_j):
        def parameter_gradient(x_input):
            return grad(fmodel.sample_objective)(fmodel.params, x_input, target_j)

        _, pullback = vjp(parameter_gradient, x_j)
        return vmap(lambda tangent: pullback(tangent)[0])(tangents)

    in_dims = (0, None if y is None else 0)
    return vmap(per_sample, in_dims=in_dims)(x, y).transpose(0, 1)
