"""The integer graph is bit-exact with the fx graph run in float64 (the two simulations agree)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fxquant.errors import ExportError, UnsupportedOpError
from fxquant.fixed_point import FixedPoint
from fxquant.passes import InsertQuantizers, capture, lower_to_integer_graph
from fxquant.quantizers import quantizers
from tests.helpers import deployed, fx_integer_outputs


@pytest.mark.parametrize("name,shape", [("mlp", (64, 16)), ("cnn", (64, 1, 8, 8)), ("resblock", (64, 4, 8, 8))])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fuse_relu", [True, False])
def test_integer_graph_matches_fx_simulation(request, name, shape, seed, fuse_relu):
    model = request.getfixturevalue(name)
    torch.manual_seed(seed)
    x = torch.randn(*shape) * 3
    gm = deployed(model, x, bits=(2, 8), fl_jitter=2, seed=seed, fuse_relu=fuse_relu)
    graph = lower_to_integer_graph(gm, x[:1])
    out = graph.run(*graph.quantize_inputs(x.numpy()))[graph.outputs[0]]
    fl = graph.values[graph.outputs[0]].fmt.frac_bits
    assert np.array_equal(out, fx_integer_outputs(gm, x, fl))


def test_extreme_frac_bits_negative_and_above_width(mlp):
    x = torch.randn(32, 16) * 1000  # huge activations: FL < 0
    with torch.no_grad():
        mlp.fc2.weight.mul_(1e-3)  # tiny weights: FL > BW
    gm = deployed(mlp, x, bits=(3, 6))
    fmts = {k: q.fmt for k, q in quantizers(gm).items()}
    assert fmts[("input", "act")].frac_bits < 0 and fmts[("fc2", "weight")].frac_bits > fmts[("fc2", "weight")].bits
    graph = lower_to_integer_graph(gm, x[:1])
    out = graph.run(*graph.quantize_inputs(x.numpy()))[graph.outputs[0]]
    assert np.array_equal(out, fx_integer_outputs(gm, x, graph.values[graph.outputs[0]].fmt.frac_bits))


def test_resnet20_graph_structure_and_exactness():
    from fxquant.model_file import load_model_file

    mf = load_model_file("examples/resnet20.py")
    torch.manual_seed(0)
    x = torch.rand(8, 3, 32, 32)
    gm = deployed(mf.model(), x, bits=(4, 8))
    graph = lower_to_integer_graph(gm, x[:1])
    kinds = [op.kind for op in graph.ops]
    assert kinds.count("conv2d") == 21 and kinds.count("add") == 9 and kinds.count("avgpool2d") == 1
    assert all(op.attrs.get("relu") for op in graph.ops if op.kind == "add")
    out = graph.run(*graph.quantize_inputs(x.numpy()))[graph.outputs[0]]
    assert np.array_equal(out, fx_integer_outputs(gm, x, graph.values[graph.outputs[0]].fmt.frac_bits))


class Sigmoidal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc(x))


def test_unsupported_op_is_named():
    gm = capture(Sigmoidal())
    InsertQuantizers(FixedPoint(8, 4), FixedPoint(8, 4))(gm)
    with pytest.raises(UnsupportedOpError, match="sigmoid"):
        lower_to_integer_graph(gm, torch.randn(1, 4))


def test_float_layer_cannot_be_lowered(mlp):
    gm = capture(mlp)
    InsertQuantizers()(gm)  # all off
    with pytest.raises(ExportError, match="off"):
        lower_to_integer_graph(gm, torch.randn(1, 16))


class MatmulParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8) * 0.3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(x @ self.w))


def test_matmul_with_parameter_gets_weight_quantizer_and_lowers_exactly():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    gm = deployed(MatmulParam(), x, bits=(3, 8), seed=4)
    assert ("matmul", "weight") in quantizers(gm)
    graph = lower_to_integer_graph(gm, x[:1])
    assert [op.kind for op in graph.ops] == ["linear", "linear"]
    out = graph.run(*graph.quantize_inputs(x.numpy()))[graph.outputs[0]]
    assert np.array_equal(out, fx_integer_outputs(gm, x, graph.values[graph.outputs[0]].fmt.frac_bits))
