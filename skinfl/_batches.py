"""Model inputs of one batch: a tensor, or a dict of tensors sharing the first axis.

A model with several inputs (a transformer's ``input_ids`` and
``attention_mask``, say) takes them as keyword arguments, skorch's
convention: ``model(**batch)``. Everything that cuts, counts or calls a
batch goes through these functions, so that the rest of skinfl does not
care which kind it holds. ``torch.func.vmap`` maps over every tensor of a
dict along axis 0 by itself.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import torch
from torch.func import vmap


def is_mapping(inputs):
    """Whether ``inputs`` are keyword inputs (a dict of arrays or tensors)."""
    return isinstance(inputs, Mapping)


def n_rows(inputs):
    """Samples in a batch."""
    if is_mapping(inputs):
        return len(next(iter(inputs.values())))
    return len(inputs)


def take_rows(inputs, rows):
    """Rows ``rows`` (a slice, an index tensor, or one integer: a sample without its batch axis) of every input."""
    if is_mapping(inputs):
        return {key: value[rows] for key, value in inputs.items()}
    return inputs[rows]


def as_batch_of_one(sample):
    """One sample's inputs, given without their batch axis (under ``vmap``), as a batch of one."""
    if is_mapping(sample):
        return {key: value.unsqueeze(0) for key, value in sample.items()}
    return sample.unsqueeze(0)


def call_module(call, inputs):
    """``call(inputs)`` for a tensor, ``call(**inputs)`` for keyword inputs."""
    if is_mapping(inputs):
        return call(**inputs)
    return call(inputs)


def describe(inputs):
    """Shapes and dtypes of a batch, for error messages."""
    if is_mapping(inputs):
        return "{" + ", ".join(f"{key!r}: {tuple(v.shape)} {v.dtype}" for key, v in inputs.items()) + "}"
    return f"shape {tuple(inputs.shape)} ({inputs.dtype})"


# Models whose forward pass inspects the values of its inputs (transformers check whether an attention mask
# masks anything before building it) cannot be vmapped over samples; they are looped over instead, and the
# first failure is remembered per module so that it is paid once.
_LOOPED_MODULES = weakref.WeakSet()
_DATA_DEPENDENT = ("data-dependent control flow", "calling .item() on a Tensor")


def over_samples(function, module, in_dims):
    """``vmap(function, in_dims)``, or the same result from a loop over samples where vmap cannot run.

    ``module`` is the model the function evaluates. The loop computes each
    sample alone (a batch of one, as under vmap) and stacks the results: the
    same numbers, more slowly.
    """
    mapped = vmap(function, in_dims=in_dims)

    def looped(*args):
        mapped_args = [arg for arg, dim in zip(args, in_dims) if dim is not None]
        n = n_rows(mapped_args[0])
        results = []
        for i in range(n):
            results.append(function(*[arg if dim is None else take_rows(arg, i) for arg, dim in zip(args, in_dims)]))
        return torch.utils._pytree.tree_map(lambda *pieces: torch.stack(pieces), *results)

    def run(*args):
        if module in _LOOPED_MODULES:
            return looped(*args)
        try:
            return mapped(*args)
        except RuntimeError as error:
            if not any(text in str(error) for text in _DATA_DEPENDENT):
                raise
            _LOOPED_MODULES.add(module)
            return looped(*args)

    return run

