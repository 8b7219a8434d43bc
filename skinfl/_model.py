"""A trained model plus a loss, seen as functions of the model's parameters.

Everything else in skinfl differentiates through :class:`FunctionalModel`:
per-sample losses ``l(theta; x, y)`` and measurements ``m(theta; x)`` (used when
no target is given), evaluated with :func:`torch.func.functional_call` so that
``theta`` can be any tensor, including the batched tangents of ``vmap``.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ._batches import as_batch_of_one, call_module, is_mapping

BUILTIN_LOSSES = ("cross_entropy", "mse", "bce_with_logits", "causal_lm")
# Targets skipped by cross-entropy unless the loss module sets another: torch's and transformers' padding label.
DEFAULT_IGNORE_INDEX = -100

# torch loss modules computed here from their options (class weights, label
# smoothing, positive weights), so that their per-sample losses and their
# batch mean are exactly torch's. A subclass may change forward, so only the
# classes themselves are recognised; anything else is a custom loss.
_MODULE_KINDS = {
    nn.CrossEntropyLoss: "cross_entropy",
    nn.MSELoss: "mse",
    nn.BCEWithLogitsLoss: "bce_with_logits",
    nn.NLLLoss: "nll",
}


def _mean_over_non_batch_dims(values):
    """Per-sample mean of element-wise losses, shape ``(n,)``.

    Averaging over the output dimensions makes the mean of these per-sample
    losses equal torch's ``reduction="mean"`` over the whole batch.
    """
    return values.reshape(values.shape[0], -1).mean(dim=1)


@dataclass
class LossSpec:
    """A resolved ``loss`` parameter.

    The training loss is always the mean of per-sample losses
    ``l_i / normalizer``. For every loss but a class-weighted cross-entropy
    the normalizer is 1. torch's ``CrossEntropyLoss(weight=w)`` averages
    ``w[y_i] * l_i`` with the weights' sum, ``sum_i w[y_i] l_i / sum_i
    w[y_i]``; with ``normalizer`` the mean class weight of the fitted data,
    the mean of ``w[y_i] l_i / normalizer`` is exactly that, and removing
    point ``i`` still changes the training loss by its per-sample term over
    ``n``. ``fitted`` sets it.

    Attributes
    ----------
    kind : {"cross_entropy", "mse", "bce_with_logits", "nll", "custom"}
        What the loss measures; decides target checks and the measurement
        used when no target is given. ``"nll"`` is torch's ``NLLLoss`` on
        log-probabilities output by the model.
    function : callable or None
        The user's loss module or callable, or None for a built-in string.
    normalizer : float
        Divides every per-sample loss (see above).
    takes_probabilities : bool
        With ``"nll"``: the model outputs probabilities ``p``, and the loss is
        ``NLLLoss`` on ``log(p + eps)``, ``eps`` the machine epsilon of the
        output's dtype, as skorch's ``NeuralNetClassifier`` computes it.
    sequence : bool
        Cross-entropy over positions: outputs ``(n, *positions, n_classes)``
        (classes on the last axis, as language models give them), targets
        ``(n, *positions)``. A sample's loss is the **sum** of its positions'
        losses; targets equal to ``ignore_index`` (-100) count for nothing.
    shift : int
        With ``sequence``: outputs at position ``t`` predict the target at
        ``t + shift`` (1 for a causal language model, 0 otherwise).
    """

    kind: str
    function: object = None
    normalizer: float = 1.0
    takes_probabilities: bool = False
    sequence: bool = False
    shift: int = 0

    @classmethod
    def resolve(cls, loss, device=None):
        """The spec of a ``loss`` parameter; a loss module is copied to ``device``."""
        if isinstance(loss, LossSpec):
            return loss
        if isinstance(loss, str):
            if loss == "causal_lm":
                return cls(kind="cross_entropy", sequence=True, shift=1)
            return cls(kind=loss)
        if isinstance(loss, nn.Module) and device is not None:
            loss = copy.deepcopy(loss).to(device)
        for module_type, kind in _MODULE_KINDS.items():
            if type(loss) is module_type:
                return cls(kind=kind, function=loss)
        return cls(kind="custom", function=loss)

    @property
    def name(self):
        """The loss as its ``loss`` parameter names it: ``"causal_lm"``, ``"cross_entropy"``, ..."""
        return "causal_lm" if self.shift else self.kind

    def replace(self, **changes):
        """A copy with ``changes``."""
        return LossSpec(**{**self.__dict__, **changes})

    def for_outputs(self, output_shape):
        """This spec for a model whose samples have outputs of ``output_shape``.

        Cross-entropy on outputs with more than one axis per sample is taken
        over positions (``sequence``), classes on the last axis.
        """
        if self.kind == "cross_entropy" and len(output_shape) >= 2 and not self.sequence:
            return self.replace(sequence=True)
        if self.sequence and (self.kind != "cross_entropy" or len(output_shape) < 2 or
                              (self.shift and len(output_shape) != 2)):
            raise ValueError(
                f"loss={self.name!r} needs outputs of shape (n, sequence_length, n_classes) per batch "
                f"(logits at every position); the model outputs per-sample shape {tuple(output_shape)}."
            )
        return self

    @property
    def ignore_index(self):
        return self._option("ignore_index", DEFAULT_IGNORE_INDEX)

    def positions(self, output, target=None):
        """``(outputs, targets)`` of the predicted positions: ``(n, P, n_classes)`` and ``(n, P)``.

        With ``shift``, outputs at ``t`` are paired with targets at ``t + shift``.
        """
        n, n_classes = output.shape[0], output.shape[-1]
        output = output.reshape(n, -1, n_classes)
        if target is not None:
            target = target.reshape(n, -1)
        if self.shift:
            output = output[:, :-self.shift]
            target = None if target is None else target[:, self.shift:]
        return output, target

    def scatter_positions(self, values, output):
        """Values ``(..., n, P, n_classes)`` per predicted position back into the shape of ``output``
        (zeros at the positions that predict nothing)."""
        n, n_classes = output.shape[0], output.shape[-1]
        leading = values.shape[:-3]
        full = values.new_zeros(*leading, n, output[0].numel() // n_classes, n_classes)
        full[..., :values.shape[-2], :] = values
        return full.reshape(*leading, *output.shape)

    def position_loss(self):
        """The loss of one position: the same options, on ``(m, n_classes)`` outputs and ``(m,)`` targets."""
        return self.replace(sequence=False, shift=0)

    @property
    def is_classification(self):
        return self.kind in ("cross_entropy", "bce_with_logits", "nll")

    @property
    def takes_class_indices(self):
        return self.kind in ("cross_entropy", "nll")

    @property
    def is_module(self):
        """A recognised torch loss module, computed from its options."""
        return self.kind != "custom" and self.function is not None

    def _option(self, name, default=None):
        return getattr(self.function, name, default) if self.is_module else default

    def sample_weights(self, target):
        """Per-sample weights ``w[y_i]`` of the weighted mean, or None when unweighted.

        Sequence losses are sums over positions, never weighted means: None.
        """
        if not self.takes_class_indices or self.sequence:
            return None
        weight = self._option("weight")
        ignore_index = self._option("ignore_index", -100)
        if weight is None and not (0 <= ignore_index):
            return None
        weights = torch.ones(len(target), dtype=torch.float64) if weight is None else weight.double().cpu()[target.cpu()]
        return weights * (target.cpu() != ignore_index)

    def fitted(self, target_chunks):
        """This spec with ``normalizer`` the mean class weight over the fitted targets."""
        total, count = 0.0, 0
        for target in target_chunks:
            weights = self.sample_weights(target)
            if weights is None:
                return self
            total += float(weights.sum())
            count += len(target)
        if total <= 0:
            raise ValueError(
                "Every training sample has zero weight under the loss's class weights (or ignore_index); "
                "the training loss is undefined."
            )
        return self.replace(normalizer=total / count)

    def log_probabilities(self, output):
        """The model's output as log-probabilities, for ``"nll"``."""
        if self.takes_probabilities:
            return torch.log(output + torch.finfo(output.dtype).eps)
        return output

    def _cross_entropy_options(self):
        return dict(weight=self._option("weight"), ignore_index=self.ignore_index,
                    label_smoothing=self._option("label_smoothing", 0.0))

    def _summed_over_positions(self, output, target):
        """Each sample's cross-entropy summed over its predicted positions, shape ``(n,)``."""
        output, target = self.positions(output, target)
        n, n_positions, n_classes = output.shape
        if n_positions == 0:
            return output.sum(dim=(1, 2)) * 0
        losses = F.cross_entropy(output.reshape(-1, n_classes), target.reshape(-1), reduction="none",
                                 **self._cross_entropy_options())
        return losses.reshape(n, n_positions).sum(dim=1)

    def _unnormalized(self, output, target):
        if self.sequence:
            return self._summed_over_positions(output, target)
        if self.kind == "cross_entropy":
            return F.cross_entropy(
                output, target, reduction="none", weight=self._option("weight"),
                ignore_index=self._option("ignore_index", -100),
                label_smoothing=self._option("label_smoothing", 0.0),
            )
        if self.kind == "nll":
            return F.nll_loss(
                self.log_probabilities(output), target, reduction="none", weight=self._option("weight"),
                ignore_index=self._option("ignore_index", -100),
            )
        if self.kind == "mse":
            return _mean_over_non_batch_dims(F.mse_loss(output, target, reduction="none"))
        if self.kind == "bce_with_logits":
            return _mean_over_non_batch_dims(F.binary_cross_entropy_with_logits(
                output, target, reduction="none", weight=self._option("weight"),
                pos_weight=self._option("pos_weight"),
            ))

        # A user loss returns one scalar for a batch; calling it on batches of
        # one sample (under vmap) gives per-sample losses whatever its
        # reduction is, so the training loss is always their mean.
        def one(out_i, target_i):
            return self.function(out_i.unsqueeze(0), target_i.unsqueeze(0)).reshape(())

        return vmap(one)(output, target)

    def per_sample(self, output, target):
        """Loss of every sample in a batch, shape ``(n,)``."""
        values = self._unnormalized(output, target)
        return values if self.normalizer == 1.0 else values / self.normalizer

    def measurement(self, output):
        """Per-sample quantity differentiated when no target is given.

        Classification: the loss at the model's own predicted label, i.e. the
        negative log-probability of the predicted class. Regression: the sum
        of the model's outputs (the output itself for one output).
        """
        if self.sequence:
            predicted = output.argmax(dim=-1).detach()
            if self.shift:  # the positions' own predictions, where they predict a next token
                predicted = torch.cat([predicted[:, :self.shift], predicted[:, :-self.shift]], dim=1)
            return self.replace(function=None)._summed_over_positions(output, predicted)
        if self.kind == "cross_entropy":
            predicted = output.argmax(dim=1).detach()
            return F.cross_entropy(output, predicted, reduction="none")
        if self.kind == "nll":
            predicted = output.argmax(dim=1).detach()
            return F.nll_loss(self.log_probabilities(output), predicted, reduction="none")
        if self.kind == "bce_with_logits":
            predicted = (output > 0).to(output.dtype).detach()
            return _mean_over_non_batch_dims(
                F.binary_cross_entropy_with_logits(output, predicted, reduction="none")
            )
        if self.kind == "mse":
            return output.reshape(output.shape[0], -1).sum(dim=1)
        raise ValueError(
            "y=None asks for the gradient of the model's prediction measurement, "
            "which is defined for loss='cross_entropy', 'bce_with_logits' and "
            "'mse' (or their torch.nn modules), not for a custom loss callable. "
            "Pass the targets y explicitly."
        )


class ParameterLayout:
    """Maps a dict of named parameter tensors to one flat vector and back.

    Leading (batch) dimensions are preserved: a dict of ``(k, *shape)``
    tensors flattens to ``(k, n_params)``.
    """

    def __init__(self, named_tensors):
        self.names = list(named_tensors)
        self.shapes = [tuple(t.shape) for t in named_tensors.values()]
        self.sizes = [t.numel() for t in named_tensors.values()]
        self.n_params = sum(self.sizes)

    def flatten(self, tensors, n_leading=1):
        return torch.cat(
            [tensors[name].reshape(*tensors[name].shape[:n_leading], -1) for name in self.names],
            dim=n_leading,
        )

    def unflatten(self, flat):
        leading = flat.shape[:-1]
        pieces = torch.split(flat, self.sizes, dim=-1)
        return {
            name: piece.reshape(*leading, *shape)
            for name, piece, shape in zip(self.names, pieces, self.shapes)
        }


# Modules whose output depends on train/eval mode.
_MODE_DEPENDENT = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase)


def mode_dependent_modules_in_training(model):
    """Names of dropout / batch-norm modules that are in training mode."""
    return [name for name, m in model.named_modules() if isinstance(m, _MODE_DEPENDENT) and m.training]


def has_lazy_parameters(model):
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())


def evaluation_copy(model, device, example=None):
    """A deep copy of ``model`` in eval mode on ``device``, without gradients.

    Influence functions describe the trained model as a deterministic function,
    so dropout is off and batch norm uses its running statistics, whatever
    mode the user's model is in; the user's model is never changed. Lazy
    modules (``torch.nn.LazyLinear``, ...) are materialised on ``example``.
    """
    copied = copy.deepcopy(model).eval().to(device)
    if example is not None and has_lazy_parameters(copied):
        with torch.no_grad():
            call_module(copied, example)
    for parameter in copied.parameters():
        parameter.requires_grad_(False)
    return copied


class FunctionalModel:
    """A model in eval mode and a loss, as functions of the trainable parameters.

    Parameters
    ----------
    module : torch.nn.Module
        The evaluation copy (see :func:`evaluation_copy`).
    loss : LossSpec
        The resolved loss.
    trainable : list of str
        Names of the parameters influence is taken with respect to (those that
        required gradients in the user's model).
    """

    def __init__(self, module, loss, trainable):
        self.module = module
        self.loss = loss
        named = dict(module.named_parameters())
        self.params = {name: named[name] for name in trainable}
        self.fixed = {name: p for name, p in named.items() if name not in self.params}
        self.fixed.update(dict(module.named_buffers()))
        self.layout = ParameterLayout(self.params)

    @property
    def n_params(self):
        return self.layout.n_params

    @property
    def dtype(self):
        return next(iter(self.params.values())).dtype

    @property
    def device(self):
        return next(iter(self.params.values())).device

    def output(self, params, x):
        """The model's output on inputs ``x`` (a tensor, or a dict of keyword inputs); see :func:`output_tensor`."""
        if is_mapping(x):
            return output_tensor(functional_call(self.module, {**params, **self.fixed}, (), dict(x)))
        return output_tensor(functional_call(self.module, {**params, **self.fixed}, (x,)))

    def per_sample_objective(self, params, x, target):
        """Per-sample losses, or measurements when ``target`` is None."""
        output = self.output(params, x)
        if target is None:
            return self.loss.measurement(output)
        return self.loss.per_sample(output, target)

    def sample_objective(self, params, x_i, target_i):
        """Objective of one sample given without its batch axis (for vmap)."""
        target = None if target_i is None else target_i.unsqueeze(0)
        return self.per_sample_objective(params, as_batch_of_one(x_i), target)[0]


def output_tensor(output):
    """The tensor skinfl differentiates: the output itself, or the ``logits`` of a mapping output (a
    transformers ``ModelOutput``, a dict). Anything else is returned as it is, and refused by the caller."""
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    return output


def select_parameters(module, patterns):
    """Names of the parameters influence is taken over, in ``named_parameters`` order.

    ``patterns=None``: every parameter that requires gradients. Otherwise
    the parameters whose names match any ``fnmatch`` pattern of
    ``patterns``, whether they require gradients or not (the user chose
    them); a pattern that matches nothing is an error.
    """
    named = list(module.named_parameters())
    if patterns is None:
        selected = [name for name, p in named if p.requires_grad]
        if not selected:
            raise ValueError(
                "The model has no trainable parameters (none has requires_grad=True); influence is taken "
                "with respect to trainable parameters, or to those chosen with parameters=[...]."
            )
        return selected
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [name for name, _ in named]
    unmatched = [pattern for pattern in patterns if not fnmatch.filter(names, pattern)]
    if unmatched:
        examples = ", ".join(repr(name) for name in names[:6]) + (", ..." if len(names) > 6 else "")
        raise ValueError(
            f"parameters={list(patterns)!r}: the pattern(s) {unmatched} match no parameter of the model. "
            f"Its parameters are named like {examples} ({len(names)} in all; see model.named_parameters())."
        )
    return [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
