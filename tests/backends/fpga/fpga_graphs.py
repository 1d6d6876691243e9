"""Hand-built integer graphs for the FPGA backend tests: random integer weights, mixed 2..16-bit
formats with negative FL and FL > BW, every supported op kind. Imported by the test modules
(``from fpga_graphs import ...``); builds are cheap, so each test builds what it needs."""

from __future__ import annotations

import numpy as np

from fxquant.fixed_point import FixedPoint
from fxquant.integer_graph import IntegerGraph, Op, Value


class GraphBuilder:
    """Appends ops to an IntegerGraph with seeded random integer weights."""

    def __init__(self, name: str, shape: tuple[int, ...], fmt: FixedPoint, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.input = Value(name, shape, fmt)
        self.values = {name: self.input}
        self.ops: list[Op] = []

    def _ints(self, fmt: FixedPoint, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.integers(fmt.qmin, fmt.qmax + 1, size=shape, dtype=np.int64)

    def add(self, name: str, kind: str, inputs: tuple[str, ...], shape: tuple[int, ...], out_fmt: FixedPoint,
            weight_shape: tuple[int, ...] | None = None, weight_fmt: FixedPoint | None = None,
            bias: bool = False, **attrs: object) -> str:
        weight = self._ints(weight_fmt, weight_shape) if weight_shape is not None and weight_fmt else None
        b = self.rng.integers(-(1 << 12), 1 << 12, size=weight_shape[0]) if bias and weight_shape else None
        self.ops.append(Op(name, kind, inputs, name, out_fmt, weight, weight_fmt, b, dict(attrs)))
        self.values[name] = Value(name, shape, out_fmt)
        return name

    def reshape(self, name: str, src: str, shape: tuple[int, ...]) -> str:
        fmt = self.values[src].fmt
        self.ops.append(Op(name, "reshape", (src,), name, fmt, attrs={"shape": shape}))
        self.values[name] = Value(name, shape, fmt)
        return name

    def graph(self, output: str) -> IntegerGraph:
        return IntegerGraph([self.input], self.ops, [output], self.values)

    def inputs(self, n: int) -> np.ndarray:
        return self._ints(self.input.fmt, (n, *self.input.shape))


def fp(bits: int, frac_bits: int) -> FixedPoint:
    return FixedPoint(bits, frac_bits)


def build_mlp(seed: int = 1) -> tuple[IntegerGraph, GraphBuilder]:
    g = GraphBuilder("input", (32,), fp(6, 3), seed)
    h = g.add("fc1", "linear", ("input",), (24,), fp(8, 2), (24, 32), fp(5, 6), bias=True, relu=True)
    h = g.add("fc2", "linear", (h,), (16,), fp(12, -1), (16, 24), fp(3, -1))
    h = g.add("fc2.q", "requantize", (h,), (16,), fp(4, -3), relu=True)
    h = g.add("fc3", "linear", (h,), (10,), fp(16, 2), (10, 16), fp(16, 14), bias=True)
    return g.graph(h), g


def build_cnn(seed: int = 2) -> tuple[IntegerGraph, GraphBuilder]:
    """1x8x8 -> conv3x3 -> relu -> maxpool2 -> conv3x3 (ReLU fused) -> flatten -> linear."""
    g = GraphBuilder("input", (1, 8, 8), fp(8, 7), seed)
    h = g.add("conv1", "conv2d", ("input",), (4, 8, 8), fp(6, 5), (4, 1, 3, 3), fp(4, 5), bias=False,
              padding=(1, 1))
    h = g.add("relu1", "relu", (h,), (4, 8, 8), fp(6, 5))
    h = g.add("pool1", "maxpool2d", (h,), (4, 4, 4), fp(6, 5), kernel=(2, 2))
    h = g.add("conv2", "conv2d", (h,), (6, 2, 2), fp(10, -1), (6, 4, 3, 3), fp(7, -2), relu=True)
    h = g.add("flatten", "flatten", (h,), (24,), fp(10, -1))
    h = g.add("fc", "linear", (h,), (10,), fp(16, 4), (10, 24), fp(2, 3), bias=True)
    return g.graph(h), g


def build_residual(seed: int = 3) -> tuple[IntegerGraph, GraphBuilder]:
    """conv -> relu -> add(input) -> cat(input) -> grouped dilated strided conv -> avgpool -> maxpool(pad)
    -> linear -> requantize."""
    g = GraphBuilder("x", (2, 6, 6), fp(8, 4), seed)
    h = g.add("c1", "conv2d", ("x",), (2, 6, 6), fp(9, 3), (2, 2, 3, 3), fp(8, 6), bias=True, padding=(1, 1))
    h = g.add("r1", "relu", (h,), (2, 6, 6), fp(9, 3))
    h = g.add("add", "add", ("x", h), (2, 6, 6), fp(7, 1), relu=True)
    h = g.add("cat", "cat", (h, "x"), (4, 6, 6), fp(6, 0), dim=1)
    h = g.add("c2", "conv2d", (h,), (4, 3, 3), fp(6, -1), (4, 2, 3, 3), fp(11, 9), bias=True,
              stride=(2, 2), padding=(2, 2), dilation=(2, 2), groups=2)
    h = g.add("avg", "avgpool2d", (h,), (4, 2, 2), fp(5, -1), kernel=(2, 2), stride=(1, 1))
    h = g.add("mp", "maxpool2d", (h,), (4, 2, 2), fp(5, -1), kernel=(3, 3), stride=(1, 1), padding=(1, 1))
    h = g.add("flat", "flatten", (h,), (16,), fp(5, -1))
    h = g.add("fc", "linear", (h,), (3,), fp(12, 6), (3, 16), fp(10, 12))
    h = g.add("out.q", "requantize", (h,), (3,), fp(3, -1))
    return g.graph(h), g


def build_vision(seed: int = 4) -> tuple[IntegerGraph, GraphBuilder]:
    """The vision-zoo kinds in one graph, mixed formats (FL < 0, FL > BW, 2..16 bits):
    conv -> ReLU6 clamp -> depthwise conv -> hardswish table -> SE gate (global 3x3 average, 1x1 conv,
    sigmoid table, broadcast mul) -> cat of 3 -> channel shuffle (reshape, transpose, reshape) ->
    ceil-mode dilated max pool -> nearest upsample -> transposed conv -> 3x3 padded average (9 cells,
    padding counted) -> mul_pow2 -> flatten."""
    from fxquant.elementwise import lut_attrs

    g = GraphBuilder("x", (2, 6, 6), fp(8, 4), seed)
    h = g.add("conv", "conv2d", ("x",), (4, 6, 6), fp(9, 3), (4, 2, 3, 3), fp(7, 6), bias=True, padding=(1, 1))
    h = g.add("relu6", "clamp", (h,), (4, 6, 6), fp(8, 4), lo=0, hi=96)
    h = g.add("dw", "conv2d", (h,), (4, 3, 3), fp(10, 5), (4, 1, 3, 3), fp(6, 5), bias=True, padding=(1, 1),
              stride=(2, 2), groups=4)
    act = g.add("hswish", "lut", (h,), (4, 3, 3), fp(7, 3), **lut_attrs("hardswish", fp(10, 5), fp(7, 3)))
    sq = g.add("squeeze", "avgpool2d", (act,), (4, 1, 1), fp(8, 4), kernel=(3, 3))
    e = g.add("expand", "conv2d", (sq,), (4, 1, 1), fp(6, 2), (4, 4, 1, 1), fp(5, 4), bias=True)
    gate = g.add("gate", "lut", (e,), (4, 1, 1), fp(8, 8), **lut_attrs("sigmoid", fp(6, 2), fp(8, 8)))
    se = g.add("excite", "mul", (act, gate), (4, 3, 3), fp(8, 9), relu=True)
    lo = g.add("lo", "clamp", (act,), (4, 3, 3), fp(5, -1), lo=None, hi=3)
    cat = g.add("cat", "cat", (se, act, lo), (12, 3, 3), fp(9, 5), dim=1)
    h = g.reshape("split", cat, (3, 4, 9))
    h = g.add("shuffle", "transpose", (h,), (4, 3, 9), fp(9, 5), perm=(1, 0, 2))
    h = g.reshape("merge", h, (12, 3, 3))
    h = g.add("mp", "maxpool2d", (h,), (12, 2, 2), fp(9, 5), kernel=(2, 2), stride=(2, 2), dilation=(1, 1),
              ceil_mode=True)
    h = g.add("up", "upsample_nearest", (h,), (12, 4, 6), fp(9, 5), scale=(2, 3))
    h = g.add("deconv", "conv_transpose2d", (h,), (6, 8, 12), fp(12, 4), (12, 2, 3, 3), fp(5, 3), bias=True,
              stride=(2, 2), padding=(1, 1), output_padding=(1, 1), groups=3)
    g.ops[-1].bias = g.rng.integers(-(1 << 12), 1 << 12, size=6)  # one per output channel (weight: C_in first)
    h = g.add("avg", "avgpool2d", (h,), (6, 4, 6), fp(10, 5), kernel=(3, 3), stride=(2, 2), padding=(1, 1))
    h = g.add("half", "mul_pow2", (h,), (6, 4, 6), fp(10, 6), exponent=-1)
    h = g.add("flat", "flatten", (h,), (144,), fp(10, 6))
    return g.graph(h), g
