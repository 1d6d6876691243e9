"""capture: torch.fx first, torch.export fallback, one clear error when both fail."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from fxquant.errors import CaptureError
from fxquant.passes import capture
from fxquant.passes.capture import CAPTURED_BY


class ShapeBranch(nn.Module):
    """fx cannot trace a branch on a tensor's size; torch.export specializes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent (value) control flow
            x = x * 2
        return self.fc(x)


class SizeLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.shape[1]) // 8):  # int() of a traced size: fx fails, export specializes
            x = torch.relu(x)
        return self.fc(x)


def test_fx_path(mlp):
    gm = capture(mlp)
    assert gm.meta[CAPTURED_BY] == "torch.fx"
    x = torch.randn(2, 16)
    assert torch.equal(gm(x), mlp(x))


def test_export_fallback_for_shape_control_flow():
    model = SizeLoop()
    x = torch.randn(3, 8)
    gm = capture(model, (x,))
    assert gm.meta[CAPTURED_BY] == "torch.export"
    assert torch.allclose(gm(x), model(x))


def test_both_fail_names_the_offending_line():
    with pytest.raises(CaptureError) as err:
        capture(ShapeBranch(), (torch.randn(2, 8),))
    assert "test_capture.py" in err.value.message and "x.sum() > 1e9" in err.value.message


def test_fx_failure_without_example_inputs_asks_for_them():
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(SizeLoop())


class ConvBnBranch(nn.Module):
    """conv + BN + dropout with a branch on a shape (fx cannot trace ``int()`` of a size)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        if int(x.shape[-1]) > 4:
            x = torch.nn.functional.max_pool2d(x, 2)
        return self.fc(self.drop(x).view(x.size(0), -1))


def test_export_capture_trains_and_evaluates_like_the_model():
    import copy

    torch.manual_seed(0)
    model = ConvBnBranch()
    eager = copy.deepcopy(model)
    gm = capture(model, (torch.randn(1, 3, 8, 8),))
    assert gm.meta[CAPTURED_BY] == "torch.export"
    assert not any(n.op == "call_function" and "add_" in str(n.target) for n in gm.graph.nodes)
    x = torch.randn(6, 3, 8, 8)
    for _ in range(2):  # batch statistics, running-stat updates and dropout masks as in eager mode
        gm.train()
        eager.train()
        torch.manual_seed(1)
        y = gm(x)
        torch.manual_seed(1)
        assert torch.equal(y, eager(x))
    assert torch.equal(model.bn.running_var, eager.bn.running_var)
    assert int(model.bn.num_batches_tracked) == int(eager.bn.num_batches_tracked) == 2
    gm.eval()
    eager.eval()
    assert torch.equal(gm(x), eager(x))  # running statistics, no dropout
    assert torch.equal(gm(x[:1]), eager(x[:1]))  # the batch dimension stays dynamic


class ConvBnFx(ConvBnBranch):
    """The same model without the branch: fx traces it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(self.drop(x).view(x.size(0), -1))


def quantizer_placement(gm) -> list[tuple[str, str, bool, str]]:
    """``(layer, role, relu, kind of the consumer)`` of every quantizer, in graph order."""
    from fxquant.passes.op_kinds import node_kind
    from fxquant.quantizers import FixedPointQuantizer

    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(q := gm.get_submodule(n.target), FixedPointQuantizer):
            users = sorted(str(node_kind(gm, u)) for u in n.users)
            out.append((q.layer, q.role, q.relu, ",".join(users)))
    return out


def test_export_captured_conv_bn_trains_folds_and_lowers_exactly():
    import numpy as np

    from fxquant.passes import FoldBatchNorm, FuseReluIntoQuantizers, InsertQuantizers, lower_to_integer_graph
    from fxquant.passes.op_kinds import node_kind
    from fxquant.policies.base import calibrate
    from fxquant.fixed_point import FixedPoint, fit_frac_bits
    from fxquant.quantizers import quantizers
    from tests.helpers import fx_integer_outputs

    torch.manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    gm = capture(ConvBnBranch(), (x[:1],))
    InsertQuantizers()(gm)
    FuseReluIntoQuantizers()(gm)
    calibrate(gm, x)
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(8, fit_frac_bits(float(q.amax), 8)))
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    gm.train()
    for _ in range(2):
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()
    fx_gm = capture(ConvBnFx())
    InsertQuantizers()(fx_gm)
    FuseReluIntoQuantizers()(fx_gm)
    assert quantizer_placement(gm) == quantizer_placement(fx_gm)  # same quantizers, same producers
    gm.eval()
    assert FoldBatchNorm()(gm).modified
    assert not any(node_kind(gm, n) == "batchnorm" for n in gm.graph.nodes)
    graph = lower_to_integer_graph(gm, x[:1])
    assert [op.kind for op in graph.ops] == ["conv2d", "maxpool2d", "flatten", "linear"]
    out = graph.run(*graph.quantize_inputs(x.numpy()))[graph.outputs[0]]
    np.testing.assert_array_equal(out, fx_integer_outputs(gm, x, graph.values[graph.outputs[0]].fmt.frac_bits))


class InplaceResidual(nn.Module):
    """``y += shortcut``, keyword conv/pool arguments, 'same' padding; optionally a shape branch."""

    def __init__(self, branch: bool) -> None:
        super().__init__()
        self.branch = branch
        self.c1 = nn.Conv2d(3, 8, 3, padding="same", bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=2, bias=False)
        self.c3 = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.shape[1]) // 3 if self.branch else 1):
            y = torch.nn.functional.relu(self.b1(self.c1(x)), inplace=True)
        y = self.c2(y)
        y += self.c3(x)
        y = torch.nn.functional.avg_pool2d(torch.relu(y), kernel_size=2)
        z = torch.nn.functional.adaptive_avg_pool2d(torch.cat([y, y], dim=1), output_size=1)
        return self.fc(z.flatten(1))


def test_both_capture_paths_give_the_same_integer_graph():
    from tests.helpers import assert_lowering_exact, deployed

    graphs = []
    for branch in (False, True):
        torch.manual_seed(0)
        x = torch.randn(16, 3, 8, 8)
        gm = deployed(InplaceResidual(branch), x, bits=(4, 8), example=(x[:1],))
        assert gm.meta[CAPTURED_BY] == ("torch.export" if branch else "torch.fx")
        assert not any(n.target in (torch.ops.aten.add_.Tensor, operator.iadd) for n in gm.graph.nodes)
        graphs.append(assert_lowering_exact(gm, x))
    fx_ops, export_ops = ([(op.name, op.kind, op.attrs) for op in g.ops] for g in graphs)
    assert fx_ops == export_ops
    assert [k for _, k, _ in fx_ops] == ["conv2d", "conv2d", "conv2d", "add", "avgpool2d", "cat", "avgpool2d",
                                         "flatten", "linear"]
