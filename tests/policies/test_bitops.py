"""BitOPs of a training step against values computed by hand from the formula of fxquant.bitops.

Tiny (conftest): conv 1->4, 3x3, padding 1 on a 1x4x4 input: 4*4*4 outputs * 9 = 576 MACs/sample;
fc 64->3: 192 MACs/sample. Graph: q[input] - conv - relu - flatten - q[conv] - fc - q[fc].
"""

from __future__ import annotations

import torch
from torch import nn

from fxquant.bitops import BitOpsMeter, layer_costs, step_bitops
from fxquant.fixed_point import FixedPoint
from fxquant.passes import FuseReluIntoQuantizers, InsertQuantizers, capture
from fxquant.quantizers import ACT, WEIGHT, quantizers


def _set(gm, w_bits: int, a_bits: int, act_grad: dict[str, int], weight_grad: int) -> None:
    for (layer, role), q in quantizers(gm).items():
        q.set_format(FixedPoint(w_bits if role == WEIGHT else a_bits, 2))
        q.set_grad_bits(weight_grad if role == WEIGHT else act_grad.get(layer, 32))


def test_error_bits_come_from_the_quantizer_after_the_layer(tiny, batch) -> None:
    # conv's dL/dy leaves q[conv]'s backward at 8 bits (relu and flatten keep the grid);
    # fc's leaves q[fc] unquantized (32). The weight quantizers' grad_bits (4) round dL/dW, the GEMM's
    # result, and must not enter the count.
    _set(tiny, 6, 5, {"conv": 8}, weight_grad=4)
    costs = layer_costs(tiny, batch)
    assert [(c.layer, c.macs) for c in costs] == [("conv", 576), ("fc", 192)]
    # conv: 576 * (6*5 + 6*8 + 5*8) = 67968;  fc: 192 * (6*5 + 6*32 + 5*32) = 73344
    assert step_bitops(costs, 2) == 2 * (67968 + 73344)


def test_unquantized_error_gradients_count_32_bits(tiny, batch) -> None:
    _set(tiny, 8, 8, {}, weight_grad=8)  # AdaPT's setting: weight gradients quantized, errors not
    # each layer: M * (8*8 + 8*32 + 8*32) = 576 M
    assert step_bitops(layer_costs(tiny, batch), 1) == 576 * 576 + 192 * 576


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def test_batchnorm_between_layer_and_quantizer_leaves_the_error_in_float(batch) -> None:
    gm = capture(ConvBN(), (torch.zeros(1, 1, 4, 4),))
    InsertQuantizers()(gm)
    FuseReluIntoQuantizers()(gm)  # the trainer's pipeline: bn - q[conv, relu]
    _set(gm, 8, 8, {"conv": 8, "fc": 8}, weight_grad=8)
    costs = layer_costs(gm, batch)
    assert [c.error_q is None for c in costs] == [True, False]
    # conv 576 * (64 + 256 + 256) = 331776;  fc 192 * (64 + 64 + 64) = 36864
    assert step_bitops(costs, 1) == 331776 + 36864
    meter = BitOpsMeter(costs, None)
    row = meter.step(3)
    assert row["bitops"] == 3 * 368640
    assert row["bitops_vs_fp32"] == 368640 / (768 * 3 * 1024)


def test_act_role_quantizers_named_after_their_producer(tiny) -> None:
    assert {(layer, role) for layer, role in quantizers(tiny)} == {
        ("input", ACT), ("conv", WEIGHT), ("conv", ACT), ("fc", WEIGHT), ("fc", ACT)}
