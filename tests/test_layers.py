"""Blocks of the flat parameter vector by owning module: tied, frozen and root-owned parameters."""

import pytest
import torch
from torch import nn

from skinfl._layers import module_blocks, whole_model_block
from skinfl._model import ParameterLayout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def layout_of(model):
    """The flat layout of the trainable parameters, as estimators build it."""
    return ParameterLayout({name: p for name, p in model.named_parameters() if p.requires_grad})


def check_tiling(blocks, layout, model):
    """Spans tile the flat vector in order, and every slice holds its parameter's values."""
    assert [block.span.start for block in blocks] == [0] + [block.span.stop for block in blocks[:-1]]
    assert blocks[-1].span.stop == layout.n_params
    assert sum(block.size for block in blocks) == layout.n_params
    assert [name for block in blocks for name in block.parameter_names] == layout.names
    named = dict(model.named_parameters())
    flat = layout.flatten({name: named[name].detach() for name in layout.names}, n_leading=0)
    for block in blocks:
        for name, local, piece in zip(block.parameter_names, block.local_names, block.slices):
            parameter = block.module.get_parameter(local)
            assert parameter is named[name]
            assert torch.equal(flat[piece], parameter.detach().reshape(-1))
            assert block.slice_of(local) == piece


def summary(blocks):
    return [(block.module_name, block.parameter_names, block.size) for block in blocks]


def test_mlp_has_one_block_per_linear_layer():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    layout = layout_of(model)
    blocks = module_blocks(model, layout)
    assert summary(blocks) == [("0", ("0.weight", "0.bias"), 25), ("2", ("2.weight", "2.bias"), 18)]
    assert blocks[0].module is model[0] and blocks[1].module is model[2]
    assert blocks[0].local_names == ("weight", "bias")
    assert blocks[1].span == slice(25, 43) and blocks[1].slice_of("bias") == slice(40, 43)
    assert all(block.shared_with == () for block in blocks)
    check_tiling(blocks, layout, model)


def test_cnn_with_batch_norm_and_nested_modules():
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.Flatten()),
        nn.Linear(12, 4),
    )
    layout = layout_of(model)
    blocks = module_blocks(model, layout)
    assert summary(blocks) == [
        ("0", ("0.weight", "0.bias"), 20),
        ("1", ("1.weight", "1.bias"), 4),  # buffers (running statistics) are not parameters
        ("3.0", ("3.0.weight",), 54),
        ("4", ("4.weight", "4.bias"), 52),
    ]
    assert blocks[2].module is model[3][0]
    check_tiling(blocks, layout, model)


def test_frozen_parameters_are_in_no_block():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)  # its bias stays trainable: a block of the bias alone
    model[2].requires_grad_(False)  # a whole module frozen: no block
    layout = layout_of(model)
    blocks = module_blocks(model, layout)
    assert summary(blocks) == [("0", ("0.bias",), 5), ("4", ("4.weight", "4.bias"), 8)]
    assert blocks[0].local_names == ("bias",) and blocks[0].span == slice(0, 5)
    check_tiling(blocks, layout, model)


class ScaledLinear(nn.Module):
    """A parameter registered on the root module itself, next to a child layer."""

    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(1))
        self.linear = nn.Linear(3, 2)
        self.offset = nn.Parameter(torch.zeros(2))  # registered after the child, listed before it

    def forward(self, x):
        return self.linear(x) / self.temperature + self.offset


def test_parameters_of_the_root_module_form_the_block_named_empty():
    model = ScaledLinear()
    layout = layout_of(model)
    blocks = module_blocks(model, layout)
    # named_parameters lists a module's own parameters before its children's.
    assert summary(blocks) == [("", ("temperature", "offset"), 3),
                               ("linear", ("linear.weight", "linear.bias"), 8)]
    assert blocks[0].module is model and blocks[0].local_names == ("temperature", "offset")
    check_tiling(blocks, layout, model)


class Tied(nn.Module):
    """An encoder and decoder sharing one weight matrix, and a module registered under two names."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(3, 3)
        self.decoder = nn.Linear(3, 3)
        self.decoder.weight = self.encoder.weight
        self.head = nn.Linear(3, 2)
        self.alias = self.head

    def forward(self, x):
        return self.alias(self.decoder(torch.tanh(self.encoder(x))))


def test_tied_parameters_belong_to_one_block_and_name_their_other_users():
    model = Tied()
    layout = layout_of(model)
    assert layout.names == ["encoder.weight", "encoder.bias", "decoder.bias", "head.weight", "head.bias"]
    blocks = module_blocks(model, layout)
    assert summary(blocks) == [
        ("encoder", ("encoder.weight", "encoder.bias"), 12),
        ("decoder", ("decoder.bias",), 3),
        ("head", ("head.weight", "head.bias"), 8),
    ]
    assert [block.shared_with for block in blocks] == [("decoder",), (), ("alias",)]
    check_tiling(blocks, layout, model)


def test_split_gives_one_block_per_parameter_tensor():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    layout = layout_of(model)
    pieces = [piece for block in module_blocks(model, layout) for piece in block.split()]
    assert summary(pieces) == [("0", ("0.weight",), 20), ("0", ("0.bias",), 5), ("2", ("2.weight",), 15),
                               ("2", ("2.bias",), 3)]
    assert pieces[1].module is model[0] and pieces[1].local_names == ("bias",)
    check_tiling(pieces, layout, model)


def test_whole_model_block():
    model = ScaledLinear()
    layout = layout_of(model)
    block = whole_model_block(model, layout)
    assert summary([block]) == [("", tuple(layout.names), 11)]
    assert block.span == slice(0, 11) and block.module is model
    check_tiling([block], layout, model)


def test_a_layout_out_of_module_order_is_refused():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    named = dict(model.named_parameters())
    shuffled = ParameterLayout({name: named[name] for name in ("0.weight", "2.weight", "0.bias", "2.bias")})
    with pytest.raises(ValueError, match=r"module\(s\) \['0', '2'\] are not consecutive"):
        module_blocks(model, shuffled)
