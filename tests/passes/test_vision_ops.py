"""The vision-zoo ops (issue 13) through the real pipeline, fake-quant model == integer graph.

Each case: capture → InsertQuantizers → FuseReluIntoQuantizers → static 8-bit policy (calibration
and range following) → a few SGD steps → eval → FoldBatchNorm → lower → ``IntegerGraph.run``
equals the trained fake-quant model in float64 (:func:`fxquant.backends.base.check_reference`),
bit for bit, on random inputs including saturating ones.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.backends.base import check_reference
from fxquant.errors import UnsupportedOpError
from fxquant.passes import FoldBatchNorm, FuseReluIntoQuantizers, InsertQuantizers, capture, lower_to_integer_graph
from fxquant.policies.static import StaticPolicy
from fxquant.quantizers import quantizers


def trained(model: nn.Module, x: torch.Tensor, steps: int = 2, bits: int = 8, lr: float = 0.05,
            example: tuple | None = None, fold: bool = True):
    """The trainer's pipeline in small: a trained, BN-folded fake-quant graph."""
    torch.manual_seed(0)
    gm = capture(model, example)
    InsertQuantizers()(gm)
    FuseReluIntoQuantizers()(gm)
    policy = StaticPolicy(bits)
    gm.train()
    policy.on_train_begin(gm, x)
    opt = torch.optim.SGD(gm.parameters(), lr=lr, momentum=0.9)
    out = gm(x)
    y = torch.randint(0, out.shape[1], (x.shape[0],))
    for step in range(steps):
        loss = F.cross_entropy(gm(x).reshape(x.shape[0], -1)[:, :out.shape[1]], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        policy.on_batch_end(step, loss.item(), gm)
    gm.eval()
    if fold:
        FoldBatchNorm()(gm)
    return gm


def assert_exact(gm, x: torch.Tensor, scales=(1.0, 8.0)):
    graph = lower_to_integer_graph(gm, x[:1])
    for s in scales:  # x8: inputs and activations far beyond the fitted ranges (saturation)
        record = check_reference(gm, graph, [(x * s).numpy()])
        assert record["bit_exact"], record
    return graph


def kinds(graph) -> Counter:
    return Counter(op.kind for op in graph.ops)


class Between(nn.Module):
    """conv → BN → ``op`` → conv → flatten → linear (``op`` a callable or module)."""

    def __init__(self, op, c: int = 4, bn: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.op = op if isinstance(op, nn.Module) else None
        self.fn = None if isinstance(op, nn.Module) else op
        self.conv2 = nn.Conv2d(c, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv1(x))
        x = self.op(x) if self.op is not None else self.fn(x)
        return self.fc(torch.flatten(self.conv2(x), 1))


X = torch.randn(16, 3, 6, 6) * 2

# ------------------------------------------------------------------------------------ clamp family
CLAMPS = {
    "ReLU6": nn.ReLU6(), "ReLU6_inplace": nn.ReLU6(inplace=True), "Hardtanh": nn.Hardtanh(-0.7, 1.3),
    "F.relu6": lambda x: F.relu6(x), "F.hardtanh": lambda x: F.hardtanh(x, -2.0, 0.3),
    "torch.clamp": lambda x: torch.clamp(x, -0.3, 0.9), "clamp_min": lambda x: torch.clamp_min(x, -0.2),
    "clamp_max": lambda x: torch.clamp_max(x, 0.45), "Tensor.clamp": lambda x: x.clamp(min=-1.1),
    "Tensor.clip": lambda x: x.clip(-0.5, 0.5),
}


@pytest.mark.parametrize("name", list(CLAMPS))
def test_clamp_family(name):
    gm = trained(Between(CLAMPS[name]), X)
    graph = assert_exact(gm, X)
    (clamp,) = [op for op in graph.ops if op.kind == "clamp"]
    fmt = graph.values[clamp.output].fmt
    for bound in (clamp.attrs["lo"], clamp.attrs["hi"]):
        assert bound is None or (isinstance(bound, int) and fmt.qmin <= bound <= fmt.qmax)


def test_clamp_bounds_rounded_onto_the_output_grid():
    gm = trained(Between(nn.Hardtanh(-0.7, 1.3)), X)
    graph = lower_to_integer_graph(gm, X[:1])
    (clamp,) = [op for op in graph.ops if op.kind == "clamp"]
    fl = graph.values[clamp.output].fmt.frac_bits
    assert clamp.attrs["lo"] == round(-0.7 * 2**fl) and clamp.attrs["hi"] == min(round(1.3 * 2**fl), 127)


def test_clamp_after_a_quantized_value_requantizes():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 6 * 6, 3)

        def forward(self, x):
            y = self.conv(x)
            z = torch.clamp(torch.sigmoid(y), 0.1, 0.8)  # clamp of a table's (quantized) output
            return self.fc(torch.flatten(z, 1))

    graph = assert_exact(trained(M(), X), X)
    assert kinds(graph)["clamp"] == 1 and kinds(graph)["lut"] == 1


# ------------------------------------------------------------------------------------ lookup tables
LUTS = {
    "Sigmoid": nn.Sigmoid(), "Tanh": nn.Tanh(), "SiLU": nn.SiLU(), "Hardswish": nn.Hardswish(inplace=True),
    "Hardsigmoid": nn.Hardsigmoid(), "GELU": nn.GELU(), "GELU_tanh": nn.GELU(approximate="tanh"),
    "Mish": nn.Mish(), "ELU": nn.ELU(0.5), "LeakyReLU": nn.LeakyReLU(0.2), "Softplus": nn.Softplus(),
    "PReLU": nn.PReLU(), "torch.exp": lambda x: torch.exp(x),
    "F.silu_inplace": lambda x: F.silu(x, inplace=True), "F.gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "F.elu": lambda x: F.elu(x, alpha=0.3), "F.leaky_relu": lambda x: F.leaky_relu(x, 0.125),
    "Tensor.sigmoid": lambda x: x.sigmoid(), "Tensor.tanh_": lambda x: x.tanh_(),
    "torch.sigmoid": lambda x: torch.sigmoid(x), "F.hardswish": lambda x: F.hardswish(x),
}


@pytest.mark.parametrize("name", list(LUTS))
def test_lut_functions(name):
    gm = trained(Between(LUTS[name]), X)
    graph = assert_exact(gm, X)
    (lut,) = [op for op in graph.ops if op.kind == "lut"]
    in_fmt = graph.values[lut.inputs[0]].fmt
    assert lut.attrs["table"].shape == (1 << in_fmt.bits,) and in_fmt.bits <= 8
    assert lut.name in graph.layers and "act" in graph.layers[lut.name]  # its own output quantizer


def test_lut_through_export_capture():
    gm = trained(Between(nn.Hardswish()), X, example=(X[:1],))
    assert kinds(assert_exact(gm, X))["lut"] == 1


def test_lut_input_width_is_capped():
    gm = capture(Between(nn.SiLU()))
    InsertQuantizers()(gm)
    policy = StaticPolicy(12)
    gm.train()
    policy.on_train_begin(gm, X)
    qs = quantizers(gm)
    assert int(qs[("conv1", "act")].bits) == 8  # the table's input: 256 entries
    assert int(qs[("op", "act")].bits) == 12 and int(qs[("conv2", "weight")].bits) == 12


def test_lut_backward_is_the_float_derivative_at_the_quantized_input():
    gm = trained(Between(nn.SiLU(), bn=False), X, steps=0)
    gm.train()
    table = gm.fxq.op__lut
    q_in = gm.fxq.conv1__act
    x = (torch.randn(64) * 2).requires_grad_(True)
    xq = q_in(x).detach().requires_grad_(True)
    y = table(xq, q_in.bits, q_in.frac_bits, gm.fxq.op__act.bits, gm.fxq.op__act.frac_bits)
    y.sum().backward()
    ref = xq.detach().clone().requires_grad_(True)
    F.silu(ref).sum().backward()
    assert torch.allclose(xq.grad, ref.grad)
    # forward: exactly the integer table, y on the output grid
    fo = int(gm.fxq.op__act.frac_bits)
    k = y.detach().double() * 2**fo
    assert torch.equal(k, torch.round(k))


def test_prelu_per_channel_is_refused_by_name():
    gm = trained(Between(nn.PReLU(4)), X, steps=1)
    with pytest.raises(UnsupportedOpError, match=r"op.*PReLU with 4 parameters"):
        lower_to_integer_graph(gm, X[:1])


# ------------------------------------------------------------------------------------ multiply
class SqueezeExcite(nn.Module):
    def __init__(self, c: int = 8, form: str = "operator") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.form = form
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        x = F.hardswish(self.bn(self.conv(x)))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        if self.form == "operator":
            x = x * s
        elif self.form == "torch.mul":
            x = torch.mul(s, x)
        else:
            x = x.mul(s)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("form", ["operator", "torch.mul", "Tensor.mul"])
def test_squeeze_excite_gate(form):
    graph = assert_exact(trained(SqueezeExcite(form=form), X), X)
    (mul,) = [op for op in graph.ops if op.kind == "mul"]
    assert graph.values[mul.inputs[1 if form != "torch.mul" else 0]].shape == (8, 1, 1)
    assert mul.name in graph.layers


def test_multiply_by_a_power_of_two_is_a_relabel():
    graph = assert_exact(trained(Between(lambda x: x * 0.25), X), X)
    (op,) = [op for op in graph.ops if op.kind == "mul_pow2"]
    assert op.attrs["exponent"] == -2


def test_multiply_by_another_constant_is_refused_by_name():
    gm = trained(Between(lambda x: x * 0.3), X, steps=1)
    with pytest.raises(UnsupportedOpError, match=r"operator.mul.*multiply by the constant 0.3"):
        lower_to_integer_graph(gm, X[:1])


# ------------------------------------------------------------------------------------ conv / BN
class DepthwiseAndStandaloneBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn_dw = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(16, 8, 1, groups=4)
        self.bn_cat = nn.BatchNorm2d(16)  # BN after cat (DenseNet)
        self.bn_pool = nn.BatchNorm2d(8)  # BN after pool
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x):
        y = self.conv(x)
        z = F.relu(self.bn_dw(self.dw(y)))
        x = self.grouped(F.relu(self.bn_cat(torch.cat([y, z], 1))))
        x = self.bn_pool(F.max_pool2d(x, 2))
        return self.fc(torch.flatten(x, 1))


def test_depthwise_grouped_conv_and_standalone_batchnorm():
    model = DepthwiseAndStandaloneBN()
    gm = trained(model, X, steps=3, fold=False)
    bn = model.bn_cat
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()  # BN's eval-mode scale
    FoldBatchNorm()(gm)
    graph = assert_exact(gm, X)
    convs = {op.name: op for op in graph.ops if op.kind == "conv2d"}
    assert convs["dw"].attrs["groups"] == 8 and convs["grouped"].attrs["groups"] == 4
    for bn, c in (("bn_cat", 16), ("bn_pool", 8)):  # per-channel affine as a depthwise 1x1 conv
        op = convs[bn]
        assert op.attrs["groups"] == c and op.weight.shape == (c, 1, 1, 1) and op.bias is not None
        assert graph.layers[bn]["weight"]["bits"] == 8
    assert "bn_dw" not in convs  # BN after its conv is folded into it
    # the affine is BN's in eval mode, up to the weight's quantization
    w = convs["bn_cat"].weight.reshape(-1) * 2.0 ** -convs["bn_cat"].weight_fmt.frac_bits
    assert np.abs(w - s).max() <= 2.0 ** -convs["bn_cat"].weight_fmt.frac_bits / 2


# ------------------------------------------------------------------------------------ pooling
POOLS = {
    "maxpool_ceil": nn.MaxPool2d(3, 2, ceil_mode=True),
    "maxpool_dilated": nn.MaxPool2d(2, 1, dilation=2),
    "maxpool_pad_ceil": lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
    "avgpool_3x3": nn.AvgPool2d(3, 1, padding=1),
    "avgpool_ceil": nn.AvgPool2d(3, 2, padding=1, ceil_mode=True),
    "avgpool_2x2": nn.AvgPool2d(2),
    "F.avg_pool2d": lambda x: F.avg_pool2d(x, (3, 2), (2, 1), ceil_mode=True),
    "adaptive_3": nn.AdaptiveAvgPool2d(3),
    "adaptive_global": lambda x: F.adaptive_avg_pool2d(x, (1, 1)),
    "adaptive_2x3": nn.AdaptiveAvgPool2d((2, 3)),
    "mean": lambda x: x.mean([2, 3]), "mean_keepdim": lambda x: torch.mean(x, (2, 3), keepdim=True),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_pools(name):
    op = POOLS[name]

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = op if isinstance(op, nn.Module) else None
            self.fc = nn.LazyLinear(5)

        def forward(self, x):
            x = F.relu(self.conv(x))
            x = self.pool(x) if self.pool is not None else op(x)
            return self.fc(torch.flatten(x, 1))

    model = M()
    model(X[:1])  # materialize the lazy linear
    graph = assert_exact(trained(model, X), X)
    pool = [o for o in graph.ops if o.kind in ("maxpool2d", "avgpool2d")][-1]
    if "ceil" in name:
        assert pool.attrs["ceil_mode"] is True
    if "dilated" in name:
        assert pool.attrs["dilation"] == (2, 2)


def test_avgpool_non_power_of_two_is_the_rounded_reciprocal():
    """A 3x3 window is ``sum * M * 2^-s``, not ``sum / 9``: the fake-quant op computes the former."""
    from fxquant.fixed_point import reciprocal
    from fxquant.ops.fake_quant import FixedPointAvgPool2d

    m, s = reciprocal(9)
    pool = FixedPointAvgPool2d("p", {"kernel_size": 3, "stride": 3, "padding": 0})
    x = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    assert pool(x).item() == 9 * m * 2.0**-s != 1.0


@pytest.mark.parametrize("op,match", [(nn.AdaptiveAvgPool2d(4), "unequal size"),
                                      (nn.AvgPool2d(3, 1, 1, count_include_pad=False), "count_include_pad")])
def test_pools_without_integer_form_are_refused(op, match):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = op
            self.fc = nn.LazyLinear(5)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.conv(x)), 1))

    model = M()
    model(X[:1])
    gm = trained(model, X, steps=1)
    with pytest.raises(UnsupportedOpError, match=match):
        lower_to_integer_graph(gm, X[:1])


# ------------------------------------------------------------------------------------ shape ops
class ChannelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = F.relu(self.conv(x))
        b, c, h, w = x.size()
        x = x.view(b, 2, c // 2, h, w)
        x = torch.transpose(x, 1, 2).contiguous()
        x = x.view(b, -1, h, w)
        return self.fc(torch.flatten(self.conv2(x), 1))


def test_channel_shuffle():
    graph = assert_exact(trained(ChannelShuffle(), X), X)
    assert kinds(graph)["transpose"] == 1 and kinds(graph)["reshape"] == 2


SHAPES = {
    "permute": lambda x: x.permute(0, 2, 3, 1).permute(0, 3, 1, 2),
    "torch.permute": lambda x: torch.permute(x, (0, 1, 3, 2)),
    "transpose": lambda x: x.transpose(2, 3),
    "squeeze_unsqueeze": lambda x: x.unsqueeze(1).squeeze(1),
    "reshape": lambda x: x.reshape(x.shape[0], 2, 2, 6, 6).reshape(x.size(0), 4, 6, 6),
    "dropout": nn.Dropout(0.3), "dropout2d": nn.Dropout2d(0.3), "identity": nn.Identity(),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_shape_ops(name):
    graph = assert_exact(trained(Between(SHAPES[name]), X), X)
    assert not any(op.kind == "identity" for op in graph.ops)


UPSAMPLES = {
    "Upsample": nn.Upsample(scale_factor=2), "interpolate": lambda x: F.interpolate(x, scale_factor=(2, 3)),
    "interpolate_size": lambda x: F.interpolate(x, size=(12, 6), mode="nearest"),
}


@pytest.mark.parametrize("name", list(UPSAMPLES))
def test_upsample_nearest(name):
    op = UPSAMPLES[name]

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.up = op if isinstance(op, nn.Module) else None
            self.conv2 = nn.Conv2d(4, 2, 3, stride=2)
            self.fc = nn.LazyLinear(5)

        def forward(self, x):
            x = F.relu(self.conv(x))
            x = self.up(x) if self.up is not None else op(x)
            return self.fc(torch.flatten(self.conv2(x), 1))

    model = M()
    model(X[:1])
    graph = assert_exact(trained(model, X), X)
    (up,) = [o for o in graph.ops if o.kind == "upsample_nearest"]
    assert up.attrs["scale"] == {"Upsample": (2, 2), "interpolate": (2, 3), "interpolate_size": (2, 1)}[name]


@pytest.mark.parametrize("functional", [False, True])
def test_conv_transpose2d(functional):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
            self.bn = nn.BatchNorm2d(6)
            self.fc = nn.Linear(6 * 12 * 12, 5)

        def forward(self, x):
            x = F.relu(self.conv(x))
            if functional:
                x = F.conv_transpose2d(x, self.up.weight, self.up.bias, 2, 1, 1, 2)
            else:
                x = self.up(x)
            return self.fc(torch.flatten(F.relu(self.bn(x)), 1))

    graph = assert_exact(trained(M(), X), X)
    (ct,) = [o for o in graph.ops if o.kind == "conv_transpose2d"]
    assert ct.weight.shape == (4, 3, 3, 3) and ct.attrs["groups"] == 2 and ct.attrs["output_padding"] == (1, 1)
    assert "up" in graph.layers and "weight" in graph.layers["up"]


# ------------------------------------------------------------------------------------ readable errors
class TwoUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = F.glu(self.features(x), dim=1)
        x = torch.sin(x)
        return self.fc(torch.flatten(x, 1))


def test_every_unsupported_op_named_readably_with_source_line():
    gm = trained(TwoUnsupported(), X, steps=1)  # training works
    with pytest.raises(UnsupportedOpError) as err:
        lower_to_integer_graph(gm, X[:1])
    message, hint = err.value.message, err.value.hint
    assert message.startswith("2 op(s) have no integer form")
    assert "torch.nn.functional.glu" in message and "torch.sin" in message
    assert "x = F.glu(self.features(x), dim=1)" in message and "x = torch.sin(x)" in message
    assert " at 0x" not in message and "built-in" not in message and "docs/coverage.md" in hint


# ------------------------------------------------------------------------------------ calibration
class DeepUnnormalized(nn.Module):
    """conv → BN blocks whose raw conv outputs are tiny (BN's running statistics at init do not
    normalize them; batch statistics do)."""

    def __init__(self) -> None:
        super().__init__()
        layers = []
        for i in range(3):
            conv = nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1, bias=False)
            with torch.no_grad():
                conv.weight.mul_(0.03)
            layers += [conv, nn.BatchNorm2d(8), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def test_calibration_sees_the_batch_statistics_training_uses():
    """Calibrating in eval mode fitted every range to the unnormalized outputs (1e-3 and below):
    training's normalized values then all saturated, the straight-through gradients were zero."""
    torch.manual_seed(0)
    model = DeepUnnormalized()
    gm = capture(model)
    InsertQuantizers()(gm)
    FuseReluIntoQuantizers()(gm)
    gm.train()
    running = model.features[1].running_var.clone()
    StaticPolicy(8).on_train_begin(gm, X)
    assert torch.equal(model.features[1].running_var, running)  # calibration leaves BN's statistics
    q = quantizers(gm)[("features.6", "act")]  # the normalized, ReLU'd output of the third block
    assert 0.5 < float(q.amax) and q.fmt.frac_bits < 8
    loss = F.cross_entropy(gm(X), torch.randint(0, 5, (16,)))
    loss.backward()
    assert float(model.features[0].weight.grad.abs().sum()) > 0


# ------------------------------------------------------------------------------------ torchvision
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "squeezenet1_1", "densenet121"])
def test_torchvision_model_lowers_exactly(name):
    from fxquant.torchvision_compat import import_torchvision

    tv = import_torchvision()
    torch.manual_seed(0)
    model = getattr(tv.models, name)(weights=None, num_classes=10)
    x = torch.randn(4 if name != "densenet121" else 2, 3, 32, 32)
    gm = trained(model, x, steps=2 if name != "densenet121" else 1, lr=0.01)
    graph = lower_to_integer_graph(gm, x[:1])
    record = check_reference(gm, graph, [(x * 2).numpy()])
    assert record["bit_exact"], record
