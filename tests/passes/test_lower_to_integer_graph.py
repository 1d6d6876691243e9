"""The integer graph is bit-exact with the fx graph run in float64 (the two simulations agree)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.errors import ExportError, UnsupportedOpError
from fxquant.fixed_point import FixedPoint
from fxquant.passes import InsertQuantizers, capture, lower_to_integer_graph
from fxquant.quantizers import BiasQuantizer, quantizers
from tests.helpers import assert_lowering_exact, deployed, fx_integer_outputs


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


class Sinusoidal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.fc(x))


def test_unsupported_op_is_named():  # (sigmoid has a table form now: see tests/passes/test_vision_ops.py)
    gm = capture(Sinusoidal())
    InsertQuantizers(FixedPoint(8, 4), FixedPoint(8, 4))(gm)
    with pytest.raises(UnsupportedOpError, match="torch.sin"):
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


# ---------------------------------------------------------------------------------------------
# The exact front end: every call read in keyword form, shapes folded, reshapes, functional
# weights, alpha, transparent input ops, one error listing every unsupported op. Each test
# compares IntegerGraph.run with the fake-quant fx graph in float64, LSB for LSB.


def kinds(graph) -> list[str]:
    return [op.kind for op in graph.ops]


class PoolKwargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.conv(x)), 3, stride=1, padding=1)
        return self.fc(torch.flatten(x, 1))


def test_max_pool_keyword_arguments_are_honoured():
    torch.manual_seed(0)
    x = torch.randn(16, 2, 6, 6)
    graph = assert_lowering_exact(deployed(PoolKwargs(), x, seed=1), x)
    pool = next(op for op in graph.ops if op.kind == "maxpool2d")
    assert pool.attrs == {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1)}


class FunctionalConv(nn.Module):
    """A conv issued as ``F.conv2d`` on a module's parameters, with keyword stride/padding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.w = nn.Parameter(torch.randn(3, 4 * 4 * 4) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(F.conv2d(x, self.conv.weight, self.conv.bias, stride=2, padding=1))
        return F.linear(torch.flatten(x, 1), self.w)


def test_functional_conv_and_linear_are_quantized_like_modules():
    torch.manual_seed(0)
    x = torch.randn(16, 2, 8, 8)
    gm = deployed(FunctionalConv(), x, seed=2)
    qs = quantizers(gm)
    assert ("conv", "weight") in qs and ("linear", "weight") in qs
    assert sum(isinstance(m, BiasQuantizer) for m in gm.modules()) == 1
    graph = assert_lowering_exact(gm, x)
    assert kinds(graph) == ["conv2d", "flatten", "linear"]
    conv = graph.ops[0]
    assert conv.name == "conv" and conv.attrs["stride"] == (2, 2) and conv.attrs["padding"] == (1, 1)
    assert conv.bias is not None


class Conv1D(nn.Module):
    """Hugging Face's ``Conv1D``: ``addmm(bias, x, W)`` with ``W`` of shape (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class HFBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = Conv1D(12, 8)
        self.c_proj = Conv1D(4, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.relu(self.c_fc(x)))


def test_addmm_conv1d_is_a_quantized_linear():
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    gm = deployed(HFBlock(), x, seed=3)
    qs = quantizers(gm)
    assert {("c_fc", "weight"), ("c_fc", "act"), ("c_proj", "weight"), ("c_proj", "act"), ("input", "act")} <= set(qs)
    assert sum(isinstance(m, BiasQuantizer) for m in gm.modules()) == 2
    graph = assert_lowering_exact(gm, x)
    assert kinds(graph) == ["linear", "linear"]
    assert graph.ops[0].weight.shape == (12, 8)  # (out, in), like nn.Linear


class AddAlpha(nn.Module):
    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.fc1(x), self.fc2(x), alpha=self.alpha)


@pytest.mark.parametrize("alpha", [0.5, 0.125, 4.0])
def test_add_alpha_power_of_two_is_exact(alpha):
    torch.manual_seed(0)
    x = torch.randn(32, 8)
    graph = assert_lowering_exact(deployed(AddAlpha(alpha), x, seed=4), x)
    scale = next(op for op in graph.ops if op.kind == "mul_pow2")
    assert 2.0 ** scale.attrs["exponent"] == alpha
    assert kinds(graph)[-2:] == ["mul_pow2", "add"]


def test_add_alpha_not_a_power_of_two_is_refused():
    torch.manual_seed(0)
    x = torch.randn(8, 8)
    gm = deployed(AddAlpha(0.3), x)
    with pytest.raises(UnsupportedOpError, match="alpha=0.3"):
        lower_to_integer_graph(gm, x[:1])


class ViewThenLinear(nn.Module):
    """``x.view(x.size(0), 4, -1)`` then a Linear on the last dimension, then ``flatten(x, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(16, 5)
        self.head = nn.Linear(4 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = self.fc(x.view(x.size(0), x.shape[1], -1))
        return self.head(torch.flatten(x, 1))


def test_view_with_size_is_a_reshape_and_linear_acts_on_the_last_dim():
    torch.manual_seed(0)
    x = torch.randn(16, 2, 4, 4)
    graph = assert_lowering_exact(deployed(ViewThenLinear(), x, seed=5), x)
    assert kinds(graph) == ["conv2d", "reshape", "linear", "flatten", "linear"]
    reshape = graph.ops[1]
    assert reshape.attrs["shape"] == (4, 16) and graph.values[reshape.output].shape == (4, 16)


class FlattenFrom2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 2))


def test_flatten_from_dim_2_before_linear():
    torch.manual_seed(0)
    x = torch.randn(16, 2, 4, 4)
    graph = assert_lowering_exact(deployed(FlattenFrom2(), x, seed=6), x)
    assert kinds(graph) == ["conv2d", "reshape", "linear"]
    assert graph.ops[1].attrs["shape"] == (4, 16)


class ViewFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def test_view_size_minus_one_is_a_flatten_and_size_is_folded():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 4, 4)
    graph = assert_lowering_exact(deployed(ViewFlatten(), x, seed=7), x)
    assert kinds(graph) == ["conv2d", "flatten", "linear"]


class BatchMerge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(-1, 4))  # (N, 8) -> (2N, 4): the batch dimension changes


def test_reshape_that_touches_the_batch_is_refused():
    torch.manual_seed(0)
    x = torch.randn(8, 8)
    gm = deployed(BatchMerge(), x)
    with pytest.raises(UnsupportedOpError, match="touches the batch dimension"):
        lower_to_integer_graph(gm, x[:1])


@pytest.mark.parametrize("first", [nn.Flatten(), nn.Dropout(0.2), nn.MaxPool2d(2), nn.ReLU()])
def test_transparent_op_before_the_first_quantizer(first):
    torch.manual_seed(0)
    flat = 3 * 4 * 4 if isinstance(first, nn.MaxPool2d) else 3 * 8 * 8
    model = nn.Sequential(first, nn.Flatten(), nn.Linear(flat, 4))
    x = torch.randn(16, 3, 8, 8)
    graph = assert_lowering_exact(deployed(model, x, seed=8), x)
    assert kinds(graph)[-1] == "linear" and graph.inputs[0].shape == (3, 8, 8)


class FloatInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GLU(dim=1))
        self.fc = nn.Linear(2 * 4 * 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return torch.sin(self.fc(x))


def test_every_unsupported_op_is_listed_once_by_readable_name_and_source_line():
    gm = capture(FloatInside())
    InsertQuantizers(FixedPoint(8, 4), FixedPoint(8, 4))(gm)
    with pytest.raises(UnsupportedOpError) as err:
        lower_to_integer_graph(gm, torch.randn(1, 1, 6, 6))
    message, hint = err.value.message, err.value.hint
    assert message.startswith("2 op(s) have no integer form")
    assert "features.1: torch.nn.GLU" in message and "torch.sin" in message
    assert "test_lower_to_integer_graph.py" in message and "return torch.sin(self.fc(x))" in message
    assert " at 0x" not in message and "docs/coverage.md" in hint


class FunctionalGlu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.glu(self.fc(x))


def test_functional_op_is_named_by_module_path_and_function():
    model = nn.Sequential(FunctionalGlu())
    gm = capture(model)
    InsertQuantizers(FixedPoint(8, 4), FixedPoint(8, 4))(gm)
    with pytest.raises(UnsupportedOpError, match=r"0: torch\.nn\.functional\.glu \(.*test_lower_to_integer_graph\.py:\d+: return F\.glu"):
        lower_to_integer_graph(gm, torch.randn(1, 4))


def test_addmm_conv1d_on_a_sequence_lowers_on_the_unmerged_rows():
    """GPT-2 style ``(N, T, C)`` input: ``view(-1, C)`` merges the batch only for the addmm."""
    torch.manual_seed(0)
    x = torch.randn(8, 5, 8)
    graph = assert_lowering_exact(deployed(HFBlock(), x, seed=9), x)
    assert kinds(graph) == ["linear", "linear"]
    assert graph.inputs[0].shape == (5, 8) and graph.values[graph.outputs[0]].shape == (5, 4)


class RowsToOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(-1, x.size(-1)))  # (N, T, 8) -> (N*T, 4) leaves the model


def test_rows_merged_into_the_batch_must_be_restored():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8)
    gm = deployed(RowsToOutput(), x)
    with pytest.raises(UnsupportedOpError, match="merged into rows"):
        lower_to_integer_graph(gm, x[:1])
