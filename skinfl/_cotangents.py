"""Output cotangents whose outer products give the Gauss-Newton matrix, exactly or in expectation.

The Gauss-Newton matrix of the mean training loss is ``1/n sum_i J_i^T H_i J_i``
with ``J_i`` the Jacobian of sample ``i``'s output and ``H_i`` the Hessian of
its loss in that output. Kronecker factors (EK-FAC) and the Jacobi
preconditioner's diagonal never form ``H_i``: they take gradients ``J_i^T u``
of a few output cotangents ``u`` per sample, with ``sum_c u_c u_c^T = H_i``
exactly (the columns of a square root of ``H_i``) or in expectation (a
target drawn from the model's predictive distribution, the true Fisher's
sample).

A drawn target alone has that expectation only for an unweighted
likelihood. torch's losses weight a sample's curvature by its class weight,
its positive weight, label smoothing or an ignored target, all of which
depend on the sample's *given* target, not on the drawn one; so a drawn
cotangent is the gradient of the plain likelihood at the drawn target,
rescaled by the given target's curvature weight.
"""

from __future__ import annotations

import math

import torch
from torch.func import grad, hessian, jvp, vmap

from ._threads import FORWARD_AD

# n_target_draws="auto" takes the exact expectation up to this many output values per sample (one backward
# pass each: a classifier with a few classes), and one drawn target per sample above.
EXACT_EXPECTATION_MAX_OUTPUTS = 16


def resolve_target_draws(n_target_draws, output_shape, loss):
    """``n_target_draws``, with ``"auto"`` resolved: None (exact) or 1.

    The exact expectation for at most ``EXACT_EXPECTATION_MAX_OUTPUTS``
    output values per sample, and always for ``NLLLoss``, whose output
    Hessian has rank at most one (one cotangent, in closed form).
    """
    if n_target_draws != "auto":
        return n_target_draws
    if loss.kind == "nll" or math.prod(output_shape) <= EXACT_EXPECTATION_MAX_OUTPUTS:
        return None
    return 1


def output_cotangents(loss, output, target, fisher, n_target_draws, generator):
    """``[(weight, u)]``: output cotangents whose weighted sum of ``J^T u u^T J`` is the curvature.

    - ``fisher="empirical"``: the loss gradient at the given targets.
    - ``fisher="true"`` with ``n_target_draws`` draws: :func:`sampled_cotangents`,
      each with weight ``1 / n_target_draws``.
    - ``fisher="true"`` with ``n_target_draws=None``: the columns of a square
      root ``L`` of each sample's output Hessian, ``L L^T = H_i``: the
      Gauss-Newton matrix exactly (the true Fisher, for the built-in losses),
      one cotangent per output value.
    """
    output = output.detach()
    if fisher == "empirical":
        return [(1.0, _loss_gradient(loss, output, target))]
    if loss.sequence:
        return _position_cotangents(loss, output, target, n_target_draws, generator)
    if n_target_draws is not None:
        return [(1.0 / n_target_draws, sampled_cotangents(loss, output, target, generator))
                for _ in range(n_target_draws)]
    roots = output_hessian_roots(loss, output, target)  # (n, d, d)
    return [(1.0, roots[:, :, column].reshape(output.shape)) for column in range(roots.shape[2])]


def _position_cotangents(loss, output, target, n_target_draws, generator):
    """:func:`output_cotangents` of a loss summed over positions (tokens).

    Its output Hessian is block-diagonal, one block per predicted position:
    drawn targets are drawn independently at every position (independent
    zero-mean draws have no cross terms in expectation), and the exact roots
    are one cotangent per position and class, nonzero at that position only.
    """
    position_loss = loss.position_loss()
    logits, targets = loss.positions(output, target)
    n, n_positions, n_classes = logits.shape
    flat_logits, flat_targets = logits.reshape(-1, n_classes), targets.reshape(-1)
    if n_target_draws is not None:
        return [(1.0 / n_target_draws,
                 loss.scatter_positions(sampled_cotangents(position_loss, flat_logits, flat_targets, generator)
                                        .reshape(logits.shape), output))
                for _ in range(n_target_draws)]
    roots = output_hessian_roots(position_loss, flat_logits, flat_targets).reshape(n, n_positions, n_classes, -1)

    def columns():
        for position in range(n_positions):
            for column in range(roots.shape[-1]):
                at_position = torch.zeros_like(logits)
                at_position[:, position] = roots[:, position, :, column]
                yield 1.0, loss.scatter_positions(at_position, output)

    return columns()


def _loss_gradient(loss, output, target):
    output = output.detach().requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(loss.per_sample(output, target).sum(), output)[0]


# ------------------------------------------------------------ curvature weights
def cross_entropy_curvature_scale(loss, output, target):
    """``c_i`` with ``c_i (diag(p_i) - p_i p_i^T)`` the Hessian of sample ``i``'s cross-entropy in its logits.

    Every cross-entropy torch computes (class weights, label smoothing,
    ignored targets, the normalizer) is ``sum_k a_ik * -log softmax(o_i)_k``
    with ``a_ik >= 0`` set by the given target. Its Hessian in ``o_i`` is
    ``(sum_k a_ik) (diag(p_i) - p_i p_i^T)``, and at ``o_i = 0`` the loss is
    ``(sum_k a_ik) log K``: one loss evaluation gives every ``c_i``.
    """
    return loss.per_sample(torch.zeros_like(output), target) / math.log(output.shape[1])


def elementwise_curvature(loss, output, target):
    """The diagonal Hessian of an element-wise loss (squared error, binary cross-entropy) in the outputs."""
    output_gradient = grad(lambda o: loss.per_sample(o, target).sum())
    with FORWARD_AD:
        return jvp(output_gradient, (output,), (torch.ones_like(output),))[1]


def _is_softmax_cross_entropy(loss, output, target):
    return loss.kind == "cross_entropy" and output.ndim == 2 and output.shape[1] > 1 and target.ndim == 1


# ---------------------------------------------------------------- drawn targets
def sampled_cotangents(loss, output, target, generator):
    """One cotangent ``u_i`` per sample with ``E[u_i u_i^T] = H_i`` over the draw.

    - Cross-entropy: a class ``k ~ softmax(o_i)``, ``u_i = sqrt(c_i) (p_i - e_k)``
      (the log-likelihood gradient, covariance ``diag(p_i) - p_i p_i^T``),
      ``c_i`` from :func:`cross_entropy_curvature_scale`.
    - Binary cross-entropy: a label ``t ~ Bernoulli(sigmoid(o))`` per element,
      standardised, ``u = sqrt(h) (sigmoid(o) - t) / sqrt(sigmoid(o)(1 - sigmoid(o)))``
      with ``h`` the exact diagonal Hessian (positive and element weights
      included).
    - Squared error: ``u = sqrt(h) z``, ``z ~ N(0, 1)`` (the Gaussian likelihood's
      standardised gradient).

    Raises ``ValueError`` for ``NLLLoss`` and custom losses: their output
    Hessian is not the covariance of a likelihood gradient at drawn targets.
    """
    output = output.detach()
    if _is_softmax_cross_entropy(loss, output, target):
        probabilities = torch.softmax(output, dim=1)
        drawn = _draw_classes(probabilities, generator)
        gradient = probabilities - torch.nn.functional.one_hot(drawn, output.shape[1]).to(output.dtype)
        return gradient * cross_entropy_curvature_scale(loss, output, target).clamp_min(0).sqrt()[:, None]
    if loss.kind == "bce_with_logits":
        probabilities = torch.sigmoid(output)
        drawn = torch.bernoulli(probabilities, generator=generator)
        spread = (probabilities * (1 - probabilities)).sqrt()
        standardised = torch.where(spread > 0, (probabilities - drawn) / torch.where(spread > 0, spread, 1.0), 0.0)
        return standardised * elementwise_curvature(loss, output, target).clamp_min(0).sqrt()
    if loss.kind == "mse":
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)
        return noise * elementwise_curvature(loss, output, target).clamp_min(0).sqrt()
    if loss.kind == "nll":
        raise ValueError(
            "Drawn targets need a loss whose curvature in the outputs is the covariance of the "
            "log-likelihood gradient at targets drawn from the model; NLLLoss on the model's "
            "(log-)probabilities is not one. Use n_target_draws=None (or 'auto'): the exact expectation, "
            "which for NLLLoss costs one cotangent per sample."
        )
    raise ValueError(
        "Drawing targets from the model's predictive distribution needs a known likelihood: "
        "loss='cross_entropy', 'bce_with_logits' or 'mse' (or their torch.nn modules), not a custom "
        "loss callable."
    )


def _draw_classes(probabilities, generator):
    """One class per row of ``probabilities``, by inverting the cumulative distribution at a uniform draw.

    The same distribution as ``torch.multinomial``, which on the CPU spends most of its time drawing one
    exponential variable per class: for a language model's vocabulary at every position, a tenth of
    EK-FAC's fit.
    """
    cumulative = probabilities.cumsum(dim=1)
    uniform = torch.rand(len(probabilities), 1, generator=generator, dtype=probabilities.dtype,
                         device=probabilities.device)
    drawn = torch.searchsorted(cumulative, uniform * cumulative[:, -1:]).squeeze(1)
    return drawn.clamp_max(probabilities.shape[1] - 1)


# ---------------------------------------------------------------- exact roots
def output_hessian_roots(loss, output, target):
    """``L_i`` with ``L_i L_i^T`` the Hessian of sample ``i``'s loss in its (flattened) output, ``(n, d, r)``."""
    if _is_softmax_cross_entropy(loss, output, target):
        return _cross_entropy_hessian_roots(loss, output, target)
    if loss.kind == "nll" and output.ndim == 2 and target.ndim == 1:
        return _nll_hessian_roots(loss, output, target)
    n = output.shape[0]
    flat = output.reshape(n, -1)

    def sample_loss(out_i, target_i):
        return loss.per_sample(out_i.reshape(1, *output.shape[1:]), target_i.unsqueeze(0))[0]

    with FORWARD_AD:  # hessian is forward-over-reverse
        hessians = vmap(hessian(sample_loss))(flat, target)
    values, vectors = torch.linalg.eigh(hessians)
    # Convex losses have positive semi-definite output Hessians; rounding can leave tiny negatives.
    return vectors * values.clamp_min(0).sqrt().unsqueeze(1)


def _cross_entropy_hessian_roots(loss, output, target):
    """The roots for cross-entropy on logits with class-index targets, in closed form.

    ``L = diag(sqrt(p)) - p sqrt(p)^T`` has ``L L^T = diag(p) - p p^T``
    because ``sum(p) = 1``, scaled by ``sqrt(c_i)``
    (:func:`cross_entropy_curvature_scale`): no per-sample Hessian and
    eigensolve.
    """
    p = torch.softmax(output, dim=1)
    sqrt_p = p.sqrt()
    roots = torch.diag_embed(sqrt_p) - p.unsqueeze(2) * sqrt_p.unsqueeze(1)
    return roots * cross_entropy_curvature_scale(loss, output, target).clamp_min(0).sqrt()[:, None, None]


def _nll_hessian_roots(loss, output, target):
    """``NLLLoss``'s roots: one column, in closed form.

    The loss is ``c_i * -log q_i[y_i]`` with ``q_i`` the model's output as
    log-probabilities: linear in a log-probability output (Hessian 0), and
    ``c_i * -log(p + eps)`` in a probability output, whose Hessian is
    ``c_i / (p[y_i] + eps)**2`` at ``(y_i, y_i)`` and 0 elsewhere.
    """
    roots = torch.zeros(*output.shape, 1, dtype=output.dtype, device=output.device)
    if not loss.takes_probabilities:
        return roots
    weights = loss.sample_weights(target)
    weights = (torch.ones(len(target), dtype=torch.float64) if weights is None else weights) / loss.normalizer
    classes = target.clamp(0, output.shape[1] - 1)  # an ignored target has weight 0
    picked = output.gather(1, classes[:, None])[:, 0] + torch.finfo(output.dtype).eps
    values = weights.to(dtype=output.dtype, device=output.device).sqrt() / picked
    roots[torch.arange(len(target), device=output.device), classes, 0] = values
    return roots
