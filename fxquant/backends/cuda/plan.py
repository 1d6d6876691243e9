"""Plan the CUDA lowering of an IntegerGraph: one kernel launch per op, residual adds fused.

Must run before it: :func:`fxquant.passes.lower_to_integer_graph` (or a hand-built
:class:`~fxquant.integer_graph.IntegerGraph`). After it: :mod:`.kernels` turns each distinct
:data:`KernelSpec` into a TensorIR PrimFunc and :mod:`.schedule` binds it to CUDA threads.

Math (``docs/number_format.md``): activations are integers of at most 8 bits stored as int8 -- or of
9..16 bits stored as int16 where the kernels on both sides of the value take it (:data:`WIDE_OUT`,
:data:`WIDE_IN`: element-wise, matmul, slice / transpose / views, softmax, layernorm, embedding
outputs and the GEMM epilogue's output; never a dp4a GEMM's input). :func:`graph_problems` names
every other wide value at the op that cannot read or write it.

* ``conv2d`` / ``linear``: ``acc = sum_k a[m, k] w[o, k] + b[o]`` (int32, checked below), then
  ``requantize(acc, FL_in + FL_w -> out_fmt)`` (shift, round half to even, saturate, ReLU). A conv
  is an implicit GEMM: ``m = (image, oh, ow)``, ``k = (c, kh, kw)``, zero padding.
* A residual ``add`` whose one input is a conv/linear output read by nothing else is fused into
  that GEMM's epilogue: ``requantize((y << (FL - FL_y)) + (r << (FL - FL_r)))``,
  ``FL = max(FL_y, FL_r)``; the fused launch sits where the add was (the residual exists there).
* ``conv2d`` with ``groups > 1`` (depthwise, grouped): a direct kernel, one thread per output,
  ``acc[o] = sum_{c<C/g, kh, kw} x[g(o) C/g + c, ...] w[o, c, kh, kw] + b[o]``, same requantize.
* ``conv_transpose2d``: the gather form of the reference's scatter, one thread per output:
  ``acc[o, y, x] = sum_{c, i, j} x[c, Y/s_h, X/s_w] w[c, o', i, j]`` over the taps with
  ``Y = y + p_h - i d_h`` (and ``X``) a non-negative multiple of the stride inside the input
  (``c`` over the group of ``o``, ``o' = o mod C_out/g``), + bias, requantize.
* ``add`` / ``requantize`` / ``relu``: element-wise ``requantize(sum_i x_i << left_i)``;
  ``clamp``: ``min(max(requantize(x), lo), hi)`` (numpy's ``clip`` order, ``None`` = no bound).
* ``mul``: ``requantize(a * b)`` from ``FL_a + FL_b`` (int32: ``|a b| <= 2^14``), a size-1 dim of
  either input broadcast (same rank).
* ``matmul`` of two activations ``[.., M, K] x [.., K, N]`` (equal leading dims): one thread per
  output, ``acc = sum_k a[.., m, k] b[.., k, n]`` in int32, requantize from ``FL_a + FL_b``.
* ``lut``: ``y = table[x - qmin_in]`` (the op's int8 table of ``2^BW_in`` entries, a parameter).
* ``embedding``: ``y[.., d] = requantize(table[id, d])`` from ``FL_w`` (the int8 ``(V, D)`` table a
  parameter; the identity when ``out_fmt == weight_fmt``). A graph input read only by embeddings
  (token ids ``<BW,0>``, ``BW <= 16``) stays integer end to end: it is passed as int32 (``"int:<name>"``,
  no quantize kernel) and its ids are range-checked on the host (``CudaTarget.run``) -- the kernel
  clamps an id into the table only so that no read leaves it.
* ``constant``: its integers (a parameter, int8 / int16) copied into every sample; the op's input
  only sizes the batch (a token-id input it reads stays an id input).
* ``slice`` / select: an index map (``x[.., start + i step, ..]``, or the axis removed at ``index``).
* ``softmax`` and ``layernorm``: one thread per row of the last axis (the rows of ``[n, *shape]``
  viewed as ``[n, R, L]``), the arithmetic of :func:`fxquant.fixed_point.softmax_rows` /
  :func:`~fxquant.fixed_point.layernorm_rows` in int64 (see :mod:`.kernels`). softmax's mask
  (``<BW,0>`` int8, nonzero = keep, size-1 dims broadcast) is viewed flat ``[n, prod(mask)]``; its
  exponential table (:func:`~fxquant.fixed_point.softmax_exp_table`, int32) is a parameter, as
  layernorm's gamma and beta (int32; beta 0 when absent).
* ``cat``: every input requantized to ``out_fmt`` (ReLU after) and written at its offset on ``dim``.
* ``maxpool2d`` on the integers (dilation, torch's ``ceil_mode`` output size; cells outside the
  input read as ``-128`` and never win); ``avgpool2d``: the window sum over the cells inside the
  input times ``M`` at ``FL_in + s``, ``(M, s) = fixed_point.reciprocal(d)`` with ``d`` the
  window's divisor (:func:`fxquant.integer_graph.avg_divisors`: padding counted, only a
  ceil-mode edge window counts fewer), one requantize per distinct ``d``.
* ``transpose`` and ``upsample_nearest``: index maps (gathers). ``flatten``, ``reshape`` and
  ``mul_pow2`` (same integers, another FL) are views of their (contiguous) input: no kernel.
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
from fxquant.integer_graph import IntegerGraph, Op, avg_terms

MAX_ACT_BITS = 8
WIDE_ACT_BITS = 16
"""Activations of 9..16 bits are int16 where :data:`WIDE_OUT` writes and :data:`WIDE_IN` reads them."""
WIDE_OUT = frozenset({"linear", "conv2d", "add", "requantize", "relu", "clamp", "matmul", "slice", "transpose",
                      "flatten", "reshape", "mul_pow2", "softmax", "layernorm", "embedding", "constant"})
"""Op kinds whose kernel writes int16 (``conv2d``: the ``groups=1`` GEMM only)."""
WIDE_IN = frozenset({"add", "requantize", "relu", "clamp", "matmul", "slice", "transpose", "flatten", "reshape",
                     "mul_pow2", "softmax", "layernorm", "embedding"})
"""Op kinds whose kernel reads int16 inputs (``softmax``: its scores, not its mask)."""


def storage(bits: int) -> str:
    """The integer type holding a ``bits``-bit activation: int8 up to 8 bits, else int16."""
    return "int8" if bits <= MAX_ACT_BITS else "int16"
MAX_WEIGHT_BITS = 8
"""``__dp4a`` multiplies int8 quads: weights wider than 8 bits have no CUDA kernel (refused)."""
PACKED_WEIGHT_BITS = 4
OPS = frozenset({"conv2d", "linear", "add", "avgpool2d", "maxpool2d", "relu", "flatten", "requantize", "reshape",
                 "mul_pow2", "clamp", "lut", "mul", "cat", "transpose", "upsample_nearest", "conv_transpose2d",
                 "matmul", "embedding", "slice", "softmax", "layernorm", "constant"})
VIEW_KINDS = ("flatten", "reshape", "mul_pow2")
"""Ops whose output is their input's integers in another shape or format: a view, no kernel."""
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
    tokens: tuple[int, ...] = ()
    out_dtype: str = "int8"
    res_dtype: str = "int8"
    """Storage of the output and of a fused residual input (int16 for 9..16 bits)."""
    """Linear layers only: the leading dims of a token-wise linear on ``[n, *tokens, features]``
    (GEMM rows ``m = (sample, *token)``, ``M = n prod(tokens)``); ``()`` for ``[n, features]``."""

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
        return (*self.tokens, self.channels) if self.linear else (self.channels, self.height, self.width)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (*self.tokens, self.out_channels) if self.linear else (self.out_channels, *self.out_hw)

    @property
    def weight_shape(self) -> tuple[int, int]:
        return (self.o_padded, self.k_padded // 2 if self.packed else self.k_padded)


@dataclass(frozen=True)
class DirectConvSpec:
    """Direct int8 conv (``transpose=False``: grouped / depthwise ``conv2d``, weight
    ``[O, C/g, KH, KW]``) or ``conv_transpose2d`` (weight ``[C, O/g, KH, KW]``), NCHW, one thread
    per output, int32 accumulator, bias, requantize (+ ReLU)."""

    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    rq: Requant
    transpose: bool = False
    output_padding: tuple[int, int] = (0, 0)

    @property
    def out_hw(self) -> tuple[int, int]:
        if not self.transpose:
            return window_out_hw(self.height, self.width, self.kernel, self.stride, self.padding, self.dilation)
        return tuple((n - 1) * s - 2 * p + d * (k - 1) + q + 1  # type: ignore[return-value]
                     for n, s, p, d, k, q in zip((self.height, self.width), self.stride, self.padding,
                                                 self.dilation, self.kernel, self.output_padding))

    @property
    def weight_shape(self) -> tuple[int, int, int, int]:
        if self.transpose:
            return (self.channels, self.out_channels // self.groups, *self.kernel)
        return (self.out_channels, self.channels // self.groups, *self.kernel)


@dataclass(frozen=True)
class EltwiseSpec:
    """``y = clip(requantize(sum_i x_i << lefts[i]), *clip)`` over int8 ``[n, *shape]`` tensors."""

    shape: tuple[int, ...]
    lefts: tuple[int, ...]
    rq: Requant
    clip: tuple[int | None, int | None] = (None, None)
    """``clamp``'s bounds on the output grid: ``min(max(y, lo), hi)``, ``None`` = unbounded."""
    dtypes: tuple[str, ...] = ()
    """Storage of every input, then of the output; ``()``: all int8."""


@dataclass(frozen=True)
class MulSpec:
    """``y = requantize(a * b)`` over int8 ``[n, *shape]``; ``a``/``b`` of the same rank, size-1
    dims broadcast."""

    shape: tuple[int, ...]
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rq: Requant


@dataclass(frozen=True)
class MatmulSpec:
    """``y = requantize(a @ b)`` of int8 ``[n, *lead, M, K]`` and ``[n, *lead, K, N]``, one thread per output."""

    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    rq: Requant
    dtypes: tuple[str, ...] = ()
    """Storage of ``a``, ``b`` and the output; ``()``: all int8."""

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.a_shape[:-1], self.b_shape[-1])


@dataclass(frozen=True)
class LutSpec:
    """``y = table[x - qmin]`` over int8 ``[n, *shape]``, the int8 table of ``entries`` a parameter."""

    shape: tuple[int, ...]
    qmin: int
    entries: int


@dataclass(frozen=True)
class CatSpec:
    """Inputs ``[n, *shapes[i]]`` each requantized (``rqs[i]``) and concatenated on axis ``dim``
    (``0`` = the first non-batch axis)."""

    shapes: tuple[tuple[int, ...], ...]
    dim: int
    rqs: tuple[Requant, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        first = self.shapes[0]
        return (*first[:self.dim], sum(s[self.dim] for s in self.shapes), *first[self.dim + 1:])


@dataclass(frozen=True)
class TransposeSpec:
    """``y = x.transpose(0, *(p + 1 for p in perm))`` of int8 ``[n, *shape]``."""

    shape: tuple[int, ...]
    perm: tuple[int, ...]
    dtype: str = "int8"


@dataclass(frozen=True)
class UpsampleSpec:
    """Nearest upsampling ``y[b, c, i, j] = x[b, c, i // sh, j // sw]`` of int8 ``[n, C, H, W]``."""

    channels: int
    height: int
    width: int
    scale: tuple[int, int]


@dataclass(frozen=True)
class PoolSpec(PoolShape):
    """Max pooling (``divisors`` empty) or average pooling over int8 ``[n, C, H, W]``: the window
    geometry of :class:`~fxquant.backends.pool_shape.PoolShape` (torch's output size, dilated
    windows for max only); per distinct window divisor ``d`` ``(d, M, Requant)``:
    ``requantize(sum * M)`` with the shift ``FL_out - FL_in - s``."""

    divisors: tuple[tuple[int, int, Requant], ...] = ()

    @property
    def average(self) -> bool:
        return bool(self.divisors)


@dataclass(frozen=True)
class EmbeddingSpec:
    """``y[b, *i, d] = requantize(table[clip(ids[b, *i]), d])`` of ids ``[n, *ids_shape]`` (``ids_dtype``:
    int32 for an id graph input, else the ids' int8 / int16 storage) and the int8 table ``(rows, width)``."""

    ids_shape: tuple[int, ...]
    rows: int
    width: int
    ids_dtype: str
    rq: Requant
    out_dtype: str = "int8"


@dataclass(frozen=True)
class SliceSpec:
    """``y = x[.., start + i step, ..]`` (``i < count``) on axis ``dim`` (0 = the first non-batch
    axis) of int8 ``[n, *shape]``; ``select``: ``x.take(start, dim)``, the axis removed."""

    shape: tuple[int, ...]
    dim: int
    start: int
    step: int
    count: int
    select: bool
    dtype: str = "int8"

    @property
    def out_shape(self) -> tuple[int, ...]:
        if self.select:
            return self.shape[:self.dim] + self.shape[self.dim + 1:]
        return self.shape[:self.dim] + (self.count,) + self.shape[self.dim + 1:]


@dataclass(frozen=True)
class SoftmaxSpec:
    """Integer softmax over the last axis of int8 scores ``[n, *shape]`` (viewed ``[n, R, L]``), one
    thread per row: :func:`fxquant.fixed_point.softmax_rows` with the table of ``table_size`` entries,
    ``K = recip_bits``, ``rq.shift = FL_out - K``; ``qmin`` = the scores' ``qmin``; keep = mask
    (``[n, *mask_shape]`` viewed flat, nonzero = keep) and, ``causal``, key ``<=`` query."""

    shape: tuple[int, ...]
    qmin: int
    table_size: int
    recip_bits: int
    rq: Requant
    causal: bool = False
    mask_shape: tuple[int, ...] | None = None
    dtypes: tuple[str, ...] = ()
    """Storage of the scores and of the output (the mask is int8); ``()``: both int8."""

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])


@dataclass(frozen=True)
class LayerNormSpec:
    """Integer LayerNorm over the last axis of int8 ``[n, *shape]`` (viewed ``[n, R, L]``), one thread
    per row: ``h`` = :func:`fxquant.fixed_point.layernorm_rows` (``eps`` = ``eps_D``), then
    ``requantize(gamma h + beta)`` with ``rq.shift = FL_out - (FL_w + LAYERNORM_FRAC_BITS)``."""

    shape: tuple[int, ...]
    eps: int
    rq: Requant
    dtypes: tuple[str, ...] = ()
    """Storage of the input and of the output; ``()``: both int8."""

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])


@dataclass(frozen=True)
class QuantizeSpec:
    """float32 ``[n, *shape]`` -> int8 ``clamp(round_half_even(x * 2^frac_bits))`` at ``bits``."""

    shape: tuple[int, ...]
    frac_bits: int
    bits: int


@dataclass(frozen=True)
class ConstantSpec:
    """``y[b] = c`` for every sample: a ``constant`` op's integers ``c`` (a parameter of ``shape``)."""

    shape: tuple[int, ...]
    dtype: str = "int8"


KernelSpec = (GemmSpec | DirectConvSpec | MatmulSpec | EltwiseSpec | MulSpec | LutSpec | CatSpec | TransposeSpec
              | UpsampleSpec | PoolSpec | QuantizeSpec | EmbeddingSpec | SliceSpec | SoftmaxSpec | LayerNormSpec
              | ConstantSpec)
ROWS = "#rows"
"""Suffix of a value viewed as ``[n, R, L]`` (the rows of its last axis) for softmax / layernorm;
``#flat``: a mask viewed ``[n, prod(shape)]``; ``#out``: the ``[n, R, L]`` buffer of their output."""


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
    out_dtype: str = "int8"


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
    id_inputs: dict[str, tuple[int, str]] = field(default_factory=dict)
    """Graph inputs read only by embeddings (token ids, passed as int32): ``name -> (rows, op)``, the
    smallest table reading it and its op (ids must lie in ``[0, rows)``)."""

    def kernel_name(self, spec: KernelSpec) -> str:
        """The name of ``spec``'s kernel, adding it on first use (equal specs share a kernel)."""
        for name, known in self.kernels.items():
            if known == spec:
                return name
        kind = {GemmSpec: "linear" if getattr(spec, "linear", False) else "conv2d",
                DirectConvSpec: "conv_transpose2d" if getattr(spec, "transpose", False) else "conv2d_grouped",
                MatmulSpec: "matmul", EltwiseSpec: "eltwise", MulSpec: "mul", LutSpec: "lut", CatSpec: "cat", TransposeSpec: "transpose",
                UpsampleSpec: "upsample", PoolSpec: "pool2d", QuantizeSpec: "quantize", EmbeddingSpec: "embedding",
                SliceSpec: "slice", SoftmaxSpec: "softmax", LayerNormSpec: "layernorm",
                ConstantSpec: "constant"}[type(spec)]
        if isinstance(spec, GemmSpec):
            kind += "_int4" * spec.packed + "_large" * spec.large
        name = f"fxq_{kind}_{len(self.kernels)}"
        self.kernels[name] = spec
        return name

    def to_json(self) -> dict[str, Any]:
        return {"inputs": self.inputs, "outputs": self.outputs, "large_batch": LARGE_BATCH,
                "id_inputs": {k: list(v) for k, v in self.id_inputs.items()},
                "launches": [{"kernel": l.kernel, "kernel_large": l.kernel_large, "args": list(l.args), "out": l.out,
                              "out_shape": list(l.out_shape), "out_dtype": l.out_dtype, "ops": list(l.ops)}
                             for l in self.launches],
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
    widths = legality.width_problems(graph, weight_bits=(2, MAX_WEIGHT_BITS)) + _storage_problems(graph)
    # the linear GEMM is token-wise ([n, *tokens, features], GemmSpec.tokens): no rank limit
    token_wise = {op.name for op in graph.ops if op.kind == "linear" and len(graph.value(op.inputs[0]).shape) > 1}
    shapes = [p for p in legality.shape_problems(graph, groups=True)
              if not (p.kind == "linear" and p.layer in token_wise and p.reason.startswith("linear on an input of shape"))]
    return (widths
            + legality.fit_problems(graph)
            + legality.transformer_problems(graph)
            + shapes
            + legality.accumulator_problems(graph, 32, kinds=("conv2d", "linear", "matmul", "add", "avgpool2d",
                                                              "mul", "conv_transpose2d"))
            + legality.avg_window_problems(graph, reciprocal=True)
            + legality.window_problems(graph, dilation=True, ceil_mode=True)
            + _kernel_problems(graph))


def id_inputs(graph: IntegerGraph) -> dict[str, tuple[int, str]]:
    """Graph inputs read by embeddings only (and not graph outputs): ``name -> (rows, op)`` of the
    smallest table that reads it (see :attr:`Plan.id_inputs`)."""
    readers: dict[str, list[Op]] = {}
    for op in graph.ops:
        for name in op.inputs:
            readers.setdefault(name, []).append(op)
    out = {}
    for v in graph.inputs:
        ops = readers.get(v.name, [])
        tables = [op for op in ops if op.kind == "embedding" and op.weight is not None]
        if tables and v.name not in graph.outputs and all(op in tables or op.kind == "constant" for op in ops):
            op = min(tables, key=lambda o: o.weight.shape[0])  # a constant reads only the batch size
            out[v.name] = (int(op.weight.shape[0]), op.name)
    return out


def _wide_out(op: Op) -> bool:
    return op.kind in WIDE_OUT and not (op.kind == "conv2d" and op.attrs.get("groups", 1) != 1)


def _storage_problems(graph: IntegerGraph) -> list[Problem]:
    """Activations the int8 / int16 storage cannot hold (see :data:`WIDE_OUT` / :data:`WIDE_IN`), each
    named at the op whose kernel cannot write or read it (token-id inputs are int32: exempt)."""
    ids = set(id_inputs(graph))
    problems = []
    for op in graph.ops:
        bits = op.out_fmt.bits
        if bits > WIDE_ACT_BITS or (bits > MAX_ACT_BITS and not _wide_out(op)):
            problems.append(_problem(op, f"{bits}-bit output; this target holds 2-{MAX_ACT_BITS}-bit activations "
                                         f"(int16 up to {WIDE_ACT_BITS} bits from: {', '.join(sorted(WIDE_OUT))})"))
        for i, name in enumerate(op.inputs):
            bits = graph.value(name).fmt.bits
            if name in ids or bits <= MAX_ACT_BITS or op.kind == "constant":  # a constant reads no integers
                continue
            if bits > WIDE_ACT_BITS or op.kind not in WIDE_IN or (op.kind == "softmax" and i > 0):
                problems.append(_problem(op, f"{bits}-bit input; this target holds 2-{MAX_ACT_BITS}-bit activations "
                                             f"for {op.kind} (input {name!r}; int16 into: {', '.join(sorted(WIDE_IN))})"))
    return problems


def _problem(op: Op, reason: str) -> Problem:
    return Problem(op.name, op.kind, reason)


def cat_axis(graph: IntegerGraph, op: Op) -> int:
    """``op``'s ``cat`` axis counted from the first non-batch axis (``-1``: the batch axis)."""
    rank = len(graph.value(op.output).shape) + 1
    dim = int(op.attrs.get("dim", 1))
    return (dim + rank if dim < 0 else dim) - 1


def _kernel_problems(graph: IntegerGraph) -> list[Problem]:
    """What the CUDA kernels themselves lack (beyond the shared legality rules)."""
    problems = []
    for op in graph.ops:
        if op.kind == "avgpool2d":
            if tuple(op.attrs.get("dilation", (1, 1))) != (1, 1):
                problems.append(_problem(op, f"average pooling with dilation {tuple(op.attrs['dilation'])}; this "
                                             "target has undilated average windows only"))
        elif op.kind == "mul":
            a, b = (graph.value(i).shape for i in op.inputs)
            if len(a) != len(b) or any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
                problems.append(_problem(op, f"mul of shapes {list(a)} and {list(b)}; this target broadcasts "
                                             "size-1 dimensions of inputs of equal rank only"))
        elif op.kind == "matmul":
            a, b = (graph.value(i).shape for i in op.inputs)
            if len(a) < 2 or len(a) != len(b) or a[:-2] != b[:-2] or a[-1] != b[-2]:
                problems.append(_problem(op, f"matmul of shapes {list(a)} and {list(b)}; this target multiplies "
                                             "[.., M, K] x [.., K, N] with equal leading dimensions only"))
        elif op.kind == "cat" and cat_axis(graph, op) < 0:
            problems.append(_problem(op, "cat on the batch dimension; this target concatenates per sample"))
    return problems


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
        self.plan.id_inputs = id_inputs(graph)

    def fl(self, name: str) -> int:
        frac_bits = self.graph.value(name).fmt.frac_bits
        assert frac_bits is not None  # check_graph
        return frac_bits

    def bits(self, name: str) -> int:
        return self.graph.value(name).fmt.bits

    def dtype(self, name: str) -> str:
        return storage(self.bits(name))

    def dtypes(self, *names: str) -> tuple[str, ...]:
        """Storage of ``names`` (``()`` when all are int8: the specs' default)."""
        out = tuple(self.dtype(n) for n in names)
        return () if all(d == "int8" for d in out) else out

    def fusable(self, name: str) -> bool:
        """``name`` is a GEMM output read only by one add of two distinct values, not a graph output."""
        users = self.users.get(name, [])
        return (name not in self.graph.outputs and len(users) == 1 and users[0].kind == "add"
                and len(set(users[0].inputs)) == 2)

    @staticmethod
    def is_gemm(op: Op) -> bool:
        """``linear`` and ``groups=1`` ``conv2d``: the dp4a implicit GEMM (residual adds fuse into it)."""
        return op.kind == "linear" or (op.kind == "conv2d" and op.attrs.get("groups", 1) == 1)

    def requant(self, op: Op, frac_bits_in: int) -> Requant:
        assert op.out_fmt.frac_bits is not None  # check_graph
        return Requant(op.out_fmt.frac_bits - frac_bits_in, op.out_fmt.bits, bool(op.attrs.get("relu")))

    def launch(self, spec: KernelSpec, args: tuple[str, ...], out: str, ops: tuple[str, ...]) -> None:
        shape = self.graph.value(out).shape
        large = None
        if isinstance(spec, GemmSpec) and spec.linear:
            large = self.plan.kernel_name(replace(spec, large=True))
        self.plan.launches.append(Launch(self.plan.kernel_name(spec), args, out, shape, ops, large, self.dtype(out)))

    def gemm(self, op: Op, residual: tuple[str, Residual, Op] | None) -> None:
        assert op.weight is not None and op.weight_fmt is not None and op.weight_fmt.frac_bits is not None
        (src,) = op.inputs
        w = np.asarray(op.weight, np.int64)
        bias = np.zeros(w.shape[0], np.int64) if op.bias is None else np.asarray(op.bias, np.int64)
        legality.require_fits(self.graph.accumulator_bound(op), f"op {op.name!r}")
        common = dict(weight_bits=op.weight_fmt.bits, rq=self.requant(op, self.fl(src) + op.weight_fmt.frac_bits),
                      residual=residual[1] if residual else None,
                      out_dtype=self.dtype(residual[2].output if residual else op.output),
                      res_dtype=self.dtype(residual[0]) if residual else "int8")
        if op.kind == "linear":
            spec = GemmSpec(w.shape[1], 1, 1, w.shape[0], linear=True, tokens=tuple(self.graph.value(src).shape[:-1]),
                            **common)
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
            self.launch(EltwiseSpec(self.graph.value(op.output).shape, lefts, self.requant(op, fl),
                                    dtypes=self.dtypes(*op.inputs, op.output)), op.inputs, op.output, (op.name,))
            return
        other = op.inputs[0] if op.inputs[1] == fused else op.inputs[1]
        if other in self.deferred:  # both inputs are GEMMs read only here: run the other one first
            self.deferred.discard(other)
            self.gemm(self.producer[other], None)
        spec = Residual(fl - self.fl(fused), fl - self.fl(other), self.requant(op, fl))
        self.deferred.discard(fused)
        self.gemm(self.producer[fused], (other, spec, op))

    def direct_conv(self, op: Op) -> None:
        """Grouped / depthwise ``conv2d`` and ``conv_transpose2d``: int8 weights as they are, int32 biases."""
        (src,) = op.inputs
        assert op.weight is not None and op.weight_fmt is not None and op.weight_fmt.frac_bits is not None
        c, h, w = self.graph.value(src).shape
        transpose = op.kind == "conv_transpose2d"
        out_channels = op.weight.shape[1] * op.attrs.get("groups", 1) if transpose else op.weight.shape[0]
        legality.require_fits(self.graph.accumulator_bound(op), f"op {op.name!r}")
        spec = DirectConvSpec(c, h, w, out_channels, tuple(op.weight.shape[2:]), tuple(op.attrs.get("stride", (1, 1))),
                              tuple(op.attrs.get("padding", (0, 0))), tuple(op.attrs.get("dilation", (1, 1))),
                              int(op.attrs.get("groups", 1)), self.requant(op, self.fl(src) + op.weight_fmt.frac_bits),
                              transpose, tuple(op.attrs.get("output_padding", (0, 0))))
        assert spec.out_hw == tuple(self.graph.value(op.output).shape[1:]), (op.name, spec.out_hw)
        bias = np.zeros(out_channels, np.int64) if op.bias is None else np.asarray(op.bias, np.int64)
        self.plan.params[f"{op.name}.weight"] = np.asarray(op.weight, np.int64).astype(np.int8)
        self.plan.params[f"{op.name}.bias"] = bias.astype(np.int32)
        self.launch(spec, (src, f"param:{op.name}.weight", f"param:{op.name}.bias"), op.output, (op.name,))

    def pool(self, op: Op) -> None:
        (src,) = op.inputs
        c, h, w = self.graph.value(src).shape
        kernel = tuple(op.attrs["kernel"])
        divisors: tuple[tuple[int, int, Requant], ...] = ()
        if op.kind == "avgpool2d":
            terms = avg_terms(op, h, w)
            top = 1 << (self.bits(src) - 1)
            for d, m, _ in terms:
                legality.require_fits(top * d * m, f"op {op.name!r} ({d}-cell windows)")
            divisors = tuple((d, m, self.requant(op, self.fl(src) + sh)) for d, m, sh in terms)
        spec = PoolSpec(c, h, w, kernel, tuple(op.attrs.get("stride", kernel)), tuple(op.attrs.get("padding", (0, 0))),
                        tuple(op.attrs.get("dilation", (1, 1))), bool(op.attrs.get("ceil_mode", False)), divisors)
        assert spec.out_hw == tuple(self.graph.value(op.output).shape[1:]), (op.name, spec.out_hw)
        self.launch(spec, op.inputs, op.output, (op.name,))

    def eltwise(self, op: Op) -> None:
        """``requantize`` / ``relu`` / ``clamp``: one input, requantize (+ ReLU, + clip)."""
        (src,) = op.inputs
        shape = self.graph.value(src).shape
        if op.kind == "relu":
            spec = EltwiseSpec(shape, (0,), Requant(0, op.out_fmt.bits, True))
        elif op.kind == "clamp":  # the reference's clamp ignores a relu attribute: clip only
            assert op.out_fmt.frac_bits is not None  # check_graph
            lo, hi = op.attrs.get("lo"), op.attrs.get("hi")
            spec = EltwiseSpec(shape, (0,), Requant(op.out_fmt.frac_bits - self.fl(src), op.out_fmt.bits),
                               (None if lo is None else int(lo), None if hi is None else int(hi)))
        else:
            spec = EltwiseSpec(shape, (0,), self.requant(op, self.fl(src)))
        self.launch(replace(spec, dtypes=self.dtypes(src, op.output)), op.inputs, op.output, (op.name,))

    def mul(self, op: Op) -> None:
        a, b = op.inputs
        legality.require_fits(self.graph.accumulator_bound(op), f"op {op.name!r}")
        spec = MulSpec(self.graph.value(op.output).shape, self.graph.value(a).shape, self.graph.value(b).shape,
                       self.requant(op, self.fl(a) + self.fl(b)))
        self.launch(spec, op.inputs, op.output, (op.name,))

    def matmul(self, op: Op) -> None:
        a, b = op.inputs
        legality.require_fits(self.graph.accumulator_bound(op), f"op {op.name!r}")
        spec = MatmulSpec(self.graph.value(a).shape, self.graph.value(b).shape, self.requant(op, self.fl(a) + self.fl(b)),
                          self.dtypes(a, b, op.output))
        assert spec.shape == self.graph.value(op.output).shape, (op.name, spec.shape)
        self.launch(spec, op.inputs, op.output, (op.name,))

    def lut(self, op: Op) -> None:
        (src,) = op.inputs
        v = self.graph.value(src)
        table = np.asarray(op.attrs["table"], np.int64)
        if table.size != 1 << v.fmt.bits or table.min() < op.out_fmt.qmin or table.max() > op.out_fmt.qmax:
            raise UnsupportedOpError(f"op {op.name!r}: table of {table.size} entries does not map the "
                                     f"{v.fmt.bits}-bit input into {op.out_fmt}")
        self.plan.params[f"{op.name}.table"] = table.astype(np.int8)  # entries in the <= 8-bit output format
        self.launch(LutSpec(v.shape, v.fmt.qmin, int(table.size)), (src, f"param:{op.name}.table"), op.output,
                    (op.name,))

    def arg(self, name: str) -> str:
        """The launch argument of value ``name`` (``"int:<name>"`` for a token-id graph input)."""
        return f"int:{name}" if name in self.plan.id_inputs else name

    def embedding(self, op: Op) -> None:
        (ids,) = op.inputs
        assert op.weight is not None and op.weight_fmt is not None and op.weight_fmt.frac_bits is not None
        table = np.asarray(op.weight, np.int64)
        spec = EmbeddingSpec(self.graph.value(ids).shape, int(table.shape[0]), int(table.shape[1]),
                             "int32" if ids in self.plan.id_inputs else self.dtype(ids),
                             Requant(op.out_fmt.frac_bits - op.weight_fmt.frac_bits, op.out_fmt.bits),
                             self.dtype(op.output))
        self.plan.params[f"{op.name}.table"] = table.astype(np.int8)  # <= 8-bit weights: graph_problems
        self.launch(spec, (self.arg(ids), f"param:{op.name}.table"), op.output, (op.name,))

    def constant(self, op: Op) -> None:
        """The integers as a parameter, copied into every sample (the input gives only the batch)."""
        assert op.weight is not None
        dtype = self.dtype(op.output)
        self.plan.params[f"{op.name}.values"] = np.asarray(op.weight, np.int64).astype(dtype)
        self.launch(ConstantSpec(tuple(int(d) for d in op.weight.shape), dtype), (f"param:{op.name}.values",),
                    op.output, (op.name,))

    def slice(self, op: Op) -> None:
        (src,) = op.inputs
        a, shape = op.attrs, self.graph.value(src).shape
        select = "index" in a
        start = int(a["index"] if select else a["start"])
        step = 1 if select else int(a.get("step", 1))
        count = 1 if select else len(range(start, int(a["stop"]), step))
        spec = SliceSpec(shape, int(a["dim"]) - 1, start, step, count, select, self.dtype(src))
        assert spec.out_shape == self.graph.value(op.output).shape, (op.name, spec.out_shape)
        self.launch(spec, (src,), op.output, (op.name,))

    def rows_view(self, name: str) -> str:
        """``name`` viewed as ``[n, R, L]`` (a view of its contiguous buffer, no kernel)."""
        shape = self.graph.value(name).shape
        self.plan.views[name + ROWS] = (name, (math.prod(shape[:-1]), shape[-1]))
        return name + ROWS

    def row_launch(self, spec: KernelSpec, args: tuple[str, ...], op: Op) -> None:
        """A per-row kernel writes ``[n, R, L]`` into ``<out>#out``; the op's output is its view."""
        shape = self.graph.value(op.output).shape
        out = op.output + "#out"
        self.plan.launches.append(Launch(self.plan.kernel_name(spec), args, out, (math.prod(shape[:-1]), shape[-1]),
                                         (op.name,), out_dtype=self.dtype(op.output)))
        self.plan.views[op.output] = (out, shape)

    def softmax(self, op: Op) -> None:
        from fxquant.fixed_point import SOFTMAX_EXP_BITS, softmax_exp_table, softmax_recip_bits

        v = self.graph.value(op.inputs[0])
        e_bits = int(op.attrs.get("exp_bits", SOFTMAX_EXP_BITS))
        table = softmax_exp_table(v.fmt, e_bits)
        k = softmax_recip_bits(op.out_fmt, e_bits)
        mask = op.inputs[1] if len(op.inputs) > 1 else None
        spec = SoftmaxSpec(v.shape, v.fmt.qmin, int(table.size), k, Requant(int(op.out_fmt.frac_bits) - k, op.out_fmt.bits),
                           bool(op.attrs.get("causal")), None if mask is None else self.graph.value(mask).shape,
                           self.dtypes(op.inputs[0], op.output))
        self.plan.params[f"{op.name}.exp_table"] = table.astype(np.int32)  # entries <= 2^E <= 2^24
        args = (self.rows_view(op.inputs[0]), f"param:{op.name}.exp_table")
        if mask is not None:
            flat = mask + "#flat"
            self.plan.views[flat] = (mask, (math.prod(self.graph.value(mask).shape),))
            args += (flat,)
        self.row_launch(spec, args, op)

    def layernorm(self, op: Op) -> None:
        from fxquant.fixed_point import LAYERNORM_FRAC_BITS

        (src,) = op.inputs
        assert op.weight is not None and op.weight_fmt is not None and op.weight_fmt.frac_bits is not None
        n = self.graph.value(src).shape[-1]
        spec = LayerNormSpec(self.graph.value(src).shape, int(op.attrs["eps"]),
                             Requant(int(op.out_fmt.frac_bits) - op.weight_fmt.frac_bits - LAYERNORM_FRAC_BITS,
                                     op.out_fmt.bits, bool(op.attrs.get("relu"))), self.dtypes(src, op.output))
        beta = np.zeros(n, np.int64) if op.bias is None else np.asarray(op.bias, np.int64)
        self.plan.params[f"{op.name}.gamma"] = np.asarray(op.weight, np.int64).astype(np.int32)
        self.plan.params[f"{op.name}.beta"] = beta.astype(np.int32)  # int32 on FL_w + FL_h: fit_problems
        self.row_launch(spec, (self.rows_view(src), f"param:{op.name}.gamma", f"param:{op.name}.beta"), op)

    def cat(self, op: Op) -> None:
        assert op.out_fmt.frac_bits is not None  # check_graph
        relu = bool(op.attrs.get("relu"))
        rqs = tuple(Requant(op.out_fmt.frac_bits - self.fl(i), op.out_fmt.bits, relu) for i in op.inputs)
        spec = CatSpec(tuple(self.graph.value(i).shape for i in op.inputs), cat_axis(self.graph, op), rqs)
        assert spec.shape == self.graph.value(op.output).shape, (op.name, spec.shape)
        self.launch(spec, op.inputs, op.output, (op.name,))

    def run(self) -> Plan:
        for v in self.graph.inputs:
            if v.name not in self.plan.id_inputs:  # token ids arrive as int32: no quantize kernel
                self.launch_input(v.name)
        for op in self.graph.ops:
            shape = self.graph.value(op.inputs[0]).shape
            if self.is_gemm(op):
                if self.fusable(op.output):
                    self.deferred.add(op.output)
                else:
                    self.gemm(op, None)
            elif op.kind in ("conv2d", "conv_transpose2d"):
                self.direct_conv(op)
            elif op.kind == "add":
                self.add(op)
            elif op.kind in ("maxpool2d", "avgpool2d"):
                self.pool(op)
            elif op.kind in VIEW_KINDS:
                self.plan.views[op.output] = (op.inputs[0], self.graph.value(op.output).shape)
            elif op.kind == "mul":
                self.mul(op)
            elif op.kind == "matmul":
                self.matmul(op)
            elif op.kind == "lut":
                self.lut(op)
            elif op.kind == "cat":
                self.cat(op)
            elif op.kind == "embedding":
                self.embedding(op)
            elif op.kind == "slice":
                self.slice(op)
            elif op.kind == "softmax":
                self.softmax(op)
            elif op.kind == "layernorm":
                self.layernorm(op)
            elif op.kind == "constant":
                self.constant(op)
            elif op.kind == "transpose":
                self.launch(TransposeSpec(shape, tuple(int(p) for p in op.attrs["perm"]), self.dtype(op.inputs[0])),
                            op.inputs, op.output, (op.name,))
            elif op.kind == "upsample_nearest":
                self.launch(UpsampleSpec(*shape, tuple(int(f) for f in op.attrs["scale"])), op.inputs, op.output,
                            (op.name,))
            else:  # requantize, relu, clamp
                self.eltwise(op)
        return self.plan

    def launch_input(self, name: str) -> None:
        v = self.graph.value(name)
        spec = QuantizeSpec(v.shape, self.fl(name), v.fmt.bits)
        self.plan.launches.append(Launch(self.plan.kernel_name(spec), (f"float:{name}",), name, v.shape, (),
                                         out_dtype=self.dtype(name)))


def plan_graph(graph: IntegerGraph) -> Plan:
    """The launch plan of ``graph``; :class:`UnsupportedOpError` listing every :func:`graph_problems`."""
    problems = ([Problem(op.name, op.kind, f"op kind {op.kind!r} has no fxquant CUDA kernel")
                 for op in graph.ops if op.kind not in OPS] + legality.lut_problems(graph) + graph_problems(graph))
    if problems:
        raise UnsupportedOpError(f"the CUDA kernels cannot build this graph ({len(problems)} problems): "
                                 + "; ".join(map(str, problems)), "see docs/coverage.md")
    return _Planner(graph).run()
