"""The ``model`` parameter resolved: a torch module, its training loss, its penalty, its label encoding.

Three kinds of model are accepted: a trained ``torch.nn.Module`` (with the
loss given by ``loss``), a fitted skorch net (its module, the loss its
``get_loss`` computes, its optimizer's weight decay) and a fitted
scikit-learn model of a supported type (converted to an equivalent module,
see :mod:`skinfl._sklearn_models`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from torch import nn

from . import _sklearn_models, _skorch_nets
from ._model import LossSpec

DEFAULT_TORCH_LOSS = "cross_entropy"


@dataclass
class ModelSource:
    """What skinfl differentiates, taken from the ``model`` parameter.

    Attributes
    ----------
    module : torch.nn.Module
        The module (the user's own for a torch model: it is copied later).
    loss : LossSpec
        The training loss.
    penalty : callable or None
        ``penalty(n_samples)``: the model's own L2 penalty as
        ``regularization``, for ``regularization="auto"``; None when the
        model does not say (a torch module).
    classes : numpy.ndarray or None
        Labels that targets are given in, encoded to their index (scikit-learn
        classifiers); None when targets are given as the loss takes them.
    predicts_in_eval_mode : bool
        The model's own predictions use eval mode whatever mode its module
        was left in (skorch), so a module left in training mode is expected.
    unpenalized : callable
        ``unpenalized()``: names of the module's parameters that the model's
        penalty leaves out (scikit-learn's intercepts, a skorch parameter
        group without weight decay).
    """

    module: nn.Module
    loss: LossSpec
    penalty: object = None
    classes: np.ndarray | None = None
    predicts_in_eval_mode: bool = False
    unpenalized: object = tuple

    def regularization(self, regularization, n_samples):
        """``regularization`` with ``"auto"`` resolved to the model's penalty for ``n_samples`` points."""
        if not (isinstance(regularization, str) and regularization == "auto"):
            return float(regularization)
        if self.penalty is None:
            raise ValueError(
                "regularization='auto' takes the penalty of a scikit-learn model or the weight decay of a "
                "skorch net's optimizer; a torch.nn.Module does not record how it was trained. Pass "
                "regularization as a number: the weight decay it was trained with, for example."
            )
        return float(self.penalty(n_samples))


def model_source(model, loss):
    """The :class:`ModelSource` of a ``model`` parameter and a ``loss`` parameter."""
    if isinstance(model, nn.Module):
        return ModelSource(model, LossSpec.resolve(torch_module_loss(model) if _is_auto(loss) else loss))
    if _skorch_nets.is_skorch_net(model):
        module, net_loss = _skorch_nets.module_and_loss(model)
        resolved = net_loss if _is_auto(loss) else LossSpec.resolve(loss)
        return ModelSource(module, resolved, lambda n_samples: _skorch_nets.weight_decay(model),
                           predicts_in_eval_mode=True, unpenalized=lambda: _skorch_nets.undecayed_parameters(model))
    if _sklearn_models.is_sklearn_model(model):
        conversion = _sklearn_models.convert(model)
        resolved = LossSpec.resolve(conversion.loss if _is_auto(loss) else loss)
        if resolved.kind != conversion.loss:
            raise ValueError(
                f"{type(model).__name__} was trained with loss '{conversion.loss}', and loss={loss!r} is not "
                f"that loss; use loss='auto' (the default) or loss='{conversion.loss}'."
            )
        return ModelSource(conversion.module, resolved, conversion.penalty, conversion.classes,
                           unpenalized=lambda: conversion.unpenalized)
    raise TypeError(
        f"model must be a trained torch.nn.Module, a fitted skorch net, or a fitted scikit-learn model "
        f"({', '.join(_sklearn_models.SUPPORTED)}); got {type(model).__name__}."
    )


# transformers' task heads, by the end of the class name, and the loss each is trained with.
_TASK_SUFFIXES = (
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
    ("ForSequenceClassification", "sequence_classification"),
    ("ForTokenClassification", "cross_entropy"),
)


def torch_module_loss(module):
    """The loss ``"auto"`` means for a torch module: from a transformers (or peft) model's class and
    config, ``"cross_entropy"`` for any other module."""
    base = getattr(module, "get_base_model", None)  # a peft model: its task is its base model's
    if callable(base) and not type(module).__name__.endswith(tuple(suffix for suffix, _ in _TASK_SUFFIXES)):
        module = base()
    name = type(module).__name__
    for suffix, loss in _TASK_SUFFIXES:
        if not name.endswith(suffix):
            continue
        if loss != "sequence_classification":
            return loss
        config = getattr(module, "config", None)
        problem_type = getattr(config, "problem_type", None)
        if problem_type == "regression" or (problem_type is None and getattr(config, "num_labels", 2) == 1):
            return "mse"
        if problem_type == "multi_label_classification":
            return "bce_with_logits"
        return "cross_entropy"
    return DEFAULT_TORCH_LOSS


def _is_auto(loss):
    return isinstance(loss, str) and loss == "auto"


def loss_on_device(loss, device):
    """``loss`` with its loss module copied to ``device`` (its class weights must live with the outputs)."""
    if not isinstance(loss.function, nn.Module):
        return loss
    return loss.replace(function=copy.deepcopy(loss.function).to(device))
