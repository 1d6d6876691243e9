"""Plan the CUDA lowering of an IntegerGraph: one kernel launch per op, residual adds fused.

Must run before it: :func:`fxquant.passes.lower_to_integer_graph` (or a hand-built
:class:`~fxquant.integer_graph.IntegerGraph`). After it: :mod:`.kernels` turns each distinct
:data:`KernelSpec` into a TensorIR PrimFunc and :mod:`.schedule` binds it to CUDA threads.

Math (``docs/number_format.md``): activations are integers of at most 8 bits stored as int8.

* ``conv2d`` / ``linear``: ``acc = sum_k a[m, k] w[o, k] + b[o]`` (int32, checked below), then
  ``requantize(acc, FL_in + FL_w -> out_fmt)`` (shift, round half to even, saturate, ReLU). A conv
  is an implicit GEMM: ``m = (image, oh, ow)``, ``k = (c, kh, kw)``, zero padding.
* A residual ``add`` whose one input is a conv/linear output read by nothing else is fused into
  that GEMM's epilogue: ``requantize((y << (FL - FL_y)) + (r << (FL - FL_r)))``,
  ``FL = max(FL_y, FL_r)``; the fused launch sits where the add was (the residual exists there).
* ``add`` / ``requantize`` / ``relu``: element-wise ``requantize(sum_i x_i << left_i)``.
* ``maxpool2d`` on the integers; ``avgpool2d`` sums a ``2^p`` window and requantizes from
  ``FL_in + p``. ``flatten`` is a view of its (contiguous NCHW) input: no kernel.
* The float32 model input is quantized on the device: ``clamp(round_half_even(x * 2^FL))``.

Weights: int8 ``[OP, KP]`` (``k = (c, kh, kw)`` row-major, zero-padded to the tile multiples);
weights of ``BW <= 4`` bits are packed two per byte, ``byte[o, k/2] = nib(w[o, k]) | nib(w[o, k+1]) << 4``
with ``nib(v) = v & 15`` (two's complement nibble). Biases int32 ``[OP]``.
The accumulator must stay in int32: ``max_o (2^(BW_in-1) sum_k |w[o,k]| + |b[o]|) < 2^31``
(:func:`fxquant.legality.accumulator_problems`). :func:`graph_problems` lists every rule a graph
breaks (``CudaTarget.check``); :func:`plan_graph` refuses such a graph with all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fxquant import legality
from fxquant.backends.base import Problem
from fxquant.backends.tvm_epilogue import Requant, Residual
from fxquant.backends.pool_shape import PoolShape, window_out_hw
from fxquant.errors import UnsupportedOpError
from fxquant.integer_graph import IntegerGraph, Op

MAX_ACT_BITS = 8
MAX_WEIGHT_BITS = 8
"""``__dp4a`` multiplies int8 quads: weights wider than 8 bits have no CUDA kernel (refused)."""
PACKED_WEIGHT_BITS = 4
OPS = frozenset({"conv2d", "linear", "add", "avgpool2d", "maxpool2d", "relu", "flatten", "requantize"})
K_TILE = 16
"""Reduction tile (4 dp4a steps): K is zero-padded to a multiple of it."""
LARGE_BATCH = 64
"""From this batch size on, linear layers run their 64-row GEMM variant (``GemmSpec.large``)."""


def out_tile(out_features: int) -> int:
    """Output-channel tile of the GEMM schedule: 16, 32 or 64 (O is zero-padded to it)."""
    return 16 if out_features <= 16 else 32 if out_features <= 32 else 64


@dataclass(frozen=True)
class GemmSpec:
    """int8 implicit-GEMM conv (``linear=False``, NCHW) or linear (``[n, K] x [O, K]^T``)."""

    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    linear: bool = False
    weight_bits: int = 8
    rq: Requant = Requant(0, 8)
    residual: Residual | None = None
    large: bool = False
    """Linear layers only: 64-row blocks for batches >= LARGE_BATCH (16-row blocks below)."""

    @property
    def out_hw(self) -> tuple[int, int]:
        return window_out_hw(self.height, self.width, self.kernel, self.stride, self.padding, self.dilation)

    @property
    def k(self) -> int:
        return self.channels * self.kernel[0] * self.kernel[1]

    @property
    def k_padded(self) -> int:
        return math.ceil(self.k / K_TILE) * K_TILE

    @property
    def o_padded(self) -> int:
        tile = out_tile(self.out_channels)
        return math.ceil(self.out_channels / tile) * tile

    @property
    def m_tile(self) -> int:
        """Rows of one thread block (``M = n*OH*OW`` is padded to it): 64, or 16 for small-batch linear."""
        return 16 if self.linear and not self.large else 64

    @property
    def packed(self) -> bool:
        return self.weight_bits <= PACKED_WEIGHT_BITS

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.channels,) if self.linear else (self.channels, self.height, self.width)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (self.out_channels,) if self.linear else (self.out_channels, *self.out_hw)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.o_padded, self.k_padded // 2 if self.packed else self.k_padded)


@dataclass(frozen=True)
class EltwiseSpec:
    """``y = requantize(sum_i x_i << lefts[i])`` over int8 ``[n, *shape]`` tensors."""

    shape: tuple[int, ...]
    lefts: tuple[int, ...]
    rq: Requant


@dataclass(frozen=True)
class PoolSpec(PoolShape):
    """Max pooling (``rq is None``) or window sum + requantize over int8 ``[n, C, H, W]``."""

    rq: Requant | None = None


@dataclass(frozen=True)
class QuantizeSpec:
    """float32 ``[n, *shape]`` -> int8 ``clamp(round_half_even(x * 2^frac_bits))`` at ``bits``."""

    shape: tuple[int, ...]
    frac_bits: int
    bits: int


KernelSpec = GemmSpec | EltwiseSpec | PoolSpec | QuantizeSpec


@dataclass(frozen=True)
class Launch:
    """One kernel call: ``kernel(*args, out)``; an arg is a value name or ``"param:<name>"``."""

    kernel: str
    args: tuple[str, ...]
    out: str
    out_shape: tuple[int, ...]
    ops: tuple[str, ...]
    """The graph ops this launch implements (a fused residual add names two)."""
    kernel_large: str | None = None
    """The kernel to run instead from batch ``LARGE_BATCH`` on (linear layers)."""


@dataclass
class Plan:
    """Distinct kernels, the launch sequence, flatten views, and the packed parameters."""

    kernels: dict[str, KernelSpec] = field(default_factory=dict)
    launches: list[Launch] = field(default_factory=list)
    views: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    """``out -> (input, shape)``: a reshape of a contiguous tensor, no kernel."""
    params: dict[str, np.ndarray] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def kernel_name(self, spec: KernelSpec) -> str:
        """The name of ``spec``'s kernel, adding it on first use (equal specs share a kernel)."""
        for name, known in self.kernels.items():
            if known == spec:
                return name
        kind = {GemmSpec: "linear" if getattr(spec, "linear", False) else "conv2d", EltwiseSpec: "eltwise",
                PoolSpec: "pool2d", QuantizeSpec: "quantize"}[type(spec)]
        if isinstance(spec, GemmSpec):
            kind += "_int4" * spec.packed + "_large" * spec.large
        name = f"fxq_{kind}_{len(self.kernels)}"
        self.kernels[name] = spec
        return name

    def to_json(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "outputs": self.outputs, "large_batch": LARGE_BATCH,
                "launches": [{"kernel": l.kernel, "kernel_large": l.kernel_large, "args": list(l.args), "out": l.out,
                              "out_shape": list(l.out_shape), "ops": list(l.ops)} for l in self.launches],
                "views": {k: {"input": v[0], "shape": list(v[1])} for k, v in self.views.items()}}


def _pad(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.pad(a, [(0, t - s) for s, t in zip(a.shape, shape)])


def pack_weight(w: np.ndarray, spec: GemmSpec) -> np.ndarray:
    """``[O, C(, KH, KW)]`` integers -> int8 ``[OP, KP]`` or, packed, uint8 ``[OP, KP/2]`` nibble pairs."""
    flat = _pad(np.asarray(w, np.int64).reshape(w.shape[0], -1), (spec.o_padded, spec.k_padded))
    if not spec.packed:
        return flat.astype(np.int8)
    nib = (flat & 15).astype(np.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << np.uint8(4))


def unpack_weight(packed: np.ndarray) -> np.ndarray:
    """Inverse of the nibble packing: uint8 ``[OP, KP/2]`` -> int64 ``[OP, KP]``."""
    p = packed.astype(np.int64)
    out = np.empty((p.shape[0], p.shape[1] * 2), np.int64)
    out[:, 0::2], out[:, 1::2] = ((p & 15) ^ 8) - 8, (((p >> 4) & 15) ^ 8) - 8
    return out


def graph_problems(graph: IntegerGraph) -> list[Problem]:
    """Every reason beyond the op kinds (:data:`OPS`) the CUDA kernels cannot build ``graph``
    (all at once, each naming the layer)."""
    broken = legality.format_problems(graph)
    if broken:  # widths and bounds are meaningless without integer formats
        return broken
    return (legality.width_problems(graph, weight_bits=(2, MAX_WEIGHT_BITS), act_bits=(2, MAX_ACT_BITS))
            + legality.fit_problems(graph)
            + legality.shape_problems(graph, max_inputs=1)
            + legality.accumulator_problems(graph, 32, kinds=("conv2d", "linear", "add", "avgpool2d"))
            + legality.avg_window_problems(graph)
            + legality.window_problems(graph))


class _Planner:
    def __init__(self, graph: IntegerGraph) -> None:
        self.graph = graph
        self.plan = Plan(inputs=[v.name for v in graph.inputs], outputs=list(graph.outputs))
        self.users: dict[str, list[Op]] = {}
        for op in graph.ops:
            for name in op.inputs:
                self.users.setdefault(name, []).append(op)
        self.producer = {op.output: op for op in graph.ops}
        self.deferred: set[str] = set()

    def fl(self, name: str) -> int:
        frac_bits = self.graph.value(name).fmt.frac_bits
        assert frac_bits is not None  # check_graph
        return frac_bits

    def bits(self, name: str) -> int:
        return self.graph.value(name).fmt.bits

    def fusable(self, name: str) -> bool:
        """``name`` is a GEMM output read only by one add of two distinct values, not a graph output."""
        users = self.users.get(name, [])
        return (name not in self.graph.outputs and len(users) == 1 and users[0].kind == "add"
                and len(set(users[0].inputs)) == 2)

    def requant(self, op: Op, frac_bits_in: int) -> Requant:
        assert op.out_fmt.frac_bits is not None  # check_graph
        return Requant(op.out_fmt.frac_bits - frac_bits_in, op.out_fmt.bits, bool(op.attrs.get("relu")))

    def launch(self, spec: KernelSpec, args: tuple[str, ...], out: str, ops: tuple[str, ...]) -> None:
        shape = self.graph.value(out).shape
        large = None
        if isinstance(spec, GemmSpec) and spec.linear:
            large = self.plan.kernel_name(replace(spec, large=True))
        self.plan.launches.append(Launch(self.plan.kernel_name(spec), args, out, shape, ops, large))

    def gemm(self, op: Op, residual: tuple[str, Residual, Op] | None) -> None:
        assert op.weight is not None and op.weight_fmt is not None and op.weight_fmt.frac_bits is not None
        (src,) = op.inputs
        w = np.asarray(op.weight, np.int64)
        bias = np.zeros(w.shape[0], np.int64) if op.bias is None else np.asarray(op.bias, np.int64)
        legality.require_fits(self.graph.accumulator_bound(op), f"op {op.name!r}")
        common = dict(weight_bits=op.weight_fmt.bits, rq=self.requant(op, self.fl(src) + op.weight_fmt.frac_bits),
                      residual=residual[1] if residual else None)
        if op.kind == "linear":
            spec = GemmSpec(w.shape[1], 1, 1, w.shape[0], linear=True, **common)
        else:
            c, h, wd = self.graph.value(src).shape
            spec = GemmSpec(c, h, wd, w.shape[0], tuple(w.shape[2:]), tuple(op.attrs.get("stride", (1, 1))),
                            tuple(op.attrs.get("padding", (0, 0))), tuple(op.attrs.get("dilation", (1, 1))),
                            **common)
        self.plan.params[f"{op.name}.weight"] = pack_weight(w, spec)
        self.plan.params[f"{op.name}.bias"] = _pad(bias, (spec.o_padded,)).astype(np.int32)
        args = (src, f"param:{op.name}.weight", f"param:{op.name}.bias")
        if residual is None:
            self.launch(spec, args, op.output, (op.name,))
        else:
            r, _, add = residual
            self.launch(spec, args + (r,), add.output, (op.name, add.name))

    def add(self, op: Op) -> None:
        fl = max(self.fl(i) for i in op.inputs)
        lefts = tuple(fl - self.fl(i) for i in op.inputs)
        legality.require_fits(self.graph.accumulator_bound(op), f"op {op.name!r}")
        fused = next((i for i in reversed(op.inputs) if i in self.deferred), None)
        if fused is None:
            self.launch(EltwiseSpec(self.graph.value(op.output).shape, lefts, self.requant(op, fl)), op.inputs,
                        op.output, (op.name,))
            return
        other = op.inputs[0] if op.inputs[1] == fused else op.inputs[1]
        if other in self.deferred:  # both inputs are GEMMs read only here: run the other one first
            self.deferred.discard(other)
            self.gemm(self.producer[other], None)
        spec = Residual(fl - self.fl(fused), fl - self.fl(other), self.requant(op, fl))
        self.deferred.discard(fused)
        self.gemm(self.producer[fused], (other, spec, op))

    def pool(self, op: Op) -> None:
        (src,) = op.inputs
        c, h, w = self.graph.value(src).shape
        kernel = tuple(op.attrs["kernel"])
        stride, padding = tuple(op.attrs.get("stride", kernel)), tuple(op.attrs.get("padding", (0, 0)))
        rq = None
        if op.kind == "avgpool2d":
            p = legality.require_avg_window(kernel, padding, f"op {op.name!r}")
            rq = self.requant(op, self.fl(src) + p)
        self.launch(PoolSpec(c, h, w, kernel, stride, padding, rq), op.inputs, op.output, (op.name,))

    def run(self) -> Plan:
        for v in self.graph.inputs:
            self.launch_input(v.name)
        for op in self.graph.ops:
            if op.kind in ("conv2d", "linear"):
                if self.fusable(op.output):
                    self.deferred.add(op.output)
                else:
                    self.gemm(op, None)
            elif op.kind == "add":
                self.add(op)
            elif op.kind in ("maxpool2d", "avgpool2d"):
                self.pool(op)
            elif op.kind == "flatten":
                self.plan.views[op.output] = (op.inputs[0], self.graph.value(op.output).shape)
            else:  # requantize, relu
                (src,) = op.inputs
                rq = Requant(0, op.out_fmt.bits, True) if op.kind == "relu" else self.requant(op, self.fl(src))
                self.launch(EltwiseSpec(self.graph.value(src).shape, (0,), rq), op.inputs, op.output, (op.name,))
        return self.plan

    def launch_input(self, name: str) -> None:
        v = self.graph.value(name)
        spec = QuantizeSpec(v.shape, self.fl(name), v.fmt.bits)
        self.plan.launches.append(Launch(self.plan.kernel_name(spec), (f"float:{name}",), name, v.shape, ()))


def plan_graph(graph: IntegerGraph) -> Plan:
    """The launch plan of ``graph``; :class:`UnsupportedOpError` listing every :func:`graph_problems`."""
    problems = [Problem(op.name, op.kind, f"op kind {op.kind!r} has no fxquant CUDA kernel")
                for op in graph.ops if op.kind not in OPS] + graph_problems(graph)
    if problems:
        raise UnsupportedOpError(f"the CUDA kernels cannot build this graph ({len(problems)} problems): "
                                 + "; ".join(map(str, problems)), "see docs/coverage.md")
    return _Planner(graph).run()
