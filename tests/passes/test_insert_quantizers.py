"""InsertQuantizers: structure, names, sharing, idempotence, numerics when off."""

from __future__ import annotations

import torch
from torch.fx.passes.infra.pass_manager import PassManager

from fxquant.fixed_point import FixedPoint
from fxquant.passes import InsertQuantizers, StripQuantizers, capture
from fxquant.quantizers import BiasQuantizer, FixedPointQuantizer, quantizers


def quantizer_calls(gm) -> list[str]:
    return [gm.get_submodule(n.target).layer + "/" + gm.get_submodule(n.target).role
            for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(n.target), FixedPointQuantizer)]


def test_mlp_structure_and_names(mlp):
    gm = capture(mlp)
    assert InsertQuantizers()(gm).modified
    assert sorted(quantizer_calls(gm)) == sorted(["input/act", "fc1/weight", "fc1/act", "fc2/weight", "fc2/act"])
    assert sum(isinstance(m, BiasQuantizer) for m in gm.modules()) == 2


def test_off_quantizers_preserve_the_float_model(cnn):
    cnn.eval()
    x = torch.randn(4, 1, 8, 8)
    gm = capture(cnn)
    InsertQuantizers()(gm)
    gm.eval()
    assert torch.allclose(gm(x), cnn(x), atol=1e-6)


def test_residual_add_inputs_and_output_quantized_once(resblock):
    gm = capture(resblock)
    InsertQuantizers()(gm)
    calls = quantizer_calls(gm)
    # the block input feeds conv1 and the add: one shared quantizer, named after its producer
    assert calls.count("input/act") == 1
    assert "conv2/act" in calls and ".add/act" in calls or "add/act" in calls
    add = next(n for n in gm.graph.nodes if n.name.startswith("add"))
    for arg in add.args:
        assert arg.op == "call_module" and isinstance(gm.get_submodule(arg.target), FixedPointQuantizer)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert isinstance(gm.get_submodule(output.args[0].target), FixedPointQuantizer)


def test_idempotent_and_pass_manager(cnn):
    gm = capture(cnn)
    result = PassManager(passes=[InsertQuantizers(FixedPoint(8, 4), FixedPoint(8, 4))])(gm)
    n = len(quantizers(result.graph_module))
    again = InsertQuantizers()(result.graph_module)
    assert not again.modified and len(quantizers(again.graph_module)) == n


def test_strip_restores_float(cnn):
    cnn.eval()
    x = torch.randn(2, 1, 8, 8)
    gm = capture(cnn)
    InsertQuantizers(FixedPoint(4, 2), FixedPoint(4, 2))(gm)
    gm.eval()
    assert not torch.allclose(gm(x), cnn(x))
    assert StripQuantizers()(gm).modified
    assert not quantizers(gm) and torch.allclose(gm(x), cnn(x), atol=1e-6)
    assert not StripQuantizers()(gm).modified


def test_export_captured_graph_gets_same_layer_names(mlp):
    from tests.passes.test_capture import SizeLoop

    model = SizeLoop()
    gm = capture(model, (torch.randn(2, 8),))
    InsertQuantizers()(gm)
    assert sorted(quantizer_calls(gm)) == ["fc/act", "fc/weight", "input/act"]


def test_fuse_relu_keeps_numerics_and_strip_restores(resblock):
    from fxquant.passes import FuseReluIntoQuantizers

    x = torch.randn(8, 4, 8, 8)
    gm = capture(resblock)
    InsertQuantizers(FixedPoint(6, 3), FixedPoint(6, 3))(gm)
    gm.eval()
    before = gm(x)
    relus = sum(n.target is torch.relu for n in gm.graph.nodes)
    assert FuseReluIntoQuantizers()(gm).modified
    assert sum(n.target is torch.relu for n in gm.graph.nodes) == relus - 2  # both relus feed quantizers
    assert torch.equal(gm(x), before)
    assert not FuseReluIntoQuantizers()(gm).modified
    StripQuantizers()(gm)
    resblock.eval()
    assert torch.allclose(gm(x), resblock(x), atol=1e-6)


def test_fused_relu_gradient_matches_unfused(resblock):
    from fxquant.passes import FuseReluIntoQuantizers

    x = torch.randn(8, 4, 8, 8)
    grads = []
    for fuse in (False, True):
        gm = capture(resblock)
        InsertQuantizers(FixedPoint(6, 3), FixedPoint(6, 3))(gm)
        if fuse:
            assert FuseReluIntoQuantizers()(gm).modified
        gm.eval()
        resblock.zero_grad()
        gm(x).sum().backward()
        grads.append(resblock.conv1.weight.grad.clone())
        StripQuantizers()(gm)
    assert torch.equal(grads[0], grads[1])


class FloatBetween(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.block = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Sigmoid())
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(torch.relu(self.bn(self.conv1(x))))
        x = torch.nn.functional.max_pool2d(torch.tanh(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_act_quantizer_is_named_after_the_op_producing_the_value():
    gm = capture(FloatBetween())
    InsertQuantizers()(gm)
    acts = sorted(layer for layer, role in quantizers(gm) if role == "act")
    # sigmoid and tanh produce the values entering conv2 and fc (through max-pool / flatten); as
    # lookup tables they quantize their own inputs (the values conv1 and conv2 produce)
    assert acts == ["block.1", "conv1", "conv2", "fc", "input", "tanh"]
    kinds = {layer: q.kind for (layer, role), q in quantizers(gm).items() if role == "act"}
    assert kinds["block.1"] == kinds["tanh"] == "lut" and kinds["conv1"] == "conv2d"


def test_functional_weights_idempotent_and_strip_restores(mlp):
    from tests.passes.test_lower_to_integer_graph import FunctionalConv, HFBlock

    for model, x in ((FunctionalConv(), torch.randn(2, 2, 8, 8)), (HFBlock(), torch.randn(3, 8))):
        model.eval()
        gm = capture(model)
        assert InsertQuantizers(FixedPoint(8, 4), FixedPoint(8, 4))(gm).modified
        assert not InsertQuantizers()(gm).modified
        StripQuantizers()(gm)
        gm.eval()
        assert torch.allclose(gm(x), model(x), atol=1e-6)
