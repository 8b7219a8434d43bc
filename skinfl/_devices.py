"""Moving fitted state between devices: to the host for saving, back to a device that exists.

An estimator fitted on ``cuda:3`` must load on a machine with one GPU, or
none. Saved state is therefore kept on the CPU, with the device it came
from, and moved on load to that device if it exists here, else to the first
GPU, else to the CPU (:func:`available_device`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from ._data import DataSource


def available_device(saved):
    """The device to use here for state saved on ``saved`` (None stays None)."""
    if saved is None:
        return None
    device = torch.device(saved)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return torch.device("cuda", 0)
        return device
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return torch.device("cpu")
    return device


def first_device(value):
    """The device of the first tensor found in ``value``, or None."""
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, nn.Module):
        for tensor in [*value.parameters(), *value.buffers()]:
            if not isinstance(tensor, nn.parameter.UninitializedParameter):
                return tensor.device
        return None
    for item in _children(value):
        device = first_device(item)
        if device is not None:
            return device
    return None


def _children(value):
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, DataSource):
        return [value.X, value.y]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, field.name) for field in dataclasses.fields(value)]
    return []


def moved(value, device, copy_modules):
    """``value`` with every tensor and module in it on ``device``.

    Containers, dataclasses and data sources are rebuilt; modules are
    deep-copied first when ``copy_modules`` (so that saving never moves the
    estimator's own state) and moved in place otherwise (freshly loaded ones).
    A data source keeps numpy data where it is and only changes where its
    batches go.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to(device) if value.device != device else value
    if isinstance(value, nn.Module):
        if first_device(value) in (None, device):
            return value
        return (copy.deepcopy(value) if copy_modules else value).to(device)
    if isinstance(value, Mapping) and not isinstance(value, dict):  # fitted factors: a plain dict
        return {key: moved(item, device, copy_modules) for key, item in value.items()}
    if isinstance(value, dict):
        return type(value)((key, moved(item, device, copy_modules)) for key, item in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(moved(item, device, copy_modules) for item in value)
    if isinstance(value, torch.device):
        return device
    if isinstance(value, DataSource):
        source = copy.copy(value)
        # Data given as a tensor is brought to the host for saving and left there: batches are streamed.
        source.X = value.X.cpu() if isinstance(value.X, torch.Tensor) else value.X
        source.y = value.y.cpu() if isinstance(value.y, torch.Tensor) else value.y
        source.device = device
        source.targets = moved(value.targets, device, copy_modules)
        return source
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {field.name: moved(getattr(value, field.name), device, copy_modules)
                   for field in dataclasses.fields(value) if field.init}
        return dataclasses.replace(value, **changes)
    return value
