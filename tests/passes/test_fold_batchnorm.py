"""FoldBatchNorm: float equivalence, weight FL refit, idempotence, export-captured graphs."""

from __future__ import annotations

import torch

from fxquant.fixed_point import FixedPoint, fit_frac_bits
from fxquant.passes import FoldBatchNorm, InsertQuantizers, capture
from fxquant.passes.op_kinds import node_kind
from fxquant.quantizers import quantizers


def _trained_bn(model, x):
    model.train()
    for _ in range(3):
        model(x)
    return model.eval()


def test_fold_float_graph_is_equivalent(cnn):
    x = torch.randn(16, 1, 8, 8)
    _trained_bn(cnn, x)
    gm = capture(cnn)
    before = gm(x)
    assert FoldBatchNorm()(gm).modified
    assert not any(node_kind(gm, n) == "batchnorm" for n in gm.graph.nodes)
    assert torch.allclose(gm(x), before, atol=1e-5)
    assert not FoldBatchNorm()(gm).modified


def test_fold_quantized_graph_refits_weight_fl_and_adds_bias_quantizer(cnn):
    x = torch.randn(16, 1, 8, 8)
    _trained_bn(cnn, x)
    gm = capture(cnn)
    InsertQuantizers(FixedPoint(8, 4), FixedPoint(8, 4))(gm)
    gm.eval()
    FoldBatchNorm()(gm)
    q = quantizers(gm)[("conv1", "weight")]
    assert q.fmt == FixedPoint(8, fit_frac_bits(float(gm.conv1.weight.detach().abs().max()), 8))
    assert any(n.op == "call_module" and "conv1__bias" in str(n.target) for n in gm.graph.nodes)


class ExportOnlyBlock(torch.nn.Module):
    """fx cannot trace the int() of a size, so capture falls back to torch.export (aten BN)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.shape[1]) // 4):
            x = torch.relu(self.bn(self.conv(x)))
        return x


def test_fold_export_captured_graph():
    from fxquant.passes.capture import CAPTURED_BY

    torch.manual_seed(0)
    model = ExportOnlyBlock()
    x = torch.randn(8, 4, 6, 6)
    _trained_bn(model, x)
    gm = capture(model, (x,))
    assert gm.meta[CAPTURED_BY] == "torch.export"
    assert any(node_kind(gm, n) == "batchnorm" for n in gm.graph.nodes)
    before = model(x)  # the captured graph shares the model's parameters: fold changes both
    assert FoldBatchNorm()(gm).modified
    assert not any(node_kind(gm, n) == "batchnorm" for n in gm.graph.nodes)
    assert torch.allclose(gm(x), before, atol=1e-5)


class FunctionalConvBn(torch.nn.Module):
    """``F.conv2d`` on a top-level parameter named ``w`` (no bias), then BN: folding creates the bias."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 2, 3, 3) * 0.3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(torch.nn.functional.conv2d(x, self.w, padding=1)))
        return self.fc(torch.flatten(x, 1))


def test_fold_functional_conv_on_any_parameter_and_lower_exactly():
    from tests.helpers import assert_lowering_exact, deployed

    torch.manual_seed(0)
    x = torch.randn(16, 2, 6, 6)
    gm = deployed(FunctionalConvBn(), x, seed=3)
    assert not any(node_kind(gm, n) == "batchnorm" for n in gm.graph.nodes)
    assert ("conv2d", "weight") in quantizers(gm)  # a top-level parameter: named after the op
    graph = assert_lowering_exact(gm, x)
    assert graph.ops[0].kind == "conv2d" and graph.ops[0].bias is not None
