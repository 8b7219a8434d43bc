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
- EK-FAC keeps the Kronecker eigenbasis ``Q_G (x) Q_A`` and refits the
  eigenvalues on the data: ``Lambda = mean_i sum_c (Q_G^T d_ic Q_A)**2``,
  the exact diagonal of the block in that basis (George et al. 2018).
- Every other trainable parameter (norm layers, embeddings, custom
  parameters, grouped or tied convolutions) gets the exact diagonal of its
  block, ``mean_i sum_c d_ic**2``, from the same pass.

Memory is that of a batch: activations, output gradients and the
per-sample ``d`` of one batch, never ``n_samples x n_params``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    kind : {"linear", "conv2d", "diagonal"}
        Kronecker block of a ``Linear`` or ``Conv2d``, or exact diagonal.
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
        text = {"linear": "Kronecker (Linear)", "conv2d": "Kronecker (Conv2d, KFC)", "diagonal": "diagonal"}[self.kind]
        return f"{text}: {', '.join(self.block.parameter_names)}" + (f" ({self.reason})" if self.reason else "")


def plan_layers(fmodel):
    """One :class:`LayerPlan` per module owning trainable parameters, in layout order."""
    plans = []
    for block in module_blocks(fmodel.module, fmodel.layout):
        kind, reason = _kronecker_kind(block)
        plans.append(LayerPlan(block.module_name, kind, block, reason))
    return plans


def _kronecker_kind(block):
    module = block.module
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
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
    return "linear", ""


# ---------------------------------------------------------- the hooked pass
class _Recorder:
    """Forward hooks on the Kronecker modules: their inputs and outputs in one forward pass."""

    def __init__(self, plans):
        self.plans = [plan for plan in plans if plan.is_kronecker]
        self.inputs = {plan.name: [] for plan in self.plans}
        self.outputs = {plan.name: [] for plan in self.plans}
        self.recording = True  # off after the forward pass: later calls (under vmap) are not recorded
        self._handles = []

    def __enter__(self):
        for plan in self.plans:
            def hook(module, args, output, name=plan.name):
                if self.recording:
                    self.inputs[name].append(args[0].detach())
                    self.outputs[name].append(output)
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
    return weight[0].numel() + int(plan.has_bias), weight.shape[0]


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

    def _batches(self):
        """Yield ``(recorder, cotangents, x)`` per batch: hooked inputs and outputs, and the output cotangents."""
        fmodel = self.fmodel
        leaves = {name: p.detach().requires_grad_(True) for name, p in fmodel.params.items()}
        for batch in batch_slices(len(self.data), self.batch_size):
            x, target = self.data.batch(batch)
            with torch.enable_grad(), _Recorder(self.plans) as recorder:
                output = fmodel.output(leaves, x)
                recorder.recording = False
                cotangents = output_cotangents(fmodel.loss, output, target, self.fisher, self.n_target_draws,
                                               self.generator)
                yield recorder, output, cotangents, x
            self.bar.update(len(x))

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

    def kronecker_factors(self):
        """``(factors, diagonal)``: ``{name: (A, G)}`` for Kronecker blocks, and the diagonal blocks' diagonal."""
        dtype, device = self.fmodel.dtype, self.fmodel.device
        sums = {}
        diagonal = None
        if self._diagonal_model is not None:
            diagonal = torch.zeros(self._diagonal_model.n_params, dtype=dtype, device=device)
        for recorder, output, cotangents, x in self._batches():
            for plan in recorder.plans:
                if not recorder.inputs[plan.name]:
                    continue  # a module the forward pass did not call: no curvature
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
                    diagonal += weight * (d * d).sum(dim=0)
        n = len(self.data)
        factors = {}
        for plan in self.plans:
            if plan.is_kronecker:
                A, G = sums.get(plan.name, (None, 0.0))
                n_in, n_out = _factor_sizes(plan)
                factors[plan.name] = (torch.zeros(n_in, n_in, dtype=dtype, device=device) if A is None else A.detach() / n,
                                      torch.zeros(n_out, n_out, dtype=dtype, device=device) if A is None
                                      else G.detach() / n)
        return factors, (None if diagonal is None else diagonal / n)

    def corrected_eigenvalues(self, bases):
        """``{name: Lambda}``: ``mean_i sum_c (Q_G^T d_ic Q_A)**2`` in each Kronecker block's eigenbasis."""
        corrected = {}

        def add(name, squares):
            corrected[name] = squares if name not in corrected else corrected[name] + squares

        for recorder, output, cotangents, _ in self._batches():
            # Rotate each factor first: sum_t (Q_G^T g_t)(Q_A^T a_t)^T is Q_G^T d Q_A.
            rotated_activations = {plan.name: _activations(plan, recorder.inputs[plan.name]) @ bases[plan.name][0]
                                   for plan in recorder.plans if recorder.inputs[plan.name]}
            # With one position (a Linear layer on (n, in) inputs) d_ic is the outer product g_ic a_i^T,
            # and sum_c (g_ic a_i^T)**2 = (sum_c g_ic**2) (a_i**2)^T: the squares of the rotated factors
            # are summed over the cotangents first, and one product per batch replaces n outer products.
            single_position = {name for name, a in rotated_activations.items() if a.shape[1] == 1}
            gradient_squares = {}
            for weight, cotangent in cotangents:
                gradients = self._output_gradients(recorder, output, cotangent)
                for plan in recorder.plans:
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
        n = len(self.data)
        return {plan.name: (corrected[plan.name].detach() / n if plan.name in corrected
                            else torch.zeros(tuple(reversed(_factor_sizes(plan))), dtype=self.fmodel.dtype,
                                             device=self.fmodel.device))
                for plan in self.plans if plan.is_kronecker}


def eigenbasis(matrix):
    """``(eigenvalues, eigenvectors)`` of a symmetric factor, in float64 for accuracy, cast back."""
    values, vectors = torch.linalg.eigh(matrix.double())
    return values.clamp_min(0).to(matrix.dtype), vectors.to(matrix.dtype)


def compute_ekfac_factors(fmodel, data, batch_size, fisher, n_target_draws, correct_eigenvalues, generator, bar):
    """The tensors EK-FAC (or K-FAC) needs, by name, from one or two passes over ``data``.

    Kronecker block ``k`` has ``"{k}.activation_eigenvectors"`` ``Q_A``,
    ``"{k}.gradient_eigenvectors"`` ``Q_G`` and ``"{k}.eigenvalues"`` (the
    corrected ones, or the products of the factors' eigenvalues); the
    diagonal blocks share ``"diagonal"``, in the order of their parameters.
    """
    plans = plan_layers(fmodel)
    statistics = LayerStatistics(fmodel, data, plans, batch_size, fisher, n_target_draws, generator, bar)
    factors, diagonal = statistics.kronecker_factors()
    tensors, bases = {}, {}
    for index, plan in enumerate(plans):
        if not plan.is_kronecker:
            continue
        A, G = factors[plan.name]
        activation_values, activation_vectors = eigenbasis(A)
        gradient_values, gradient_vectors = eigenbasis(G)
        bases[plan.name] = (activation_vectors, gradient_vectors)
        tensors[f"{index}.activation_eigenvectors"] = activation_vectors
        tensors[f"{index}.gradient_eigenvectors"] = gradient_vectors
        tensors[f"{index}.eigenvalues"] = torch.outer(gradient_values, activation_values)
    if correct_eigenvalues and bases:
        for name, values in statistics.corrected_eigenvalues(bases).items():
            index = next(i for i, plan in enumerate(plans) if plan.name == name)
            tensors[f"{index}.eigenvalues"] = values
    if diagonal is not None:
        tensors["diagonal"] = diagonal
    return tensors


_KRONECKER_SOLVE_ROWS = 16


class EkfacInverse:
    """``(C_block + lambda I)^-1`` applied block by block, from the tensors of :func:`compute_ekfac_factors`.

    Every block is diagonal in its basis (the Kronecker eigenbasis, or the
    parameters themselves), so the inverse is ``1 / (eigenvalue + lambda)``
    there. Values at the rounding level of their block (``eps`` times its
    largest value or ``lambda``, times the order of the larger Kronecker
    factor, whose eigendecomposition rounds at that level; with ``lambda =
    0``, directions without curvature: a dead unit, an unused layer) have
    no meaningful inverse:
    with ``singular="pseudo_inverse"`` their directions are left out (a
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
        diagonal_start = 0
        for index, plan in enumerate(plans):
            if plan.is_kronecker:
                values = tensors[f"{index}.eigenvalues"]
                order = max(values.shape)
            else:
                values = tensors["diagonal"][diagonal_start:diagonal_start + plan.block.size]
                diagonal_start += plan.block.size
                order = 1  # sums of squares: exact to their own rounding
            self._inverse_values[index] = self._inverted(values, order, singular)

    def _inverted(self, values, order, singular):
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
        out_features = block.module.weight.shape[0]
        weight_slice = block.slice_of("weight")
        weight = rows[:, weight_slice].reshape(len(rows), out_features, -1)
        matrix = weight if not plan.has_bias else torch.cat(
            [weight, rows[:, block.slice_of("bias")].unsqueeze(2)], dim=2)
        activation_vectors = self._tensors[f"{index}.activation_eigenvectors"]
        gradient_vectors = self._tensors[f"{index}.gradient_eigenvectors"]
        rotated = gradient_vectors.T @ matrix @ activation_vectors
        rotated = rotated * self._inverse_values[index]
        solved = gradient_vectors @ rotated @ activation_vectors.T
        result[:, weight_slice] = solved[:, :, :weight.shape[2]].reshape(len(rows), -1)
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
