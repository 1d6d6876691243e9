"""Hand-built IntegerGraphs with random integer weights, and sample inputs (exporter tests, benchmarks)."""

from __future__ import annotations

import math

import numpy as np

from fxquant.fixed_point import FixedPoint
from fxquant.integer_graph import IntegerGraph, Op, Value

F = FixedPoint


def sample_inputs(graph: IntegerGraph, n: int = 16, seed: int = 1, spread: float = 3.0) -> np.ndarray:
    """Float inputs wide enough that the input quantizer saturates on some elements."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *graph.inputs[0].shape)) * spread).astype(np.float32)


class GraphMaker:
    """Appends ops to a growing IntegerGraph; each method returns the new value's name."""

    def __init__(self, shape: tuple[int, ...], fmt: FixedPoint, seed: int = 0, name: str = "input") -> None:
        self.rng = np.random.default_rng(seed)
        self.inputs = [Value(name, shape, fmt)]
        self.values = {name: self.inputs[0]}
        self.ops: list[Op] = []
        self.layers: dict[str, dict] = {}

    def _rand(self, fmt: FixedPoint, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.integers(fmt.qmin, fmt.qmax + 1, size=shape, dtype=np.int64)

    def _op(self, name: str, kind: str, inputs: tuple[str, ...], shape: tuple[int, ...], out_fmt: FixedPoint,
            **kw) -> str:
        self.values[name] = Value(name, shape, out_fmt)
        self.ops.append(Op(name, kind, inputs, name, out_fmt, **kw))
        layer = {"act": out_fmt.to_dict()}
        if kw.get("weight_fmt") is not None:
            layer["weight"] = kw["weight_fmt"].to_dict()
        self.layers[name] = layer
        return name

    def _bias(self, src: str, w_fmt: FixedPoint, n: int) -> np.ndarray:
        span = 1 << (self.values[src].fmt.bits + w_fmt.bits)
        return self.rng.integers(-span, span, size=n, dtype=np.int64)

    def conv(self, name: str, src: str, out_ch: int, w_fmt: FixedPoint, out_fmt: FixedPoint, *, k: int = 3,
             stride: int = 1, pad: int = 1, relu: bool = True, bias: bool = True) -> str:
        c, h, w = self.values[src].shape
        oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
        return self._op(name, "conv2d", (src,), (out_ch, oh, ow), out_fmt, weight=self._rand(w_fmt, (out_ch, c, k, k)),
                        weight_fmt=w_fmt, bias=self._bias(src, w_fmt, out_ch) if bias else None,
                        attrs={"stride": (stride, stride), "padding": (pad, pad), "relu": relu})

    def linear(self, name: str, src: str, out_f: int, w_fmt: FixedPoint, out_fmt: FixedPoint, *,
               relu: bool = False, bias: bool = True) -> str:
        (n,) = self.values[src].shape
        return self._op(name, "linear", (src,), (out_f,), out_fmt, weight=self._rand(w_fmt, (out_f, n)),
                        weight_fmt=w_fmt, bias=self._bias(src, w_fmt, out_f) if bias else None,
                        attrs={"relu": relu})

    def pool(self, name: str, src: str, kind: str = "maxpool2d", k: int = 2, out_fmt: FixedPoint | None = None) -> str:
        c, h, w = self.values[src].shape
        return self._op(name, kind, (src,), (c, h // k, w // k), out_fmt or self.values[src].fmt,
                        attrs={"kernel": (k, k)})

    def flatten(self, name: str, src: str) -> str:
        shape = self.values[src].shape
        return self._op(name, "flatten", (src,), (math.prod(shape),), self.values[src].fmt)

    def relu(self, name: str, src: str) -> str:
        return self._op(name, "relu", (src,), self.values[src].shape, self.values[src].fmt)

    def add(self, name: str, a: str, b: str, out_fmt: FixedPoint, relu: bool = True) -> str:
        return self._op(name, "add", (a, b), self.values[a].shape, out_fmt, attrs={"relu": relu})

    def cat(self, name: str, srcs: tuple[str, ...], out_fmt: FixedPoint, relu: bool = False) -> str:
        shapes = [self.values[s].shape for s in srcs]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        return self._op(name, "cat", srcs, shape, out_fmt, attrs={"dim": 1, "relu": relu})

    def requantize(self, name: str, src: str, out_fmt: FixedPoint, relu: bool = False) -> str:
        return self._op(name, "requantize", (src,), self.values[src].shape, out_fmt, attrs={"relu": relu})

    def reshape(self, name: str, src: str, shape: tuple[int, ...]) -> str:
        return self._op(name, "reshape", (src,), shape, self.values[src].fmt, attrs={"shape": shape})

    def mul_pow2(self, name: str, src: str, exponent: int) -> str:
        fmt = self.values[src].fmt
        return self._op(name, "mul_pow2", (src,), self.values[src].shape, F(fmt.bits, fmt.frac_bits - exponent),
                        attrs={"exponent": exponent})

    def matmul(self, name: str, a: str, b: str, out_fmt: FixedPoint) -> str:
        return self._op(name, "matmul", (a, b), (*self.values[a].shape[:-1], self.values[b].shape[-1]), out_fmt)

    def graph(self, *outputs: str) -> IntegerGraph:
        return IntegerGraph(list(self.inputs), list(self.ops), list(outputs), dict(self.values), dict(self.layers))


def mlp(seed: int = 0) -> IntegerGraph:
    m = GraphMaker((16,), F(8, 4), seed)
    h = m.linear("fc1", "input", 32, F(8, 7), F(8, 3), relu=True)
    h = m.linear("fc2", h, 32, F(8, 7), F(8, 3), relu=True)
    return m.graph(m.linear("fc3", h, 10, F(8, 7), F(8, 2)))


def cnn(seed: int = 0, act: FixedPoint = F(8, 3)) -> IntegerGraph:
    """digits-CNN shaped: conv → relu → maxpool → conv → relu → maxpool → flatten → linear."""
    m = GraphMaker((1, 8, 8), F(8, 4), seed)
    h = m.pool("pool1", m.conv("conv1", "input", 8, F(8, 6), act))
    h = m.pool("pool2", m.conv("conv2", h, 16, F(8, 7), act))
    return m.graph(m.linear("fc", m.flatten("flat", h), 10, F(8, 7), F(8, 2)))


def residual(seed: int = 0) -> IntegerGraph:
    """conv → [conv → conv] + skip → relu → cat → avgpool → flatten → linear."""
    m = GraphMaker((3, 8, 8), F(8, 5), seed)
    stem = m.conv("stem", "input", 8, F(8, 6), F(8, 3))
    h = m.conv("block.conv1", stem, 8, F(8, 7), F(8, 3))
    h = m.conv("block.conv2", h, 8, F(8, 7), F(8, 2), relu=False)
    s = m.add("block.add", h, stem, F(8, 3))
    c = m.cat("cat", (s, stem), F(8, 3))
    p = m.pool("avgpool", c, "avgpool2d", 2, F(8, 3))
    return m.graph(m.linear("fc", m.flatten("flat", p), 10, F(8, 7), F(8, 2), bias=False))


def mixed(seed: int = 0) -> IntegerGraph:
    """2..8-bit weights and activations, negative FL, FL > BW, a 12-bit (int16) tail, a matmul."""
    m = GraphMaker((2, 8, 8), F(6, 3), seed)
    h = m.conv("conv1", "input", 4, F(3, 2), F(5, 1))                   # int4 weights, 5-bit act
    h = m.conv("conv2", h, 6, F(2, 1), F(7, -1), relu=False)            # 2-bit weights, FL < 0
    h = m.relu("relu2", h)
    h = m.pool("pool", h)
    a = m.conv("conv3", h, 4, F(4, 5), F(3, 0), k=1, pad=0)              # FL_w > BW_w, 3-bit act
    b = m.requantize("skip", h, F(4, -2))
    s = m.add("add", a, m.conv("conv4", b, 4, F(5, 4), F(6, 2), k=1, pad=0), F(4, 1), relu=False)
    f = m.flatten("flat", s)
    h = m.linear("fc1", f, 16, F(6, 5), F(2, 3), relu=True)              # 2-bit act, FL > BW
    h = m.linear("fc2", h, 10, F(8, 9), F(12, 8))                        # 12 bits: int16
    return m.graph(m.requantize("out", h, F(16, 10)))


def matmul_graph(seed: int = 0) -> IntegerGraph:
    m = GraphMaker((4, 4), F(8, 5), seed)
    p = m.matmul("mm", "input", "input", F(8, 4))
    return m.graph(m.flatten("flat", m.requantize("rq", p, F(6, 3))))


def reshaped(seed: int = 0) -> IntegerGraph:
    """conv → [conv] + 4·conv (``mul_pow2``, the front end's ``torch.add(a, b, alpha=4)``) → reshape
    (4, 4, 4) → (8, 8) → reshape to (64,) (``view``) → linear."""
    m = GraphMaker((2, 4, 4), F(8, 4), seed)
    h = m.conv("conv", "input", 4, F(8, 6), F(8, 3))
    s = m.mul_pow2("conv.alpha", h, 2)
    h = m.add("add", m.conv("conv2", h, 4, F(8, 7), F(8, 3), relu=False), s, F(8, 1))
    h = m.reshape("view", h, (8, 8))
    h = m.reshape("vec", h, (64,))
    return m.graph(m.linear("fc", h, 10, F(8, 7), F(8, 2)))
