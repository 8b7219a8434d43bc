"""Fitted skorch nets: their module, the loss their ``get_loss`` computes, their optimizer's weight decay.

skorch is optional: a net is recognised by its classes' module names,
without importing skorch, and skorch is imported only to tell its classes
apart once a net is given.
"""

from __future__ import annotations

import torch

from ._model import LossSpec
from ._warnings import warn


def is_skorch_net(model):
    return any(cls.__module__.split(".")[0] == "skorch" and cls.__name__ == "NeuralNet"
               for cls in type(model).__mro__)


def import_skorch():
    try:
        import skorch
    except ImportError as error:  # pragma: no cover - a net cannot exist without skorch
        raise ImportError("Using a skorch net as the model needs skorch: pip install 'skinfl[skorch]'.") from error
    return skorch


def module_and_loss(net):
    """``(module, loss)``: the net's fitted module and a LossSpec computing exactly its ``get_loss``.

    ``NeuralNetClassifier`` with ``NLLLoss`` (skorch's default) trains on
    ``NLLLoss(log(p + eps))`` of the probabilities its module outputs; any
    other net calls its criterion on the module's output.
    """
    skorch = import_skorch()
    if not getattr(net, "initialized_", False):
        raise ValueError(f"This {type(net).__name__} is not initialized; fit it before computing influences.")
    criterion = net.criterion_
    loss = LossSpec.resolve(criterion)
    if isinstance(net, skorch.NeuralNetClassifier) and type(criterion) is torch.nn.NLLLoss:
        loss = LossSpec("nll", criterion, takes_probabilities=True)
    return net.module_, loss


def weight_decay(net):
    """The weight decay of the net's optimizer, as skinfl's ``regularization``.

    ``weight_decay`` adds ``weight_decay * theta`` to the gradient of the
    mean batch loss: the gradient of ``weight_decay / 2 * ||theta||**2``,
    which is skinfl's convention. Parameter groups without weight decay
    (biases, often) still get it in skinfl; groups with different non-zero
    values cannot be expressed by one number.
    """
    optimizer = getattr(net, "optimizer_", None)
    if optimizer is None:
        raise ValueError(f"regularization='auto' reads the weight decay of the net's optimizer, and this "
                         f"{type(net).__name__} has none (optimizer_); pass regularization as a number.")
    decays = sorted({float(group.get("weight_decay", 0.0)) for group in optimizer.param_groups} - {0.0})
    if len(decays) > 1:
        raise ValueError(f"regularization='auto' found weight decays {decays} in different parameter groups of "
                         "the net's optimizer; one regularization cannot express them. Pass regularization as a "
                         "number.")
    decoupled = isinstance(optimizer, torch.optim.AdamW) or any(
        group.get("decoupled_weight_decay", False) for group in optimizer.param_groups)
    if decays and decoupled:
        warn(f"The net's optimizer ({type(optimizer).__name__}) decouples its weight decay from the loss, so it is "
             "not an L2 penalty of the training objective; regularization_ takes weight_decay as an "
             "approximation of it.", UserWarning)
    return decays[0] if decays else 0.0


def undecayed_parameters(net):
    """Names of the module's parameters in optimizer groups without weight decay."""
    names = {id(parameter): name for name, parameter in net.module_.named_parameters()}
    return tuple(names[id(parameter)] for group in net.optimizer_.param_groups if not group.get("weight_decay", 0.0)
                 for parameter in group["params"] if id(parameter) in names)
