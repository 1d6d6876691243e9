"""The one graph zoo: every hand-built IntegerGraph case, run on every target by the conformance suite.

Like ``onnx/backend/test/case``: a case is a name and a builder ``() -> (IntegerGraph, inputs)``
(``inputs``: float model inputs, one array per graph input, batch first). The suite
(``test_conformance.py``) runs every case on every registry target against
:meth:`IntegerGraph.run`; what a target cannot build is declared in its ``EXPECTED_UNSUPPORTED``
table, never skipped. Adding an op or a format corner = adding a case here.

Three groups:

* the graphs the exporter and backend tests were written with (``tests/export/integer_graphs.py``,
  ``tests/backends/{cpu,cuda,fpga}/*_graphs.py``), copied verbatim with their builders
  (:class:`GraphMaker`, :class:`GraphBuilder`) so those helpers can import from here;
* one small case per op kind and attribute (stride, padding, dilation, groups, windows, ``cat``
  of differently formatted inputs, ``matmul`` of two activations, ...);
* number-format corners: widths 2..16, FL < 0, FL > BW, saturating inputs, accumulators at the
  edge of int32 (just inside, and just outside: the latter every int32 target must refuse).

Inputs (:func:`format_inputs`) are drawn per input format so that every case exercises saturation
of the input quantizer (samples 0 and 1 are all below / above the range), exact rounding ties
(sample 2 sits on half-LSB points) and ordinary values. Graphs stay tiny: TVM, nvcc and g++
builds dominate the suite's runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fxquant.elementwise import lut_attrs
from fxquant.fixed_point import FixedPoint, quantize_int
from fxquant.integer_graph import OP_KINDS, IntegerGraph, Op, Value, pool_output_size

F = FixedPoint
N_SAMPLES = 8


# =========================================================================== inputs
def sample_inputs(graph: IntegerGraph, n: int = 16, seed: int = 1, spread: float = 3.0) -> np.ndarray:
    """Float inputs wide enough that the input quantizer saturates on some elements."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *graph.inputs[0].shape)) * spread).astype(np.float32)


def format_inputs(graph: IntegerGraph, n: int = N_SAMPLES, seed: int = 0) -> list[np.ndarray]:
    """Float inputs for every graph input, scaled to its ``<BW,FL>``.

    Sample 0: far below the range (saturates to ``qmin``); sample 1: far above (``qmax``);
    sample 2: half-LSB points ``(k + 1/2) 2^-FL`` (ties, rounded to even); the rest normal with
    a standard deviation of 0.6 of the range (a few saturate). float64, so that every tie is exact.
    """
    rng = np.random.default_rng(seed)
    xs = []
    for v in graph.inputs:
        lsb = math.ldexp(1.0, -v.fmt.frac_bits)
        top = (v.fmt.qmax + 1) * lsb
        x = rng.standard_normal((n, *v.shape)) * 0.6 * top
        if n > 0:
            x[0] = -4 * top
        if n > 1:
            x[1] = 4 * top
        if n > 2:
            x[2] = (rng.integers(v.fmt.qmin, v.fmt.qmax, size=v.shape) + 0.5) * lsb
        xs.append(x.astype(np.float64))
    return xs


# =========================================================================== builders
class GraphMaker:
    """Appends ops to a growing IntegerGraph; each method returns the new value's name.

    (Copied from ``tests/export/integer_graphs.py``.)
    """

    def __init__(self, shape: tuple[int, ...], fmt: FixedPoint, seed: int = 0, name: str = "input") -> None:
        self.rng = np.random.default_rng(seed)
        self.inputs = [Value(name, shape, fmt)]
        self.values = {name: self.inputs[0]}
        self.ops: list[Op] = []
        self.layers: dict[str, dict] = {}

    def input(self, name: str, shape: tuple[int, ...], fmt: FixedPoint) -> str:
        """A further graph input."""
        self.inputs.append(Value(name, shape, fmt))
        self.values[name] = self.inputs[-1]
        return name

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

    def conv_general(self, name: str, src: str, out_ch: int, w_fmt: FixedPoint, out_fmt: FixedPoint, *,
                     kernel: tuple[int, int], stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                     dilation: tuple[int, int] = (1, 1), groups: int = 1, relu: bool = False,
                     bias: bool = True) -> str:
        """conv2d with every attribute spelled out (non-square kernels, strides, dilation, groups)."""
        c, h, w = self.values[src].shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return self._op(name, "conv2d", (src,), (out_ch, oh, ow), out_fmt,
                        weight=self._rand(w_fmt, (out_ch, c // groups, kh, kw)), weight_fmt=w_fmt,
                        bias=self._bias(src, w_fmt, out_ch) if bias else None,
                        attrs={"stride": stride, "padding": padding, "dilation": dilation, "groups": groups,
                               "relu": relu})

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

    def pool_general(self, name: str, src: str, kind: str, *, kernel: tuple[int, int],
                     stride: tuple[int, int] | None = None, padding: tuple[int, int] = (0, 0),
                     out_fmt: FixedPoint | None = None) -> str:
        """A pool with every attribute spelled out (overlapping windows, padding, non-square)."""
        c, h, w = self.values[src].shape
        (kh, kw), (ph, pw) = kernel, padding
        sh, sw = stride or kernel
        shape = (c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
        attrs = {"kernel": kernel, "stride": (sh, sw), "padding": padding}
        return self._op(name, kind, (src,), shape, out_fmt or self.values[src].fmt, attrs=attrs)

    def pool_ceil(self, name: str, src: str, kind: str, *, kernel: tuple[int, int], stride: tuple[int, int],
                  padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1), ceil_mode: bool = False,
                  out_fmt: FixedPoint | None = None) -> str:
        """A pool with dilation and ``ceil_mode`` (torch's output size)."""
        c, h, w = self.values[src].shape
        oh, ow = (pool_output_size(n, k, s, p, d, ceil_mode)
                  for n, k, s, p, d in zip((h, w), kernel, stride, padding, dilation))
        attrs = {"kernel": kernel, "stride": stride, "padding": padding, "ceil_mode": ceil_mode}
        if dilation != (1, 1):
            attrs["dilation"] = dilation
        return self._op(name, kind, (src,), (c, oh, ow), out_fmt or self.values[src].fmt, attrs=attrs)

    def clamp(self, name: str, src: str, out_fmt: FixedPoint, lo: float | None, hi: float | None) -> str:
        """requantize to ``out_fmt`` and clip to ``[lo, hi]`` (real bounds, rounded onto the output grid)."""
        def grid(v: float | None) -> int | None:
            return None if v is None else int(quantize_int(np.array([v]), out_fmt)[0])
        return self._op(name, "clamp", (src,), self.values[src].shape, out_fmt,
                        attrs={"lo": grid(lo), "hi": grid(hi)})

    def lut(self, name: str, src: str, function: str, out_fmt: FixedPoint, params: dict | None = None) -> str:
        return self._op(name, "lut", (src,), self.values[src].shape, out_fmt,
                        attrs=lut_attrs(function, self.values[src].fmt, out_fmt, params))

    def mul(self, name: str, a: str, b: str, out_fmt: FixedPoint, relu: bool = False) -> str:
        shape = tuple(np.broadcast_shapes(self.values[a].shape, self.values[b].shape))
        return self._op(name, "mul", (a, b), shape, out_fmt, attrs={"relu": relu})

    def transpose(self, name: str, src: str, perm: tuple[int, ...]) -> str:
        shape = self.values[src].shape
        return self._op(name, "transpose", (src,), tuple(shape[p] for p in perm), self.values[src].fmt,
                        attrs={"perm": perm})

    def reshape(self, name: str, src: str, shape: tuple[int, ...]) -> str:
        return self._op(name, "reshape", (src,), shape, self.values[src].fmt, attrs={"shape": shape})

    def upsample(self, name: str, src: str, scale: tuple[int, int]) -> str:
        c, h, w = self.values[src].shape
        return self._op(name, "upsample_nearest", (src,), (c, h * scale[0], w * scale[1]), self.values[src].fmt,
                        attrs={"scale": scale})

    def conv_transpose(self, name: str, src: str, out_ch: int, w_fmt: FixedPoint, out_fmt: FixedPoint, *,
                       kernel: tuple[int, int], stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                       output_padding: tuple[int, int] = (0, 0), dilation: tuple[int, int] = (1, 1),
                       groups: int = 1, relu: bool = False, bias: bool = True) -> str:
        """ConvTranspose2d: weight ``(C_in, C_out/groups, kh, kw)``, torch's output size."""
        c, h, w = self.values[src].shape
        oh, ow = ((n - 1) * s - 2 * p + d * (k - 1) + op + 1
                  for n, s, p, d, k, op in zip((h, w), stride, padding, dilation, kernel, output_padding))
        return self._op(name, "conv_transpose2d", (src,), (out_ch, oh, ow), out_fmt,
                        weight=self._rand(w_fmt, (c, out_ch // groups, *kernel)), weight_fmt=w_fmt,
                        bias=self._bias(src, w_fmt, out_ch) if bias else None,
                        attrs={"stride": stride, "padding": padding, "output_padding": output_padding,
                               "dilation": dilation, "groups": groups, "relu": relu})

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

    def matmul(self, name: str, a: str, b: str, out_fmt: FixedPoint) -> str:
        return self._op(name, "matmul", (a, b), (*self.values[a].shape[:-1], self.values[b].shape[-1]), out_fmt)

    def dense(self, name: str, src: str, out_f: int, w_fmt: FixedPoint, out_fmt: FixedPoint, *, relu: bool = False,
              bias: bool = True, weight: np.ndarray | None = None) -> str:
        """``linear`` on the last dimension of a value of any rank (a transformer's projections)."""
        shape = self.values[src].shape
        w = self._rand(w_fmt, (out_f, shape[-1])) if weight is None else weight
        return self._op(name, "linear", (src,), (*shape[:-1], w.shape[0]), out_fmt, weight=w, weight_fmt=w_fmt,
                        bias=self._bias(src, w_fmt, w.shape[0]) if bias else None, attrs={"relu": relu})

    def embedding(self, name: str, ids: str, vocab: int, dim: int, w_fmt: FixedPoint,
                  out_fmt: FixedPoint | None = None) -> str:
        """A ``(vocab, dim)`` table gathered by the token ids ``ids`` (exact unless ``out_fmt`` differs)."""
        return self._op(name, "embedding", (ids,), (*self.values[ids].shape, dim), out_fmt or w_fmt,
                        weight=self._rand(w_fmt, (vocab, dim)), weight_fmt=w_fmt)

    def constant(self, name: str, ref: str, shape: tuple[int, ...], fmt: FixedPoint) -> str:
        """Random integers of ``shape`` at ``fmt`` in every sample (``ref`` gives only the batch size)."""
        return self._op(name, "constant", (ref,), shape, fmt, weight=self._rand(fmt, shape), weight_fmt=fmt)

    def softmax(self, name: str, src: str, out_fmt: FixedPoint, *, mask: str | None = None,
                causal: bool = False) -> str:
        shape = self.values[src].shape
        return self._op(name, "softmax", (src,) + ((mask,) if mask else ()), shape, out_fmt,
                        attrs={"dim": len(shape), "causal": causal})

    def layernorm(self, name: str, src: str, w_fmt: FixedPoint, out_fmt: FixedPoint, *, eps: float = 1e-5,
                  bias: bool = True) -> str:
        """gamma random in ``w_fmt``; beta int32 on ``FL_w + LAYERNORM_FRAC_BITS``, real values in (-2, 2)."""
        from fxquant.fixed_point import LAYERNORM_FRAC_BITS, layernorm_eps

        shape, fmt = self.values[src].shape, self.values[src].fmt
        span = 1 << (w_fmt.frac_bits + LAYERNORM_FRAC_BITS + 1)
        beta = self.rng.integers(-span, span, size=shape[-1], dtype=np.int64) if bias else None
        return self._op(name, "layernorm", (src,), shape, out_fmt, weight=self._rand(w_fmt, (shape[-1],)),
                        weight_fmt=w_fmt, bias=beta,
                        attrs={"dim": len(shape), "eps": layernorm_eps(eps, shape[-1], fmt)})

    def slice(self, name: str, src: str, dim: int, start: int, stop: int, step: int = 1) -> str:
        """``x[..., start:stop:step, ...]`` on array axis ``dim`` (the batch is axis 0)."""
        shape = list(self.values[src].shape)
        shape[dim - 1] = len(range(start, stop, step))
        return self._op(name, "slice", (src,), tuple(shape), self.values[src].fmt,
                        attrs={"dim": dim, "start": start, "stop": stop, "step": step})

    def select(self, name: str, src: str, dim: int, index: int) -> str:
        """``x.select(dim, index)``: the axis removed (``x[:, 0]`` is ``dim=1, index=0``)."""
        shape = self.values[src].shape
        return self._op(name, "slice", (src,), shape[:dim - 1] + shape[dim:], self.values[src].fmt,
                        attrs={"dim": dim, "index": index})

    def graph(self, *outputs: str) -> IntegerGraph:
        return IntegerGraph(list(self.inputs), list(self.ops), list(outputs), dict(self.values), dict(self.layers))


class GraphBuilder:
    """Appends ops to an IntegerGraph with seeded random integer weights.

    (Copied from ``tests/backends/fpga/fpga_graphs.py``.)
    """

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


# =========================================================================== tests/export/integer_graphs.py
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


# =========================================================================== tests/backends/cpu/cpu_graphs.py
def residual_block(seed: int = 0) -> IntegerGraph:
    """ResNet basic block with a strided 1x1 projection, then global average pool and a linear."""
    m = GraphMaker((3, 16, 16), F(8, 5), seed)
    stem = m.conv("stem", "input", 16, F(8, 7), F(8, 3))
    h = m.conv("b.conv1", stem, 32, F(8, 7), F(8, 3), stride=2)
    h = m.conv("b.conv2", h, 32, F(8, 7), F(8, 2), relu=False)
    s = m.conv("b.shortcut", stem, 32, F(8, 7), F(8, 4), k=1, stride=2, pad=0, relu=False)
    h = m.add("b.add", h, s, F(8, 3))
    p = m.pool("avgpool", h, "avgpool2d", 8, F(8, 3))
    return m.graph(m.linear("fc", m.flatten("flat", p), 10, F(8, 7), F(8, 2)))


def mixed_bits(seed: int = 0) -> IntegerGraph:
    """2-, 4- and 8-bit weights, 3..8-bit activations, negative FL and FL > BW, standalone ReLU."""
    m = GraphMaker((2, 8, 7), F(6, 3), seed)
    h = m.conv("conv1", "input", 4, F(4, 2), F(5, 1))
    h = m.conv("conv2", h, 6, F(2, 1), F(7, -1), relu=False)
    h = m.relu("relu2", h)
    h = m.pool("pool", h)
    a = m.conv("conv3", h, 4, F(4, 5), F(3, 0), k=1, pad=0)
    b = m.requantize("skip", h, F(4, -2))
    s = m.add("add", a, m.conv("conv4", b, 4, F(5, 4), F(6, 2), k=1, pad=0), F(4, 1), relu=False)
    h = m.linear("fc1", m.flatten("flat", s), 16, F(2, 1), F(5, 3), relu=True)
    h = m.linear("fc2", h, 24, F(4, 3), F(8, 3), relu=True)
    return m.graph(m.linear("fc3", h, 10, F(8, 9), F(8, 4)))


# =========================================================================== tests/backends/cuda/cuda_graphs.py
def residual_net(seed: int = 0) -> IntegerGraph:
    """Stem, a basic block with a strided 1x1 projection (both branches GEMMs), global avgpool, linear."""
    m = GraphMaker((3, 12, 12), F(8, 5), seed)
    stem = m.conv("stem", "input", 16, F(8, 7), F(8, 3))
    h = m.conv("b.conv1", stem, 24, F(8, 7), F(8, 3), stride=2)
    h = m.conv("b.conv2", h, 24, F(8, 7), F(8, 2), relu=False)
    s = m.conv("b.shortcut", stem, 24, F(8, 7), F(8, 4), k=1, stride=2, pad=0, relu=False)
    h = m.add("b.add", h, s, F(8, 3))
    h = m.conv("c.conv", h, 24, F(8, 7), F(8, 3), relu=False)
    h = m.add("c.add", h, s, F(7, 2))  # s is read twice: an identity-style skip, fused into c.conv
    p = m.pool("avgpool", h, "avgpool2d", 2, F(8, 3))
    return m.graph(m.linear("fc", m.flatten("flat", p), 10, F(8, 7), F(8, 2)))


def mixed_net(seed: int = 0) -> IntegerGraph:
    """2/4/8-bit weights (packed int4 GEMMs), 3..8-bit activations, FL < 0 and FL > BW, standalone
    ReLU and requantize, max pooling, an unfused add, odd shapes (K and O not tile multiples)."""
    m = GraphMaker((3, 9, 7), F(6, 3), seed)
    h = m.conv("conv1", "input", 5, F(4, 2), F(5, 1))
    h = m.conv("conv2", h, 6, F(2, 1), F(7, -1), relu=False)
    h = m.relu("relu2", h)
    h = m.pool("pool", h)
    a = m.requantize("skip", h, F(4, -2))
    s = m.add("add", h, a, F(5, 0), relu=False)
    h = m.linear("fc1", m.flatten("flat", s), 33, F(3, 1), F(5, 3), relu=True)
    h = m.linear("fc2", h, 20, F(8, 9), F(8, 3), relu=True)
    return m.graph(m.linear("fc3", h, 10, F(8, 7), F(8, 4)))


# =========================================================================== tests/backends/fpga/fpga_graphs.py
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


# =========================================================================== one case per op kind / attribute
# Node cases are chained into a few small graphs of ops every int8 target has: each case costs a
# TVM/nvcc/g++ build per target, and the suite must stay within its CI budget.
def conv_attrs() -> IntegerGraph:
    """dilation 2 + padding 2 (no bias, FL_w > BW_w) -> 3x2 kernel, stride (2, 1), padding (2, 0),
    ReLU -> pointwise 3-bit weights, no bias."""
    m = GraphMaker((2, 8, 8), F(6, 2), seed=12)
    h = m.conv_general("dilated", "input", 4, F(5, 7), F(7, 1), kernel=(3, 3), padding=(2, 2), dilation=(2, 2),
                       bias=False)
    h = m.conv_general("strided", h, 3, F(6, 5), F(8, 3), kernel=(3, 2), stride=(2, 1), padding=(2, 0), relu=True)
    return m.graph(m.conv("pointwise", h, 5, F(3, 2), F(6, 0), k=1, pad=0, relu=False, bias=False))


def conv_groups() -> IntegerGraph:
    """groups=2 (4 -> 4 channels) and depthwise (groups = channels)."""
    m = GraphMaker((4, 6, 6), F(8, 3), seed=13)
    h = m.conv_general("grouped", "input", 4, F(6, 5), F(8, 2), kernel=(3, 3), padding=(1, 1), groups=2, relu=True)
    return m.graph(m.conv_general("depthwise", h, 4, F(4, 3), F(6, 1), kernel=(3, 3), padding=(1, 1), groups=4))


def pools() -> IntegerGraph:
    """Overlapping 2x2 average (stride 1) -> 1x2 average -> 3x3 max, stride 2, padding 1 (padded cells
    never win) -> global 4x4 average (a sum of 16, shift 4) into a finer format."""
    m = GraphMaker((2, 9, 17), F(6, 2), seed=28)
    h = m.pool_general("avg_overlap", "input", "avgpool2d", kernel=(2, 2), stride=(1, 1), out_fmt=F(5, 0))
    h = m.pool_general("avg_1x2", h, "avgpool2d", kernel=(1, 2), out_fmt=F(6, 2))
    h = m.pool_general("max_pad", h, "maxpool2d", kernel=(3, 3), stride=(2, 2), padding=(1, 1))
    return m.graph(m.pool_general("avg_global", h, "avgpool2d", kernel=(4, 4), out_fmt=F(8, 5)))


def elementwise() -> IntegerGraph:
    """add of <6,2> and <8,6> (a left-shifting, saturating requantize) into <7,3>; requantize down by 5
    into FL < 0 (ties to even); standalone ReLU at FL < 0; add of <4,-2> and <6,2> with ReLU; flatten."""
    m = GraphMaker((3, 4, 4), F(8, 4), seed=21)
    a = m.conv("a", "input", 3, F(5, 4), F(6, 2), k=1, pad=0, relu=False)
    b = m.requantize("b", "input", F(8, 6))
    s = m.add("add", a, b, F(7, 3), relu=False)
    d = m.requantize("down", s, F(4, -2))
    e = m.relu("relu", d)
    t = m.add("add_relu", e, a, F(5, 0), relu=True)
    return m.graph(m.flatten("flat", t))


def matmul_two_inputs() -> IntegerGraph:
    """``a @ b`` of two graph inputs in different formats."""
    m = GraphMaker((3, 4), F(6, 2), seed=19, name="a")
    m.input("b", (4, 5), F(5, 3))
    return m.graph(m.matmul("mm", "a", "b", F(8, 3)))


def matmul_branches() -> IntegerGraph:
    """``a @ b`` of two activations computed from one input (a requantize and a relu branch)."""
    m = GraphMaker((4, 4), F(7, 3), seed=20)
    a = m.requantize("a", "input", F(5, 1))
    b = m.relu("b", "input")
    return m.graph(m.matmul("mm", a, b, F(8, 2)))


def add_two_inputs() -> IntegerGraph:
    """add of two graph inputs <8,3> and <5,-1>."""
    m = GraphMaker((2, 3, 3), F(8, 3), seed=23, name="x")
    m.input("y", (2, 3, 3), F(5, -1))
    return m.graph(m.add("add", "x", "y", F(6, 1), relu=False))


def cat_mixed_formats() -> IntegerGraph:
    """cat of three images in <6,2>, <4,0> and <8,4> into <7,3> with ReLU."""
    m = GraphMaker((2, 4, 4), F(8, 4), seed=24)
    a = m.conv("a", "input", 2, F(6, 5), F(6, 2), relu=False)
    b = m.requantize("b", "input", F(4, 0))
    c = m.relu("c", "input")
    return m.graph(m.cat("cat", (a, b, c), F(7, 3), relu=True))


def cat_vectors() -> IntegerGraph:
    """cat of two linear outputs of different formats and lengths."""
    m = GraphMaker((6,), F(8, 3), seed=25)
    a = m.linear("a", "input", 4, F(6, 5), F(6, 2))
    b = m.linear("b", "input", 3, F(7, 6), F(8, 5))
    return m.graph(m.cat("cat", (a, b), F(7, 2)))


def avgpool_3x3() -> IntegerGraph:
    """A 3x3 window: the sum times M = round(2^18 / 9) at FL + 18 (a rounded reciprocal, not a shift)."""
    m = GraphMaker((2, 6, 6), F(8, 3), seed=29)
    return m.graph(m.pool("avg", "input", "avgpool2d", 3, F(8, 3)))


# =========================================================================== vision-zoo ops (issue 13)
def clamp_family() -> IntegerGraph:
    """ReLU6 (<8,4> -> [0, 6] on <8,4>, a bound beyond the grid's top saturates), Hardtanh(-1, 1) into
    a coarser <5,2> (requantize, then clip), and a one-sided clamp(min=-0.5)."""
    m = GraphMaker((2, 4, 4), F(8, 3), seed=60)
    a = m.conv("conv", "input", 3, F(6, 5), F(8, 4), relu=False)
    r6 = m.clamp("relu6", a, F(8, 4), 0.0, 6.0)
    ht = m.clamp("hardtanh", a, F(5, 2), -1.0, 1.0)
    lo = m.clamp("clamp_min", "input", F(6, 1), -0.5, None)
    return m.graph(m.cat("cat", (r6, ht, lo), F(8, 3)))


def lut_activations() -> IntegerGraph:
    """Tables: sigmoid on 8 bits into <8,7>, SiLU on a 12-bit input (4096 entries), Hardswish,
    GELU and ELU(alpha=0.5) on 6 bits, Hardsigmoid into an unrelated <4,3>."""
    m = GraphMaker((2, 3, 3), F(8, 4), seed=61)
    s = m.lut("sigmoid", "input", "sigmoid", F(8, 7))
    wide = m.requantize("to12", "input", F(12, 8))
    silu = m.lut("silu", wide, "silu", F(8, 4))
    six = m.requantize("to6", "input", F(6, 3))
    hs = m.lut("hardswish", six, "hardswish", F(8, 4))
    ge = m.lut("gelu", six, "gelu", F(8, 4))
    el = m.lut("elu", six, "elu", F(7, 4), params={"alpha": 0.5})
    hsig = m.lut("hardsigmoid", "input", "hardsigmoid", F(4, 3))
    return m.graph(m.cat("cat", (s, silu, hs, ge, el, hsig), F(8, 4)))


def squeeze_excite() -> IntegerGraph:
    """A squeeze-excitation gate: global 4x4 average -> 1x1 conv (ReLU) -> 1x1 conv -> sigmoid
    table -> x * gate (a (C,H,W) x (C,1,1) broadcast multiply at FL_x + FL_gate) into <8,4>."""
    m = GraphMaker((4, 4, 4), F(8, 4), seed=62)
    x = m.conv("conv", "input", 4, F(6, 5), F(8, 4), relu=True)
    sq = m.pool("squeeze", x, "avgpool2d", 4, F(8, 5))
    e = m.conv("reduce", sq, 2, F(6, 5), F(8, 4), k=1, pad=0, relu=True)
    e = m.conv("expand", e, 4, F(6, 5), F(8, 4), k=1, pad=0, relu=False)
    gate = m.lut("gate", e, "sigmoid", F(8, 7))
    return m.graph(m.mul("excite", x, gate, F(8, 4)))


def mobilenet_block() -> IntegerGraph:
    """An inverted residual: 1x1 expand -> ReLU6 -> depthwise 3x3 (groups = channels) -> ReLU6 ->
    1x1 project, plus the input; then a stride-2 depthwise 3x3 with Hardswish (MobileNetV3)."""
    m = GraphMaker((4, 6, 6), F(8, 4), seed=63)
    h = m.conv_general("expand", "input", 8, F(6, 5), F(8, 4), kernel=(1, 1))
    h = m.clamp("relu6_a", h, F(8, 4), 0.0, 6.0)
    h = m.conv_general("dw", h, 8, F(6, 5), F(8, 3), kernel=(3, 3), padding=(1, 1), groups=8)
    h = m.clamp("relu6_b", h, F(8, 4), 0.0, 6.0)
    h = m.conv_general("project", h, 4, F(6, 5), F(8, 4), kernel=(1, 1))
    r = m.add("residual", h, "input", F(8, 4), relu=False)
    d = m.conv_general("dw_s2", r, 4, F(6, 5), F(8, 3), kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=4)
    return m.graph(m.lut("hardswish", d, "hardswish", F(8, 4)))


def batchnorm_depthwise() -> IntegerGraph:
    """A standalone BatchNorm (DenseNet's pre-activation BN) as a per-channel affine: a depthwise 1x1
    conv with bias, then ReLU, then a 1x1 conv."""
    m = GraphMaker((3, 4, 4), F(8, 4), seed=64)
    h = m.conv_general("bn", "input", 3, F(8, 6), F(8, 4), kernel=(1, 1), groups=3, relu=True)
    return m.graph(m.conv("conv", h, 4, F(6, 5), F(8, 3), k=1, pad=0, relu=False))


def maxpool_ceil() -> IntegerGraph:
    """SqueezeNet's 3x3 stride-2 max pool with ``ceil_mode`` on 7x7 (3x3 out; floor would give 3x3 too)
    and on 8x6 (4x3 out: the last row of windows hangs over the edge)."""
    m = GraphMaker((2, 8, 6), F(7, 3), seed=65)
    a = m.pool_ceil("pool_a", "input", "maxpool2d", kernel=(3, 3), stride=(2, 2), ceil_mode=True)
    return m.graph(m.pool_ceil("pool_b", a, "maxpool2d", kernel=(2, 2), stride=(2, 2), ceil_mode=True))


def maxpool_dilated() -> IntegerGraph:
    """A 2x2 max pool with dilation (2, 1), stride 1, and a 3x3 one with dilation 2 and padding 1."""
    m = GraphMaker((2, 7, 7), F(6, 2), seed=66)
    a = m.pool_ceil("dil_a", "input", "maxpool2d", kernel=(2, 2), stride=(1, 1), dilation=(2, 1))
    return m.graph(m.pool_ceil("dil_b", a, "maxpool2d", kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                               dilation=(2, 2)))


def avgpool_any() -> IntegerGraph:
    """Average pools with every divisor form: 3x3 stride 2 with padding 1 (9 cells, padding counted as
    torch's count_include_pad), a 2x3 window (6 cells), a ceil-mode 2x2 whose edge windows hold 2 cells."""
    m = GraphMaker((2, 7, 7), F(8, 3), seed=67)
    p = m.pool_ceil("pad_3x3", "input", "avgpool2d", kernel=(3, 3), stride=(2, 2), padding=(1, 1), out_fmt=F(7, 3))
    w = m.pool_ceil("win_2x3", p, "avgpool2d", kernel=(2, 3), stride=(1, 1), out_fmt=F(8, 4))
    return m.graph(m.pool_ceil("ceil_2x2", w, "avgpool2d", kernel=(2, 2), stride=(2, 2), ceil_mode=True,
                               out_fmt=F(8, 4)))


def avgpool_global_7x7() -> IntegerGraph:
    """A global 7x7 average (torchvision's adaptive pool at 224 px): the sum of 49 times M at FL + s."""
    m = GraphMaker((3, 7, 7), F(8, 3), seed=71)
    g = m.pool_ceil("global", "input", "avgpool2d", kernel=(7, 7), stride=(7, 7), out_fmt=F(8, 5))
    return m.graph(m.flatten("flat", g))


def channel_shuffle() -> IntegerGraph:
    """ShuffleNet's channel shuffle: (6,H,W) -> view (2,3,H*W) -> transpose -> view (6,H,W), then a
    spatial transpose (H <-> W) and a grouped 1x1 conv."""
    m = GraphMaker((6, 3, 4), F(7, 3), seed=68)
    h = m.reshape("split_groups", "input", (2, 3, 12))
    h = m.transpose("shuffle", h, (1, 0, 2))
    h = m.reshape("merge_groups", h, (6, 3, 4))
    h = m.transpose("swap_hw", h, (0, 2, 1))
    return m.graph(m.conv_general("gconv", h, 4, F(6, 5), F(8, 3), kernel=(1, 1), groups=2))


def upsample_nearest() -> IntegerGraph:
    """Nearest upsampling by (2, 2) and by (1, 3), then an add with a skip of the same size."""
    m = GraphMaker((2, 3, 3), F(7, 3), seed=69)
    u = m.upsample("up2", "input", (2, 2))
    u3 = m.upsample("up13", u, (1, 3))
    s = m.conv_general("skip", u3, 2, F(6, 5), F(7, 3), kernel=(1, 1))
    return m.graph(m.add("merge", u3, s, F(8, 3), relu=False))


def conv_transpose() -> IntegerGraph:
    """ConvTranspose2d 3x3 stride 2, padding 1, output_padding 1 (a 2x decoder step), with bias; then a
    grouped 2x2 stride-2 one without bias."""
    m = GraphMaker((3, 3, 3), F(7, 3), seed=70)
    h = m.conv_transpose("up", "input", 4, F(6, 5), F(8, 3), kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                         output_padding=(1, 1), relu=True)
    return m.graph(m.conv_transpose("up_g", h, 4, F(5, 4), F(8, 2), kernel=(2, 2), stride=(2, 2), groups=2,
                                    bias=False))


def requantize_extremes() -> IntegerGraph:
    """<16,10> -> <2,0> with ReLU (shift -10, saturating) -> <16,14> (shift +14)."""
    m = GraphMaker((10,), F(16, 10), seed=36)
    h = m.requantize("to2", "input", F(2, 0), relu=True)
    return m.graph(m.requantize("to16", h, F(16, 14)))


def widths_2_to_8() -> IntegerGraph:
    """A linear chain through every width 2..8: activation k has k bits, its weights k bits."""
    m = GraphMaker((6,), F(2, 1), seed=16)
    h = "input"
    fmts = [(F(2, 1), F(3, 2)), (F(3, 1), F(4, 3)), (F(4, 3), F(5, 1)), (F(5, 2), F(6, 4)),
            (F(6, 5), F(7, 3)), (F(7, 6), F(8, 4)), (F(8, 7), F(8, 2))]
    for i, (w_fmt, out_fmt) in enumerate(fmts):
        h = m.linear(f"fc{i}", h, 6 if i < len(fmts) - 1 else 4, w_fmt, out_fmt, relu=i % 2 == 0)
    return m.graph(h)


def widths_9_to_16() -> IntegerGraph:
    """A linear chain through every width 9..16 (inputs 9..16 bits, weights 16..9 bits, int32-safe, no bias)."""
    m = GraphMaker((4,), F(9, 5), seed=17)
    h = "input"
    for i in range(8):
        out_fmt = F(min(10 + i, 16), 6 + min(i, 6))
        h = m.linear(f"fc{i}", h, 4, F(16 - i, 14 - i), out_fmt, relu=i == 3, bias=False)
    return m.graph(h)


def linear_wide_bias() -> IntegerGraph:
    """int32 biases up to 2^30 - 1 (beyond float32's exact 2^24) on an 8-bit linear."""
    m = GraphMaker((8,), F(8, 4), seed=40)
    m._op("fc", "linear", ("input",), (4,), F(8, -20), weight=m._rand(F(8, 7), (4, 8)), weight_fmt=F(8, 7),
          bias=np.array([(1 << 30) - 1, -(1 << 30), (1 << 24) + 1, -((1 << 24) + 3)], np.int64),
          attrs={"relu": False})
    return m.graph("fc")


def fl_extremes() -> IntegerGraph:
    """FL > BW on the input, weights and output, FL < 0 in between, a 2-bit linear into FL < 0."""
    m = GraphMaker((6,), F(4, 7), seed=18)
    h = m.linear("fc", "input", 5, F(3, 5), F(5, -3))
    h = m.requantize("rq", h, F(6, 9), relu=True)
    return m.graph(m.linear("fc2bit", h, 7, F(2, 0), F(2, -1)))


def reshape() -> IntegerGraph:
    """reshape of an image into another image (4x2x4), max pooling on it, reshape into a vector, linear."""
    m = GraphMaker((2, 4, 4), F(6, 2), seed=41)
    h = m._op("to_image", "reshape", ("input",), (4, 2, 4), F(6, 2), attrs={"shape": (4, 2, 4)})
    h = m.pool("pool", h)
    h = m._op("to_vector", "reshape", (h,), (8,), F(6, 2), attrs={"shape": (8,)})
    return m.graph(m.linear("fc", h, 5, F(5, 4), F(7, 1)))


def mul_pow2() -> IntegerGraph:
    """``x + 4 x`` as lowered from ``torch.add(x, x, alpha=4)`` (mul_pow2 relabels <7,3> as <7,1>), then
    a mul_pow2 by 2^-3 (<7,4>) of that sum: the integers pass, only FL moves."""
    m = GraphMaker((3, 4), F(7, 3), seed=42)
    x4 = m._op("times4", "mul_pow2", ("input",), (3, 4), F(7, 1), attrs={"exponent": 2})
    s = m.add("add", "input", x4, F(8, 2), relu=False)
    return m.graph(m._op("div8", "mul_pow2", (s,), (3, 4), F(8, 5), attrs={"exponent": -3}))


# =========================================================================== accumulators at the int32 edge
def _fixed_weight_linear(fan_in: int, in_fmt: FixedPoint, w_fmt: FixedPoint, out_fmt: FixedPoint) -> IntegerGraph:
    """fan_in weights of qmin: the saturated sample 0 (all qmin) reaches |acc| = fan_in * 2^22."""
    m = GraphMaker((fan_in,), in_fmt, seed=38)
    m._op("fc", "linear", ("input",), (2,), out_fmt, weight=np.full((2, fan_in), w_fmt.qmin, np.int64),
          weight_fmt=w_fmt, bias=None, attrs={"relu": False})
    return m.graph("fc")


def linear_acc_near_int32() -> IntegerGraph:
    """16-bit input x 8-bit weights, worst-case accumulator 511 * 2^22 = 2^31 - 2^22 (fits int32)."""
    return _fixed_weight_linear(511, F(16, 8), F(8, 7), F(16, 0))


def linear_acc_over_int32() -> IntegerGraph:
    """16-bit input x 8-bit weights, worst case 513 * 2^22 > 2^31 - 1: an int32 target must refuse it."""
    return _fixed_weight_linear(513, F(16, 8), F(8, 7), F(16, 0))


def linear_w16_acc_near_int32() -> IntegerGraph:
    """8-bit input x 16-bit weights, worst-case accumulator 511 * 2^22 (fits int32)."""
    return _fixed_weight_linear(511, F(8, 3), F(16, 15), F(8, -2))


def linear_w16_acc_over_int32() -> IntegerGraph:
    """8-bit input x 16-bit weights, worst case 513 * 2^22 > 2^31 - 1: an int32 target must refuse it."""
    return _fixed_weight_linear(513, F(8, 3), F(16, 15), F(8, -2))


def conv_acc_near_int32() -> IntegerGraph:
    """conv2d, 73 channels x 7x1 of -128 on a 16-bit input: worst case 511 * 2^22 + 5 < 2^31."""
    m = GraphMaker((73, 7, 1), F(16, 6), seed=39)
    m._op("conv", "conv2d", ("input",), (2, 1, 1), F(12, -4), weight=np.full((2, 73, 7, 1), -128, np.int64),
          weight_fmt=F(8, 6), bias=np.array([0, -5], np.int64), attrs={"stride": (1, 1), "padding": (0, 0)})
    return m.graph("conv")


# =========================================================================== transformers (issue 14)
def token_inputs(graph: IntegerGraph, seed: int = 0, n: int = N_SAMPLES) -> list[np.ndarray]:
    """:func:`format_inputs`, except that every input read by an ``embedding`` gets token ids in
    ``[0, V)`` (integral floats; sample 0 all ``0``, sample 1 all ``V - 1``): ids are checked, never clipped,
    so they cannot saturate as other inputs do."""
    xs = format_inputs(graph, n=n, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for op in graph.ops:
        if op.kind == "embedding" and op.inputs[0] in [v.name for v in graph.inputs]:
            i = [v.name for v in graph.inputs].index(op.inputs[0])
            vocab = op.weight.shape[0]
            ids = rng.integers(0, vocab, size=xs[i].shape).astype(np.float64)
            ids[0], ids[1 % n] = 0, vocab - 1
            xs[i] = ids
    return xs


def embedding_lookup() -> IntegerGraph:
    """Token + position embeddings (ids <6,0> into a 20 x 8 table, exact; positions <4,0> into a 6 x 8
    table requantized <6,5> -> <6,4>), their sum, and a tied output head (linear with the token table)."""
    m = GraphMaker((6,), F(6, 0), seed=80, name="ids")
    pos = m.input("pos", (6,), F(4, 0))
    tok = m.embedding("tok_emb", "ids", 20, 8, F(8, 6))
    pe = m.embedding("pos_emb", pos, 6, 8, F(6, 5), out_fmt=F(6, 4))
    h = m.add("embed_sum", tok, pe, F(8, 5), relu=False)
    table = next(op.weight for op in m.ops if op.name == "tok_emb")
    return m.graph(m.dense("lm_head", h, 20, F(8, 6), F(10, 3), weight=table, bias=False))


def attention_head() -> IntegerGraph:
    """One attention head on (S=4, D=8): q/k/v projections, Q K^T (a matmul of two activations), a
    1/2 = 1/sqrt(d) scale (mul_pow2), a softmax with a padding mask (1, S) (nonzero = keep) into
    <8,7>, and attention x V."""
    m = GraphMaker((4, 8), F(8, 4), seed=81)
    mask = m.input("mask", (1, 4), F(2, 0))
    q = m.dense("q", "input", 4, F(6, 5), F(8, 4))
    k = m.dense("k", "input", 4, F(6, 5), F(8, 4))
    v = m.dense("v", "input", 4, F(6, 5), F(8, 4))
    kt = m.transpose("k_t", k, (1, 0))
    s = m.matmul("scores", q, kt, F(8, 3))
    s = m._op("scale", "mul_pow2", (s,), m.values[s].shape, F(8, 4), attrs={"exponent": -1})
    p = m.softmax("softmax", s, F(8, 7), mask=mask)
    return m.graph(m.matmul("context", p, v, F(8, 4)))


def causal_attention() -> IntegerGraph:
    """Two causal heads (GPT style) on (S=4, D=8): projections reshaped (4, 2, 4) and permuted to heads
    (2, 4, 4) / (2, 4, 4)^T, batched matmuls over the head axis, a causal softmax with a (1, 1, S)
    padding mask broadcast over heads and queries, into <9,8> (unsigned-range storage)."""
    m = GraphMaker((4, 8), F(8, 4), seed=82)
    mask = m.input("mask", (1, 1, 4), F(2, 0))
    q = m.transpose("q_heads", m.reshape("q_split", m.dense("q", "input", 8, F(6, 5), F(8, 4)), (4, 2, 4)), (1, 0, 2))
    k = m.transpose("k_heads", m.reshape("k_split", m.dense("k", "input", 8, F(6, 5), F(8, 4)), (4, 2, 4)), (1, 2, 0))
    v = m.transpose("v_heads", m.reshape("v_split", "input", (4, 2, 4)), (1, 0, 2))
    s = m.matmul("scores", q, k, F(8, 2))
    p = m.softmax("softmax", s, F(9, 8), mask=mask, causal=True)
    return m.graph(m.matmul("context", p, v, F(8, 4)))


def layernorm_block() -> IntegerGraph:
    """LayerNorm over 16 features (<8,3> in, gamma <8,6>, beta, eps 1e-5) into <8,4>; then one on a
    16-bit input <16,10> with a large eps (1e-2, which dominates small variances) and no beta into <12,8>.
    Sample 0 saturates every input to qmin: a constant row (variance 0, output beta)."""
    m = GraphMaker((3, 16), F(8, 3), seed=83)
    h = m.layernorm("ln", "input", F(8, 6), F(8, 4))
    w = m.requantize("to16", h, F(16, 10))
    return m.graph(m.layernorm("ln_eps", w, F(7, 5), F(12, 8), eps=1e-2, bias=False))


def slice_cls() -> IntegerGraph:
    """The CLS token x[:, 0] (select: the axis removed) into a classifier; x[:, 1:5:2] (a strided slice);
    a split of the features in two halves (two slices) added back together."""
    m = GraphMaker((5, 6), F(7, 3), seed=84)
    cls = m.select("cls", "input", 1, 0)
    logits = m.linear("classifier", cls, 3, F(6, 5), F(8, 3))
    strided = m.slice("strided", "input", 1, 1, 5, 2)
    a, b = m.slice("half_a", strided, 2, 0, 3), m.slice("half_b", strided, 2, 3, 6)
    return m.graph(logits, m.add("halves", a, b, F(8, 3), relu=False))


def transformer_block() -> IntegerGraph:
    """A tiny pre-LN encoder block on (S=4, D=8): LN -> single-head attention (q/k/v, Q K^T, softmax,
    x V) -> residual add -> LN -> MLP (8 -> 16, GELU table on <8,4>, 16 -> 8) -> residual add."""
    m = GraphMaker((4, 8), F(8, 4), seed=85)
    h = m.layernorm("ln1", "input", F(8, 6), F(8, 5))
    q, k, v = (m.dense(n, h, 8, F(6, 5), F(8, 4)) for n in ("q", "k", "v"))
    s = m.matmul("scores", q, m.transpose("k_t", k, (1, 0)), F(8, 2))
    ctx = m.matmul("context", m.softmax("softmax", s, F(8, 7)), v, F(8, 4))
    r = m.add("residual1", "input", ctx, F(8, 4), relu=False)
    h = m.layernorm("ln2", r, F(8, 6), F(8, 5))
    h = m.lut("gelu", m.dense("fc1", h, 16, F(6, 5), F(8, 4)), "gelu", F(8, 4))
    return m.graph(m.add("residual2", r, m.dense("fc2", h, 8, F(6, 5), F(8, 4)), F(8, 4), relu=False))


def class_token_pos_embedding() -> IntegerGraph:
    """A ViT's patch embedding, class token and positional embedding: a 3x8x8 image through a conv whose
    stride is its kernel (4: four 4x4 patches, 8 channels), flattened and transposed into (4, 8) tokens;
    a constant class token (1, 8) <8,5> concatenated in front (requantized into <8,4>); a constant
    positional embedding (5, 8) <6,5> added; the class token's row into a classifier. A second graph
    output is the class token alone."""
    m = GraphMaker((3, 8, 8), F(8, 4), seed=86)
    proj = m.conv_general("proj", "input", 8, F(6, 5), F(8, 4), kernel=(4, 4), stride=(4, 4))
    patches = m.transpose("patches", m.reshape("flat", proj, (8, 4)), (1, 0))
    token = m.constant("class_token", "input", (1, 8), F(8, 5))
    tokens = m.cat("tokens", (token, patches), F(8, 4))
    h = m.add("embed", tokens, m.constant("pos_embedding", "input", (5, 8), F(6, 5)), F(8, 4), relu=False)
    return m.graph(m.linear("head", m.select("cls", h, 1, 0), 3, F(6, 5), F(8, 3)), token)


TRANSFORMER_CASES = ("embedding_lookup", "attention_head", "causal_attention", "layernorm_block", "slice_cls",
                     "transformer_block", "class_token_pos_embedding")
"""The transformer cases (issue 14): the reference runs them; targets declare them unsupported."""


# =========================================================================== the registry
@dataclass(frozen=True)
class Case:
    """One zoo entry: ``build()`` returns a fresh graph and its float inputs (one array per input)."""

    name: str
    build: Callable[[], tuple[IntegerGraph, list[np.ndarray]]]
    doc: str


def _case(make: Callable[[], IntegerGraph | tuple[IntegerGraph, object]], seed: int = 0):
    def build() -> tuple[IntegerGraph, list[np.ndarray]]:
        graph = make()
        if isinstance(graph, tuple):  # the fpga builders return (graph, builder)
            graph = graph[0]
        return graph, token_inputs(graph, seed=seed)
    return build


_MAKERS: dict[str, Callable[[], IntegerGraph | tuple[IntegerGraph, object]]] = {
    # tests/export/integer_graphs.py
    "mlp": mlp, "cnn": cnn, "residual": residual, "mixed": mixed, "matmul_self": matmul_graph,
    # tests/backends/cpu/cpu_graphs.py
    "resblock_strided": residual_block, "mixed_bits": mixed_bits,
    # tests/backends/cuda/cuda_graphs.py
    "resnet_shared_skip": residual_net, "mixed_net": mixed_net,
    # tests/backends/fpga/fpga_graphs.py
    "fpga_mlp": build_mlp, "fpga_cnn": build_cnn, "fpga_residual": build_residual,
    # op kinds and attributes
    "conv_attrs": conv_attrs, "conv_groups": conv_groups, "pools": pools, "avgpool_3x3": avgpool_3x3,
    "elementwise": elementwise, "add_two_inputs": add_two_inputs,
    "cat_mixed_formats": cat_mixed_formats, "cat_vectors": cat_vectors,
    "matmul_two_inputs": matmul_two_inputs, "matmul_branches": matmul_branches,
    "reshape": reshape, "mul_pow2": mul_pow2,
    # number-format corners
    "widths_2_to_8": widths_2_to_8, "widths_9_to_16": widths_9_to_16, "fl_extremes": fl_extremes,
    "requantize_extremes": requantize_extremes, "linear_wide_bias": linear_wide_bias,
    "linear_acc_near_int32": linear_acc_near_int32, "linear_acc_over_int32": linear_acc_over_int32,
    "linear_w16_acc_near_int32": linear_w16_acc_near_int32, "linear_w16_acc_over_int32": linear_w16_acc_over_int32,
    "conv_acc_near_int32": conv_acc_near_int32,
    # vision-zoo ops (issue 13)
    "clamp_family": clamp_family, "lut_activations": lut_activations, "squeeze_excite": squeeze_excite,
    "mobilenet_block": mobilenet_block, "batchnorm_depthwise": batchnorm_depthwise, "maxpool_ceil": maxpool_ceil,
    "maxpool_dilated": maxpool_dilated, "avgpool_any": avgpool_any, "avgpool_global_7x7": avgpool_global_7x7, "channel_shuffle": channel_shuffle,
    "upsample_nearest": upsample_nearest, "conv_transpose": conv_transpose,
    # transformers (issue 14)
    "embedding_lookup": embedding_lookup, "attention_head": attention_head, "causal_attention": causal_attention,
    "layernorm_block": layernorm_block, "slice_cls": slice_cls, "transformer_block": transformer_block,
    "class_token_pos_embedding": class_token_pos_embedding,
}

CASES: dict[str, Case] = {
    name: Case(name, _case(make, seed=i), (make.__doc__ or name).strip().splitlines()[0])
    for i, (name, make) in enumerate(_MAKERS.items())
}
"""Every zoo case by name (the conformance suite's parameter ids are ``<case>-<target>``)."""

__all__ = ["CASES", "TRANSFORMER_CASES", "Case", "F",
           "GraphBuilder", "GraphMaker", "OP_KINDS", "build_cnn", "build_mlp",
           "build_residual", "cnn", "format_inputs", "fp", "matmul_graph", "mixed", "mixed_bits", "mixed_net",
           "mlp", "residual", "residual_block", "residual_net", "sample_inputs", "token_inputs"]
