"""The vision-zoo kernels (:mod:`fxquant.backends.cpu.vision_kernels`) through the CPU target, bit-exact
against ``IntegerGraph.run``: grouped / depthwise convolutions of every geometry the kernel
distinguishes, the element-wise ops, windows with padding / dilation / ceil mode, and the layouts
``check`` refuses. Every graph is small (each export is a TVM build)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conformance.harness import assert_bit_exact
from tests.conformance.zoo import GraphMaker, format_inputs

from fxquant.backends.cpu.build import lower
from fxquant.backends.cpu.features import resolve_target
from fxquant.backends.cpu.target import CpuTarget
from fxquant.fixed_point import FixedPoint as F


def _exact(graph, tmp_path: Path, n: int = 5) -> dict:
    assert CpuTarget().check(graph) == []
    return assert_bit_exact(CpuTarget(), graph, format_inputs(graph, n=n, seed=3), tmp_path)


def test_grouped_and_depthwise_convs(tmp_path: Path) -> None:
    """Depthwise 3x3 (stride 1, odd width: a masked last vector), stride 2 (shuffled columns),
    dilation 2 with 5-wide kernels (odd tap pairs), 2 groups of 3 channels with 1x2 kernels,
    16-bit weights, and a depthwise conv whose residual add is fused into the kernel."""
    m = GraphMaker((6, 9, 11), F(8, 4), seed=5)
    h = m.conv_general("dw1", "input", 6, F(8, 6), F(8, 3), kernel=(3, 3), padding=(1, 1), groups=6, relu=True)
    h = m.conv_general("dw2", h, 12, F(7, 5), F(8, 3), kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=6)
    h = m.conv_general("dil", h, 12, F(6, 4), F(8, 2), kernel=(3, 5), padding=(2, 4), dilation=(2, 2), groups=12)
    h = m.conv_general("g2", h, 4, F(16, 13), F(8, 3), kernel=(1, 2), stride=(1, 2), groups=2, relu=True)
    d = m.conv_general("dw3", h, 4, F(8, 7), F(8, 3), kernel=(3, 3), padding=(1, 1), groups=4, relu=False)
    graph = m.graph(m.add("res", d, h, F(8, 2)))
    mod, _ = lower(graph, resolve_target("host"))
    names = [gv.name_hint for gv in mod.functions]
    assert sum(n.startswith("fxq_gconv2d") for n in names) == 5 and not any(n.startswith("fxq_add") for n in names)
    _exact(graph, tmp_path)


def test_elementwise_and_layout_ops(tmp_path: Path) -> None:
    """clamp (ReLU6, one-sided), 8-bit tables, a squeeze-excitation mul, a 3-input cat of three
    formats, a channel shuffle (reshape / transpose / reshape) and nearest upsampling."""
    m = GraphMaker((4, 5, 6), F(8, 4), seed=7)
    r6 = m.clamp("relu6", "input", F(8, 4), 0.0, 6.0)
    lo = m.clamp("floor", "input", F(6, 3), -1.0, None)
    sig = m.lut("sigmoid", "input", "sigmoid", F(8, 7))
    hsw = m.lut("hswish", lo, "hardswish", F(8, 4))
    gate = m.pool_ceil("squeeze", sig, "avgpool2d", kernel=(5, 6), stride=(5, 6), out_fmt=F(8, 7))
    se = m.mul("excite", hsw, gate, F(8, 4), relu=True)
    cat = m.cat("cat", (r6, se, lo), F(7, 3))
    g = m.reshape("split", cat, (3, 4, 5, 6))
    g = m.transpose("shuffle", g, (1, 0, 2, 3))
    g = m.reshape("merge", g, (12, 5, 6))
    _exact(m.graph(m.upsample("up", g, (2, 3))), tmp_path)


def test_windows_any_divisor_dilation_ceil_and_conv_transpose(tmp_path: Path) -> None:
    """3x3 / stride 2 / padding 1 / ceil-mode average (divisors 9, 6, 4 and the edge windows), a 7x7
    global average, dilated ceil-mode max pooling, and a grouped ConvTranspose2d."""
    m = GraphMaker((4, 7, 7), F(8, 4), seed=9)
    a = m.pool_ceil("avg", "input", "avgpool2d", kernel=(3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=True,
                    out_fmt=F(8, 5))
    g = m.pool_ceil("global", "input", "avgpool2d", kernel=(7, 7), stride=(7, 7), out_fmt=F(8, 6))
    x = m.pool_ceil("max", "input", "maxpool2d", kernel=(3, 2), stride=(2, 2), padding=(1, 1), dilation=(2, 1),
                    ceil_mode=True)
    x = m.mul("gate", x, g, F(8, 4))
    c = m.cat("both", (a, m.requantize("a6", a, F(6, 3))), F(8, 4))
    up = m.conv_transpose("up", c, 4, F(6, 5), F(8, 3), kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                          output_padding=(1, 1), groups=2, relu=True)
    _exact(m.graph(up, x), tmp_path)


def test_check_refuses_layouts_without_a_kernel() -> None:
    m = GraphMaker((4, 3, 3), F(8, 4), seed=1)
    flat = m.flatten("flat", "input")
    v = m.reshape("vec", flat, (36,))
    graph = m.graph(m._op("outer", "mul", ("input", v), (4, 3, 36), F(8, 4)))
    (problem,) = CpuTarget().check(graph)
    assert problem.layer == "outer" and "broadcasts equal-rank shapes only" in problem.reason


def test_depthwise_bench_is_verified_and_beats_dense() -> None:
    """The layer benchmark checks both TVM kernels against IntegerGraph.run before timing them."""
    from fxquant.backends.cpu.bench import bench_depthwise

    result = bench_depthwise(channels=16, size=16, stride=2, threads=1, budget_s=0.3)
    assert set(result["p50_us"]) == {"ORT FP32", "depthwise", "dense zeros"}
    assert result["depthwise_speedup_vs_dense"] > 0 and result["machine"]["threads"] == 1


def test_patch_convs_lower_to_patches_and_linear(tmp_path: Path) -> None:
    """Convs whose stride is their kernel (ViT patch embeddings): 4x4 patches of 3 channels with ReLU,
    non-square 2x4 patches with 16-bit weights and no bias, one 16 wide (whole-vector copies); each
    is ``fxq_patches`` + a linear kernel + a transpose back to NCHW, bit-exact. A padded conv with
    the same stride stays a conv."""
    m = GraphMaker((3, 8, 32), F(8, 4), seed=6)
    a = m.conv_general("p4", "input", 8, F(8, 6), F(8, 3), kernel=(4, 4), stride=(4, 4), relu=True)
    b = m.conv_general("p24", a, 6, F(16, 13), F(8, 3), kernel=(2, 4), stride=(2, 4), bias=False)
    c = m.conv_general("p16", "input", 4, F(7, 5), F(8, 2), kernel=(2, 16), stride=(2, 16))
    d = m.conv_general("padded", "input", 4, F(7, 5), F(8, 2), kernel=(4, 4), stride=(4, 4), padding=(1, 1))
    graph = m.graph(b, c, d)
    mod, _ = lower(graph, resolve_target("host"))
    names = [gv.name_hint for gv in mod.functions]
    assert sum(n.startswith("fxq_patches") for n in names) == 3, names
    assert sum(n.startswith("fxq_conv2d") for n in names) == 1, names
    _exact(graph, tmp_path)
