"""Kronecker-factored curvature per layer (K-FAC, EK-FAC), from a pass over the data with module hooks.

The Gauss-Newton matrix (the Fisher, for the built-in losses) of the mean
training loss is ``C = 1/n sum_i sum_c d_ic d_ic^T``, with ``d_ic`` the
gradients with respect to the parameters of output *cotangents* ``u_ic``
(see :func:`skinfl._cotangents.output_cotangents`). It is approximated block-diagonally, one
block per module that owns trainable parameters:

- ``nn.Linear`` and ``nn.Conv2d`` get Kronecker blocks. For a weight ``W``
  of shape ``(out, in)`` (a convolution's kernel flattened to
  ``(out, in_channels * kh * kw)``, with the bias as an extra input column
  of ones), a cotangent gives ``d = sum_t g_t a_t^T`` over the positions
  ``t`` at which the layer is applied: the rows of a batched ``Linear``
  input, the output pixels of a convolution (its input patches, KFC, Grosse
  and Martens 2016), and every call of a module used more than once. With
  ``A = mean_i (1/T) sum_t a a^T`` and ``G = mean_i sum_c sum_t g g^T``
  the block is ``G (x) A`` (row-major ``W``): exact for one position and
  one sample, and under KFC's assumptions (spatially homogeneous,
  uncorrelated derivatives) otherwise.
- transformers' ``Conv1D`` (GPT-2's layers: a ``Linear`` whose weight is
  stored transposed, ``(in, out)``) gets the same block as a ``Linear``.
- ``nn.Embedding`` is a ``Linear`` on one-hot inputs, with the weight
  ``(n_embeddings, dim)`` as its transpose: its activation factor is
  diagonal, ``A = mean_i (1/T) sum_t e_{x_t} e_{x_t}^T`` (token counts; the
  padding index, which gets no gradient, left out), so ``Q_A = I`` and
  neither a one-hot vector nor a dense ``A`` is ever formed (K-FAC's
  diagonal input factor).
- A module whose output has one row for the whole batch (GPT-2's position
  embeddings, broadcast over the batch) has its output expanded to one row
  per sample during the pass, so that its output gradients are per sample.
- EK-FAC keeps the Kronecker eigenbasis ``Q_G (x) Q_A`` and refits the
  eigenvalues on the data: ``Lambda = mean_i sum_c (Q_G^T d_ic Q_A)**2``,
  the exact diagonal of the block in that basis (George et al. 2018).
- Every other trainable parameter (norm layers, custom parameters,
  grouped or tied convolutions, tied embeddings) gets the exact diagonal of its
  block, ``mean_i sum_c d_ic**2``, from the same pass.

Memory is that of a batch: activations, output gradients and the
per-sample ``d`` of one batch, never ``n_samples x n_params``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._batches import n_rows
from ._cotangents import output_cotangents
from ._gradients import batch_slices, pullback_batch
from ._layers import module_blocks
from ._model import FunctionalModel

FISHER_TYPES = ("true", "empirical")


@dataclass(frozen=True)
class LayerPlan:
    """How one block of parameters is approximated.

    Attributes
    ----------
    name : str
        The module's name (``""`` for the root module).
    kind : {"linear", "conv1d", "conv2d", "embedding", "diagonal"}
        Kronecker block of a ``Linear``, a transformers ``Conv1D``, a
        ``Conv2d`` or an ``Embedding``, or exact diagonal.
    block : ParameterBlock
        The parameters, and where they lie in the flat vector.
    reason : str
        Why a module with a Kronecker form got a diagonal block ("" otherwise).
    """

    name: str
    kind: str
    block: object
    reason: str = ""

    @property
    def is_kronecker(self):
        return self.kind != "diagonal"

    @property
    def has_bias(self):
        return "bias" in self.block.local_names

    def describe(self):
        """One line for ``layers_``-style documentation."""
        text = {"linear": "Kronecker (Linear)", "conv1d": "Kronecker (Conv1D, a transposed Linear)",
                "conv2d": "Kronecker (Conv2d, KFC)", "embedding": "Kronecker (Embedding, diagonal input factor)",
                "diagonal": "diagonal"}[self.kind]
        return f"{text}: {', '.join(self.block.parameter_names)}" + (f" ({self.reason})" if self.reason else "")


def plan_layers(fmodel):
    """One :class:`LayerPlan` per module owning trainable parameters, in layout order."""
    plans = []
    for block in module_blocks(fmodel.module, fmodel.layout):
        kind, reason = _kronecker_kind(block)
        plans.append(LayerPlan(block.module_name, kind, block, reason))
    return plans


def is_transposed_linear(module):
    """Whether ``module`` is transformers' ``Conv1D``: ``x @ weight + bias`` with ``weight`` of shape ``(in, out)``."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and getattr(module, "weight", None) is not None and module.weight.ndim == 2)


def _kronecker_kind(block):
    module = block.module
    if not (isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or is_transposed_linear(module)):
        return "diagonal", ""
    if "weight" not in block.local_names:
        return "diagonal", "its weight is frozen"
    if block.shared_with:
        return "diagonal", f"its parameters are shared with {list(block.shared_with)}"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return "diagonal", "grouped convolution"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "diagonal", "padding other than explicit zero padding"
        return "conv2d", ""
    if isinstance(module, nn.Embedding):
        if module.max_norm is not None or module.scale_grad_by_freq:
            return "diagonal", "max_norm or scale_grad_by_freq changes its gradients"
        return "embedding", ""
    if is_transposed_linear(module):
        return "conv1d", ""
    return "linear", ""


# ---------------------------------------------------------- the hooked pass
class _Recorder:
    """Forward hooks on the Kronecker modules: their inputs and outputs in one forward pass."""

    def __init__(self, plans, n_samples):
        self.n_samples = n_samples
        self.plans = [plan for plan in plans if plan.is_kronecker]
        self.inputs = {plan.name: [] for plan in self.plans}
        self.outputs = {plan.name: [] for plan in self.plans}
        self.recording = True  # off after the forward pass: later calls (under vmap) are not recorded
        self._handles = []

    def __enter__(self):
        for plan in self.plans:
            def hook(module, args, output, name=plan.name):
                if not self.recording:
                    return None
                inputs = args[0].detach()
                if output.shape[0] == 1 and self.n_samples > 1:
                    # One row for the whole batch, broadcast later (position embeddings): one row per sample,
                    # the same values, so that the gradients reaching it are per sample.
                    output = output.expand(self.n_samples, *output.shape[1:]).contiguous()
                    inputs = inputs.expand(self.n_samples, *inputs.shape[1:])
                self.inputs[name].append(inputs)
                self.outputs[name].append(output)
                return output
            self._handles.append(plan.block.module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()


def _activations(plan, inputs):
    """``a`` of shape ``(n, T, in)`` over every position and call of the layer (a column of ones for a bias)."""
    module = plan.block.module
    pieces = []
    for x in inputs:
        if plan.kind == "conv2d":
            if x.ndim != 4:
                raise ValueError(f"EK-FAC's Conv2d block {plan.name!r} needs batched 4-D inputs, got shape "
                                 f"{tuple(x.shape)}.")
            patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                               stride=module.stride)
            pieces.append(patches.transpose(1, 2))
        else:
            pieces.append(x.reshape(x.shape[0], -1, x.shape[-1]))
    a = torch.cat(pieces, dim=1)
    if plan.has_bias:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=2)
    return a


def _factor_sizes(plan):
    """``(in, out)``: the sizes of the activation factor (with the bias column) and of the gradient factor."""
    weight = plan.block.module.weight
    if plan.kind in ("conv1d", "embedding"):  # the weight is the transpose of a Linear's
        return weight.shape[0] + int(plan.has_bias), weight.shape[1]
    return weight[0].numel() + int(plan.has_bias), weight.shape[0]


def _token_ids(plan, inputs):
    """An embedding's inputs as ``(n, T)`` ids, and which of them count (not its padding index)."""
    ids = torch.cat([x.reshape(x.shape[0], -1) for x in inputs], dim=1)
    padding = plan.block.module.padding_idx
    return ids, (ids != padding) if padding is not None else torch.ones_like(ids, dtype=torch.bool)


def _embedding_activation_factor(plan, inputs, dtype):
    """The diagonal of ``sum_i (1/T) sum_t e_{x_t} e_{x_t}^T`` of one batch: token counts over positions."""
    ids, counted = _token_ids(plan, inputs)
    n_embeddings = plan.block.module.num_embeddings
    counts = torch.bincount(ids[counted], minlength=n_embeddings).to(dtype)
    return counts / ids.shape[1]


def _embedding_corrected_squares(plan, inputs, rotated_gradients):
    """``sum_i (Q_G^T d_i)**2`` as ``(dim, n_embeddings)`` for one batch, ``d_i = sum_t g_t e_{x_t}^T``.

    ``d_i`` has a column per distinct token of sample ``i``: the rotated
    output gradients are summed per (sample, token) pair, squared, and added
    to their token's column, never forming the ``(n, dim, n_embeddings)`` ``d``.
    """
    ids, counted = _token_ids(plan, inputs)
    n, positions = ids.shape
    n_embeddings = plan.block.module.num_embeddings
    samples = torch.arange(n, device=ids.device)[:, None].expand(n, positions)
    pairs = (samples * n_embeddings + ids)[counted]
    unique_pairs, which = torch.unique(pairs, return_inverse=True)
    dim = rotated_gradients.shape[-1]
    sums = torch.zeros(len(unique_pairs), dim, dtype=rotated_gradients.dtype, device=rotated_gradients.device)
    sums.index_add_(0, which, rotated_gradients.reshape(n, positions, dim)[counted])
    squares = torch.zeros(n_embeddings, dim, dtype=sums.dtype, device=sums.device)
    squares.index_add_(0, unique_pairs % n_embeddings, sums * sums)
    return squares.T


def _output_gradients_by_position(plan, output_gradients):
    """``g`` of shape ``(n, T, out)``, positions in the order of :func:`_activations`."""
    pieces = []
    for g in output_gradients:
        if plan.kind == "conv2d":
            pieces.append(g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2))
        else:
            pieces.append(g.reshape(g.shape[0], -1, g.shape[-1]))
    return torch.cat(pieces, dim=1)


class LayerStatistics:
    """Passes over the data that accumulate each block's statistics.

    Parameters
    ----------
    fmodel : FunctionalModel
    data : DataSource
        Training data with targets.
    plans : list of LayerPlan
    batch_size : int
    fisher : {"true", "empirical"}
    n_target_draws : int or None
        Draws per sample for ``fisher="true"``; None for the exact expectation.
    generator : torch.Generator
    bar : progress bar
        Stepped by the number of samples of each batch.
    """

    def __init__(self, fmodel, data, plans, batch_size, fisher, n_target_draws, generator, bar):
        self.fmodel, self.data, self.plans = fmodel, data, plans
        self.batch_size, self.fisher, self.n_target_draws = batch_size, fisher, n_target_draws
        self.generator, self.bar = generator, bar
        diagonal_names = [name for plan in plans if not plan.is_kronecker for name in plan.block.parameter_names]
        self._diagonal_model = (FunctionalModel(fmodel.module, fmodel.loss, diagonal_names)
                                if diagonal_names else None)

    def _for_each_batch(self, process):
        """Call ``process(recorder, output, cotangents, x)`` for each batch: hooked inputs and outputs, the
        model's output and the output cotangents, inside the batch's autograd graph.

        One batch's graph is alive at a time: ``process`` returns before the next batch's forward pass, and
        its references here are dropped first (a loop over a generator would keep the previous batch's
        graph alive through that pass, doubling the pass's memory).
        """
        fmodel = self.fmodel
        leaves = {name: p.detach().requires_grad_(True) for name, p in fmodel.params.items()}
        for batch in batch_slices(len(self.data), self.batch_size):
            x, target = self.data.batch(batch)
            with torch.enable_grad(), _Recorder(self.plans, n_rows(x)) as recorder:
                output = fmodel.output(leaves, x)
                recorder.recording = False
                cotangents = output_cotangents(fmodel.loss, output, target, self.fisher, self.n_target_draws,
                                               self.generator)
                process(recorder, output, cotangents, x)
            if self.bar is not None:
                self.bar.update(n_rows(x))
            del recorder, output, cotangents

    def _output_gradients(self, recorder, output, cotangent):
        """Gradients of ``<output, cotangent>`` with respect to each Kronecker module's outputs."""
        plans = recorder.plans
        flat_outputs = [out for plan in plans for out in recorder.outputs[plan.name]]
        if not flat_outputs:
            return {}
        grads = torch.autograd.grad(output, flat_outputs, grad_outputs=cotangent, retain_graph=True,
                                    allow_unused=True)
        result, start = {}, 0
        for plan in plans:
            count = len(recorder.outputs[plan.name])
            result[plan.name] = [torch.zeros_like(o) if g is None else g
                                 for g, o in zip(grads[start:start + count], recorder.outputs[plan.name])]
            start += count
        return result

    def _diagonal_gradients(self, x, cotangent):
        """Per-sample gradients of ``<output_i, u_i>`` for the diagonal blocks' parameters, flat."""
        return pullback_batch(self._diagonal_model, x, cotangent)

    def kronecker_sums(self):
        """``(sums, diagonal)``: ``{name: [A, G]}`` summed over samples for the Kronecker blocks the forward
        pass called, and the diagonal blocks' summed squared gradients (None without diagonal blocks)."""
        dtype, device = self.fmodel.dtype, self.fmodel.device
        sums = {}
        diagonal = None
        if self._diagonal_model is not None:
            diagonal = torch.zeros(self._diagonal_model.n_params, dtype=dtype, device=device)
        def add_batch(recorder, output, cotangents, x):
            for plan in recorder.plans:
                if not recorder.inputs[plan.name]:
                    continue  # a module the forward pass did not call: no curvature
                if plan.kind == "embedding":
                    A = _embedding_activation_factor(plan, recorder.inputs[plan.name], dtype)
                else:
                    a = _activations(plan, recorder.inputs[plan.name])
                    A = torch.einsum("nti,ntj->ij", a, a) / a.shape[1]
                sums[plan.name] = [A, 0.0] if plan.name not in sums else [sums[plan.name][0] + A, sums[plan.name][1]]
            for weight, cotangent in cotangents:
                gradients = self._output_gradients(recorder, output, cotangent)
                for plan in recorder.plans:
                    if plan.name not in sums:
                        continue
                    g = _output_gradients_by_position(plan, gradients[plan.name])
                    sums[plan.name][1] = sums[plan.name][1] + weight * torch.einsum("nto,ntp->op", g, g)
                if diagonal is not None:
                    d = self._diagonal_gradients(x, cotangent)
                    diagonal.add_(weight * (d * d).sum(dim=0))

        self._for_each_batch(add_batch)
        return {name: [_detached(total) for total in pair] for name, pair in sums.items()}, diagonal

    def corrected_sums(self, bases):
        """``{name: Lambda}``: ``sum_i sum_c (Q_G^T d_ic Q_A)**2`` in the eigenbasis of each Kronecker block
        the forward pass called."""
        corrected = {}

        def add(name, squares):
            corrected[name] = squares if name not in corrected else corrected[name] + squares

        def add_batch(recorder, output, cotangents, _):
            # Rotate each factor first: sum_t (Q_G^T g_t)(Q_A^T a_t)^T is Q_G^T d Q_A.
            rotated_activations = {plan.name: _activations(plan, recorder.inputs[plan.name]) @ bases[plan.name][0]
                                   for plan in recorder.plans
                                   if recorder.inputs[plan.name] and plan.kind != "embedding"}
            embeddings = {plan.name for plan in recorder.plans
                          if recorder.inputs[plan.name] and plan.kind == "embedding"}
            # With one position (a Linear layer on (n, in) inputs) d_ic is the outer product g_ic a_i^T,
            # and sum_c (g_ic a_i^T)**2 = (sum_c g_ic**2) (a_i**2)^T: the squares of the rotated factors
            # are summed over the cotangents first, and one product per batch replaces n outer products.
            single_position = {name for name, a in rotated_activations.items() if a.shape[1] == 1}
            gradient_squares = {}
            for weight, cotangent in cotangents:
                gradients = self._output_gradients(recorder, output, cotangent)
                for plan in recorder.plans:
                    if plan.name in embeddings:
                        g = _output_gradients_by_position(plan, gradients[plan.name]) @ bases[plan.name][1]
                        add(plan.name, weight * _embedding_corrected_squares(plan, recorder.inputs[plan.name], g))
                        continue
                    if plan.name not in rotated_activations:
                        continue
                    g = _output_gradients_by_position(plan, gradients[plan.name]) @ bases[plan.name][1]
                    if plan.name in single_position:
                        squares = weight * g[:, 0] * g[:, 0]
                        gradient_squares[plan.name] = squares + gradient_squares.get(plan.name, 0.0)
                        continue
                    rotated = torch.einsum("nto,nti->noi", g, rotated_activations[plan.name])
                    add(plan.name, weight * (rotated * rotated).sum(dim=0))
            for name, squares in gradient_squares.items():
                activation = rotated_activations[name][:, 0]
                add(name, squares.T @ (activation * activation))

        self._for_each_batch(add_batch)
        return {name: total.detach() for name, total in corrected.items()}


def _detached(total):
    return total.detach() if isinstance(total, torch.Tensor) else total


def eigenbasis(matrix):
    """``(eigenvalues, eigenvectors)`` of a symmetric factor, in float64 for accuracy, cast back."""
    values, vectors = torch.linalg.eigh(matrix.double())
    return values.clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)


def kronecker_sums(curvature, fisher, n_target_draws, generator, bar=None):
    """EK-FAC's first pass over the data of ``curvature``: see :meth:`LayerStatistics.kronecker_sums`."""
    fmodel = curvature.fmodel
    return LayerStatistics(fmodel, curvature.data, plan_layers(fmodel), curvature.batch_size, fisher,
                           n_target_draws, generator, bar).kronecker_sums()


def corrected_sums(curvature, bases, fisher, n_target_draws, generator, bar=None):
    """EK-FAC's second pass over the data of ``curvature``: see :meth:`LayerStatistics.corrected_sums`."""
    fmodel = curvature.fmodel
    return LayerStatistics(fmodel, curvature.data, plan_layers(fmodel), curvature.batch_size, fisher,
                           n_target_draws, generator, bar).corrected_sums(bases)


def compute_ekfac_factors(curvature, fisher, n_target_draws, correct_eigenvalues, generator, bar=None):
    """The tensors EK-FAC (or K-FAC) needs, by name, from one or two passes over ``curvature``'s data.

    Each pass is a sum over samples taken through
    :meth:`~skinfl._curvature.CurvatureOperator.sum_over_shards`, so that a
    sharded operator computes it where the shards are; the eigenbases are
    computed here, between the passes. Kronecker block ``k`` has
    ``"{k}.activation_eigenvectors"`` ``Q_A``,
    ``"{k}.gradient_eigenvectors"`` ``Q_G`` and ``"{k}.eigenvalues"`` (the
    corrected ones, or the products of the factors' eigenvalues); the
    diagonal blocks share ``"diagonal"``, in the order of their parameters.
    """
    fmodel = curvature.fmodel
    dtype, device, n = fmodel.dtype, fmodel.device, curvature.n_samples
    plans = plan_layers(fmodel)
    sums, diagonal = curvature.sum_over_shards(kronecker_sums, fisher, n_target_draws, generator, bar=bar)
    tensors, bases = {}, {}
    for index, plan in enumerate(plans):
        if not plan.is_kronecker:
            continue
        n_in, n_out = _factor_sizes(plan)
        if plan.name in sums:
            A, G = (total / n for total in sums[plan.name])
        else:  # a module the forward pass never called: no curvature
            A = torch.zeros((n_in,) if plan.kind == "embedding" else (n_in, n_in), dtype=dtype, device=device)
            G = torch.zeros(n_out, n_out, dtype=dtype, device=device)
        gradient_values, gradient_vectors = eigenbasis(G)
        if plan.kind == "embedding":  # a diagonal activation factor: its eigenbasis is the identity
            activation_values, activation_vectors = A, None
        else:
            activation_values, activation_vectors = eigenbasis(A)
            tensors[f"{index}.activation_eigenvectors"] = activation_vectors
        bases[plan.name] = (activation_vectors, gradient_vectors)
        tensors[f"{index}.gradient_eigenvectors"] = gradient_vectors
        tensors[f"{index}.eigenvalues"] = torch.outer(gradient_values, activation_values)
    if correct_eigenvalues and bases:
        corrected = curvature.sum_over_shards(corrected_sums, bases, fisher, n_target_draws, generator, bar=bar)
        for index, plan in enumerate(plans):
            if plan.is_kronecker:
                tensors[f"{index}.eigenvalues"] = (
                    corrected[plan.name] / n if plan.name in corrected
                    else torch.zeros(tuple(reversed(_factor_sizes(plan))), dtype=dtype, device=device))
    if diagonal is not None:
        tensors["diagonal"] = diagonal / n
    return tensors


_KRONECKER_SOLVE_ROWS = 16


class EkfacInverse:
    """``(C_block + lambda I)^-1`` applied block by block, from the tensors of :func:`compute_ekfac_factors`.

    Every block is diagonal in its basis (the Kronecker eigenbasis, or the
    parameters themselves), so the inverse is ``1 / (eigenvalue + lambda)``
    there. The eigenvalues are never negative (sums of squares, or products
    of clamped factor eigenvalues), so with ``lambda > 0`` every direction is
    inverted, by at most ``1 / lambda``. With ``lambda = 0``, values at the
    rounding level of their block (``eps`` times its largest value, times the
    order of the larger Kronecker factor, whose eigendecomposition rounds at
    that level: directions without curvature, a dead unit, an unused layer,
    a token never seen) have no meaningful inverse: with
    ``singular="pseudo_inverse"`` their directions are left out (a
    pseudo-inverse, as the low-rank estimators do), with ``"clamp"`` they
    are divided by that rounding level instead (a positive definite
    preconditioner). ``n_singular`` and ``n_values`` count them.
    """

    def __init__(self, plans, tensors, regularization, singular="pseudo_inverse"):
        self.plans = plans
        self.regularization = float(regularization)
        self._tensors = tensors
        self.n_singular = self.n_values = 0
        self.smallest = float("inf")
        self._inverse_values = {}
        # The factors' sizes, read from the modules now: a module's weight is another call's tensor while a
        # call runs it (functional_call), possibly in another thread.
        self._factor_sizes = {}
        diagonal_start = 0
        for index, plan in enumerate(plans):
            if plan.is_kronecker:
                self._factor_sizes[index] = _factor_sizes(plan)
                values = tensors[f"{index}.eigenvalues"]
                order = max(values.shape)
            else:
                values = tensors["diagonal"][diagonal_start:diagonal_start + plan.block.size]
                diagonal_start += plan.block.size
                order = 1  # sums of squares: exact to their own rounding
            self._inverse_values[index] = self._inverted(values, order, singular)

    def _inverted(self, values, order, singular):
        if self.regularization > 0:
            # Eigenvalues are sums of squares (corrected) or products of a factor's clamped eigenvalues: never
            # negative, so with lambda > 0 every direction has a bounded inverse, 1 / lambda at most. One at the
            # rounding level is off by that level, not by its sign: dropping it would be far worse.
            self.n_values += values.numel()
            shifted = values.clamp_min(0) + self.regularization
            self.smallest = min(self.smallest, float(shifted.min()) if values.numel() else self.smallest)
            return 1.0 / shifted
        shifted = values + self.regularization
        scale = max(float(values.abs().max()) if values.numel() else 0.0, self.regularization)
        floor = order * torch.finfo(values.dtype).eps * scale
        at_rounding = shifted <= floor
        self.n_singular += int(at_rounding.sum())
        self.n_values += values.numel()
        self.smallest = min(self.smallest, float(shifted.min()) if values.numel() else self.smallest)
        if singular == "clamp":
            return 1.0 / shifted.clamp_min(max(floor, torch.finfo(values.dtype).tiny))
        return torch.where(at_rounding, torch.zeros_like(shifted), 1.0 / torch.where(at_rounding, 1.0, shifted))

    def _kronecker_solve_into(self, result, index, plan, rows):
        block = plan.block
        transposed = plan.kind in ("conv1d", "embedding")  # weight (in, out): a Linear's transpose
        n_in, n_out = self._factor_sizes[index]
        weight_slice = block.slice_of("weight")
        if transposed:
            weight = rows[:, weight_slice].reshape(len(rows), n_in - int(plan.has_bias), n_out).transpose(1, 2)
        else:
            weight = rows[:, weight_slice].reshape(len(rows), n_out, -1)
        matrix = weight if not plan.has_bias else torch.cat(
            [weight, rows[:, block.slice_of("bias")].unsqueeze(2)], dim=2)
        activation_vectors = self._tensors.get(f"{index}.activation_eigenvectors")  # None: the identity
        gradient_vectors = self._tensors[f"{index}.gradient_eigenvectors"]
        rotated = gradient_vectors.T @ matrix
        if activation_vectors is not None:
            rotated = rotated @ activation_vectors
        rotated = rotated * self._inverse_values[index]
        solved = gradient_vectors @ rotated
        if activation_vectors is not None:
            solved = solved @ activation_vectors.T
        solved_weight = solved[:, :, :weight.shape[2]]
        if transposed:
            solved_weight = solved_weight.transpose(1, 2)
        result[:, weight_slice] = solved_weight.reshape(len(rows), -1)
        if plan.has_bias:
            result[:, block.slice_of("bias")] = solved[:, :, -1]

    def apply(self, rows):
        """Rows ``(C_EKFAC + lambda I)^-1 r``, shape ``(k, n_params)``."""
        result = torch.empty_like(rows)
        for index, plan in enumerate(self.plans):
            span = plan.block.span
            if plan.is_kronecker:
                # A few rows at a time: each Kronecker solve makes several temporaries of the block's size
                # per row, which for all rows at once would dwarf the rows themselves.
                for chunk in batch_slices(len(rows), _KRONECKER_SOLVE_ROWS):
                    self._kronecker_solve_into(result[chunk], index, plan, rows[chunk])
            else:
                result[:, span] = rows[:, span] * self._inverse_values[index]
        return result
