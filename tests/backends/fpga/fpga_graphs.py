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
