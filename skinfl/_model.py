"""A trained model plus a loss, seen as functions of the model's parameters.

Everything else in skinfl differentiates through :class:`FunctionalModel`:
per-sample losses ``l(theta; x, y)`` and measurements ``m(theta; x)`` (used when
no target is given), evaluated with :func:`torch.func.functional_call` so that
``theta`` can be any tensor, including the batched tangents of ``vmap``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

BUILTIN_LOSSES = ("cross_entropy", "mse", "bce_with_logits")

# torch loss modules that behave like a built-in loss for target checks and
# for the y=None measurement; the module itself still computes the loss, so
# options such as class weights or label smoothing are honoured.
_MODULE_KINDS = {
    nn.CrossEntropyLoss: "cross_entropy",
    nn.MSELoss: "mse",
    nn.BCEWithLogitsLoss: "bce_with_logits",
}


def _mean_over_non_batch_dims(values):
    """Per-sample mean of element-wise losses, shape ``(n,)``.

    Averaging over the output dimensions makes the mean of these per-sample
    losses equal torch's ``reduction="mean"`` over the whole batch.
    """
    return values.reshape(values.shape[0], -1).mean(dim=1)


def _builtin_per_sample(kind, output, target):
    if kind == "cross_entropy":
        return F.cross_entropy(output, target, reduction="none")
    if kind == "mse":
        return _mean_over_non_batch_dims(F.mse_loss(output, target, reduction="none"))
    return _mean_over_non_batch_dims(
        F.binary_cross_entropy_with_logits(output, target, reduction="none")
    )


@dataclass
class LossSpec:
    """A resolved ``loss`` parameter.

    Attributes
    ----------
    kind : {"cross_entropy", "mse", "bce_with_logits", "custom"}
        What the loss measures; decides target checks and the measurement
        used when no target is given.
    function : callable or None
        The user's loss module or callable, or None for a built-in string.
    """

    kind: str
    function: object = None

    @classmethod
    def resolve(cls, loss):
        if isinstance(loss, str):
            return cls(kind=loss)
        for module_type, kind in _MODULE_KINDS.items():
            if type(loss) is module_type:
                return cls(kind=kind, function=loss)
        return cls(kind="custom", function=loss)

    @property
    def is_classification(self):
        return self.kind in ("cross_entropy", "bce_with_logits")

    def per_sample(self, output, target):
        """Loss of every sample in a batch, shape ``(n,)``."""
        if self.function is None:
            return _builtin_per_sample(self.kind, output, target)
        # A user loss returns one scalar for a batch; calling it on batches of
        # one sample (under vmap) gives per-sample losses whatever its
        # reduction is, so the training loss is always their mean.
        def one(out_i, target_i):
            return self.function(out_i.unsqueeze(0), target_i.unsqueeze(0)).reshape(())

        return vmap(one)(output, target)

    def measurement(self, output):
        """Per-sample quantity differentiated when no target is given.

        Classification: the loss at the model's own predicted label, i.e. the
        negative log-probability of the predicted class. Regression: the sum
        of the model's outputs (the output itself for one output).
        """
        if self.kind == "cross_entropy":
            predicted = output.argmax(dim=1).detach()
            return F.cross_entropy(output, predicted, reduction="none")
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
            copied(example)
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
        return functional_call(self.module, {**params, **self.fixed}, (x,))

    def per_sample_objective(self, params, x, target):
        """Per-sample losses, or measurements when ``target`` is None."""
        output = self.output(params, x)
        if target is None:
            return self.loss.measurement(output)
        return self.loss.per_sample(output, target)

    def sample_objective(self, params, x_i, target_i):
        """Objective of one sample given without its batch axis (for vmap)."""
        target = None if target_i is None else target_i.unsqueeze(0)
        return self.per_sample_objective(params, x_i.unsqueeze(0), target)[0]
