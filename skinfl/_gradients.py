"""Per-sample gradients, streamed in batches, with torch.func (vmap over grad)."""

from __future__ import annotations

import torch
from torch.func import grad, jvp, vmap

from ._progress import progress_bar


def batch_slices(n_samples, batch_size):
    """Consecutive slices of ``batch_size`` samples covering ``range(n_samples)``."""
    return [slice(start, min(start + batch_size, n_samples)) for start in range(0, n_samples, batch_size)]


def _target_batch(y, batch):
    return None if y is None else y[batch]


def gradient_batch(fmodel, x, y):
    """Flat per-sample gradients of one batch, shape ``(len(x), n_params)``.

    ``y=None`` differentiates the model's measurement instead of the loss.
    """
    if y is None:
        per_sample = vmap(grad(lambda p, x_i: fmodel.sample_objective(p, x_i, None)), in_dims=(None, 0))
        gradients = per_sample(fmodel.params, x)
    else:
        per_sample = vmap(grad(fmodel.sample_objective), in_dims=(None, 0, 0))
        gradients = per_sample(fmodel.params, x, y)
    return fmodel.layout.flatten(gradients)


def iter_gradients(fmodel, X, y, batch_size, progress=False, desc="gradients"):
    """Yield ``(batch_slice, gradients)`` over the samples of ``X``."""
    for batch in progress_bar(batch_slices(len(X), batch_size), progress, desc):
        with torch.no_grad():
            yield batch, gradient_batch(fmodel, X[batch], _target_batch(y, batch))


def all_gradients(fmodel, X, y, batch_size, progress=False):
    """All per-sample gradients of ``X`` as one ``(n, n_params)`` tensor."""
    gradients = torch.empty(len(X), fmodel.n_params, dtype=fmodel.dtype, device=fmodel.device)
    for batch, block in iter_gradients(fmodel, X, y, batch_size, progress):
        gradients[batch] = block
    return gradients


def perturbation_batch(fmodel, factors, x, y):
    """``<factor_i, grad_x grad_theta l(x_j)>`` for every factor and sample.

    Returns shape ``(len(factors), len(x), *x.shape[1:])``. The inner product
    with ``grad_theta`` is a directional derivative in parameter space
    (``jvp``), so only the input gradient of a scalar is taken per pair.
    """
    tangents = fmodel.layout.unflatten(factors)

    def directional(x_j, target_j, tangent):
        def objective(params):
            return fmodel.sample_objective(params, x_j, target_j)

        return jvp(objective, (fmodel.params,), (tangent,))[1]

    input_gradient = grad(directional, argnums=0)
    in_dims = (0, None if y is None else 0, None)
    over_samples = vmap(input_gradient, in_dims=in_dims)
    over_factors = vmap(over_samples, in_dims=(None, None, 0))
    return over_factors(x, y, tangents)
