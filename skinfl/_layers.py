"""Which module owns which trainable parameter: blocks of the flat parameter vector.

Block-diagonal approximations of the curvature (DataInf's harmonic mean,
Kronecker factors) treat the parameters of one module, say the weight and
bias of a ``Linear``, as one block, and ignore the curvature between blocks.
A :class:`ParameterBlock` names the module, holds the module object (for
estimators that hook into it), its trainable parameters and where each lies
in the flat vector of :class:`~skinfl._model.ParameterLayout`.

A parameter belongs to the module through which ``named_parameters``
reaches it: ``"encoder.0.weight"`` belongs to ``"encoder.0"``, a parameter
registered on the root module to ``""``. A tensor shared by several modules
(tied weights) appears once in the layout, under its first name, and so
belongs to one block; ``shared_with`` names the other modules that use it,
for estimators whose statistics assume one module per parameter. Frozen
parameters (``requires_grad=False``) are not in the layout and in no block.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ParameterBlock:
    """Trainable parameters of one module, contiguous in the flat parameter vector.

    Attributes
    ----------
    module_name : str
        Name of the module in the model (``""`` for the root module).
    module : torch.nn.Module
        The module itself, a submodule of the model the block was built from.
    parameter_names : tuple of str
        Full names of the parameters, as in the layout (``"0.weight"``).
    local_names : tuple of str
        The same parameters named relative to ``module`` (``"weight"``).
    slices : tuple of slice
        Where each parameter lies in the flat parameter vector.
    shared_with : tuple of str
        Other modules that hold one of these parameter tensors (tied weights).
    """

    module_name: str
    module: nn.Module = field(repr=False, compare=False)
    parameter_names: tuple
    local_names: tuple
    slices: tuple
    shared_with: tuple = ()

    @property
    def span(self):
        """The block's slice of the flat parameter vector."""
        return slice(self.slices[0].start, self.slices[-1].stop)

    @property
    def size(self):
        """Number of scalar parameters in the block."""
        return self.span.stop - self.span.start

    def slice_of(self, local_name):
        """Slice of the flat vector holding parameter ``local_name`` (``"weight"``, ``"bias"``)."""
        return self.slices[self.local_names.index(local_name)]

    def split(self):
        """One block per parameter tensor, in layout order."""
        return [
            ParameterBlock(self.module_name, self.module, (name,), (local,), (piece,), self.shared_with)
            for name, local, piece in zip(self.parameter_names, self.local_names, self.slices)
        ]


def _owner_and_local_name(parameter_name):
    owner, _, local = parameter_name.rpartition(".")
    return owner, local


def _parameter_slices(layout):
    slices, start = {}, 0
    for name, size in zip(layout.names, layout.sizes):
        slices[name] = slice(start, start + size)
        start += size
    return slices


def _holders_by_tensor(model):
    """Names of every module that directly registers each parameter tensor (aliases included)."""
    holders = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None:
                holders.setdefault(id(parameter), []).append(module_name)
    return holders


def module_blocks(model, layout):
    """One block per module that owns trainable parameters, in layout order.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose parameters ``layout`` flattens (names as in its
        ``named_parameters``).
    layout : ParameterLayout
        The flat layout of the trainable parameters.

    Returns
    -------
    blocks : list of ParameterBlock
        Their spans tile ``range(layout.n_params)`` in order.
    """
    named = dict(model.named_parameters())
    holders = _holders_by_tensor(model)
    slices = _parameter_slices(layout)
    runs = []  # (owner, [parameter names]) in layout order
    for name in layout.names:
        owner, _ = _owner_and_local_name(name)
        if runs and runs[-1][0] == owner:
            runs[-1][1].append(name)
        else:
            runs.append((owner, [name]))
    owners = [owner for owner, _ in runs]
    repeated = sorted({owner for owner in owners if owners.count(owner) > 1})
    if repeated:
        raise ValueError(
            f"The parameters of module(s) {repeated} are not consecutive in the parameter layout, so they "
            "cannot form one block; the layout must follow the order of model.named_parameters()."
        )
    blocks = []
    for owner, names in runs:
        shared = []
        for name in names:
            for holder in holders.get(id(named[name]), []):
                if holder != owner and holder not in shared:
                    shared.append(holder)
        blocks.append(ParameterBlock(
            module_name=owner,
            module=model.get_submodule(owner),
            parameter_names=tuple(names),
            local_names=tuple(_owner_and_local_name(name)[1] for name in names),
            slices=tuple(slices[name] for name in names),
            shared_with=tuple(shared),
        ))
    return blocks


def whole_model_block(model, layout):
    """All trainable parameters as one block of the root module (named ``""``)."""
    slices = _parameter_slices(layout)
    return ParameterBlock(
        module_name="",
        module=model,
        parameter_names=tuple(layout.names),
        local_names=tuple(layout.names),
        slices=tuple(slices[name] for name in layout.names),
    )
