"""Layer plan: an :class:`~fxquant.integer_graph.IntegerGraph` checked and sized for the HLS backend.

Runs first in the FPGA backend; the code generator (:mod:`.codegen`) and the resource model
(:mod:`.estimates`) both read the plan, so widths and shapes are computed once.

Every value is an ``ap_int<BW>`` holding the integer ``k`` of ``k * 2^-FL`` (the HLS twin of
``ap_fixed<BW, BW-FL, AP_RND_CONV, AP_SAT>``, which is not used because it is undefined for the
shifts that extreme ``FL`` produce; see ``docs/fpga.md``). Per op kind, with ``FL_acc`` the grid of
the accumulator and ``shift = FL_out - FL_acc`` the requantize shift:

* ``conv2d``/``linear``/``conv_transpose2d``: ``acc = sum(a*w) + b`` in
  ``ap_int<accumulator_bits(BW_in, BW_w, fan_in, 32 if bias)>`` (exact,
  :func:`fxquant.fixed_point.accumulator_bits`; a transposed conv's fan-in is every tap of its
  group, ``C_in/groups * kh * kw``), ``FL_acc = FL_in + FL_w``. Grouped / depthwise conv included.
* ``add`` (two inputs): ``acc = (a << (FL - FL_a)) + (b << (FL - FL_b))`` with ``FL = max(FL_a,
  FL_b)``; width ``max(BW_i + FL - FL_i) + 1``.
* ``mul`` (two inputs, numpy broadcasting over at most :data:`MUL_RANK` dims): ``acc = a * b`` in
  ``ap_int<BW_a + BW_b>`` (exact) at ``FL_a + FL_b``; ``detail`` holds the output dims and each
  input's strides (0 on a broadcast dim).
* ``avgpool2d`` (any window, padding, ``ceil_mode``; no dilation): a window of divisor ``d``
  (:func:`fxquant.integer_graph.avg_divisors`) is ``sum * M_d`` at ``FL_in + s_d``,
  ``(M_d, s_d) = reciprocal(d)``; on the common grid ``FL_acc = FL_in + S``, ``S = max s_d`` over
  the divisors that occur, that is ``sum * m[d]`` with ``m[d] = M_d << (S - s_d)`` (an exact left
  shift, so the requantize is the reference's). Widths: ``sum`` ``bitlen(kh*kw * 2^(BW_in-1)) + 1``,
  ``acc`` ``bitlen(max_d d * 2^(BW_in-1) * m[d]) + 1``.
* ``cat`` (any number of inputs, any non-batch dim): each input requantized to the output format
  on its own (``in_shifts[i] = FL_out - FL_i``) and written to its slice: ``outer`` blocks (the
  dims before the axis) of ``inner[i]`` integers at ``offsets[i]`` in a row of ``out_inner``.
* ``requantize``, ``clamp``: ``acc`` is the input itself; ``clamp`` then clips to ``lo``/``hi``.
* ``lut``: ``y = table[x - qmin_in]`` (a ROM of ``2^BW_in`` entries, ``BW_in <= MAX_LUT_BITS``,
  each entry inside the output format).
* ``maxpool2d`` (padding, dilation, ``ceil_mode``; every window must hold an input cell),
  ``relu``, ``flatten``, ``reshape``, ``transpose`` and ``upsample_nearest`` (a strided gather over
  at most :data:`GATHER_RANK` dims), ``mul_pow2`` (``FL_out = FL_in - exponent``, same ``BW``): act
  on the integers; the output format is the input's (``mul_pow2``: relabelled).

* ``linear`` on an input of any rank acts on the last axis: ``detail["rows"]`` rows of ``n_in``.
* ``matmul`` (two activations, equal ranks 2..:data:`MATMUL_RANK`, batch excluded; the leading
  dims broadcast as numpy's): ``acc = a @ b`` at ``FL_a + FL_b`` in ``ap_int<bitlen(bound) + 1>``,
  ``bound = 2^(BW_a-1) 2^(BW_b-1) K`` (:meth:`IntegerGraph.accumulator_bound`, exact); ``detail``
  holds the leading dims padded to two and each operand's block strides (0 on a broadcast dim).
* ``embedding``: ``y = requantize(table[id])`` from ``FL_w`` (a ROM gather; ``shift = FL_out -
  FL_w``); ids ``<BW,0>`` are checked against ``[0, V)`` on the host, never clipped.
* ``softmax`` (scores of rank 1..:data:`SOFTMAX_RANK`, optional mask of the same rank, ``causal``):
  :func:`fxquant.fixed_point.softmax_rows` with the exp ROM, an exact row sum, one division per
  row for ``r = (2^(K+1) + s) // (2 s)`` and ``requantize(e r)`` with ``shift = FL_out - K``;
  ``detail`` holds the widths of ``e``, ``s``, ``r`` (from ``L``, ``E`` and ``K``) and the mask strides.
* ``layernorm``: :func:`fxquant.fixed_point.layernorm_rows` (exact sums, bit length, ``isqrt64``
  in 32 steps, one division per row), then ``gamma h + beta`` at ``FL_g + 16`` in
  ``ap_int<bitlen(bound) + 1>`` (:meth:`IntegerGraph.accumulator_bound`) and a requantize.
* ``slice`` (and select): a strided gather (``fxq::gather`` with an offset), format kept.
* ``constant``: a ROM of the integers copied into the output (``fxq::copy``); its input (the
  batch reference) is not read: the generated function computes one sample.

Limits: any number of graph inputs and outputs (an output must be computed by an op), value widths 2..16 (``BW = 32`` is *off*, i.e. float,
and has no integer form), accumulators of at most :data:`MAX_ACC_BITS` bits (the reference
simulator computes in int64), weights and biases that fit their declared widths.
:func:`graph_problems` lists every limit a graph breaks (the shared rules from
:mod:`fxquant.legality`, then each remaining layer planned on its own), which is what
``FpgaTarget.check`` reports; :func:`plan_graph` raises :mod:`fxquant.errors` at the first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from fxquant import legality
from fxquant.backends.base import Problem
from fxquant.errors import ExportError, FxquantError, PrecisionError, UnsupportedOpError
from fxquant.fixed_point import (BIAS_BITS, LAYERNORM_FRAC_BITS, LAYERNORM_RECIP_BITS, MAX_LUT_BITS, SOFTMAX_EXP_BITS,
                                 FixedPoint, accumulator_bits, min_signed_bits, softmax_exp_table, softmax_recip_bits)
from fxquant.integer_graph import (TRANSPARENT_KINDS, IntegerGraph, Op, Value, avg_terms, layernorm_h_bound,
                                   pool_output_size)
from fxquant.integer_ops_transformer import slice_shape

MAX_BITS = 16
"""Widest value / weight format generated (``ap_int<2..16>``)."""
MAX_ACC_BITS = 64
"""Widest accumulator generated: the integer reference (:meth:`IntegerGraph.run`) is int64."""
SUPPORTED_KINDS = ("conv2d", "linear", "conv_transpose2d", "add", "mul", "cat", "avgpool2d", "maxpool2d", "relu",
                   "clamp", "lut", "flatten", "reshape", "transpose", "upsample_nearest", "mul_pow2", "requantize",
                   "matmul", "embedding", "softmax", "layernorm", "slice", "constant")
MATMUL_RANK = 4
"""Dims (batch excluded) of a ``matmul`` operand: two leading (batch / head) dims, then the matrix."""
SOFTMAX_RANK = 4
"""Dims (batch excluded) of softmax scores: three leading dims, then the row."""
MUL_RANK = 4
"""Dims (batch excluded) of a broadcast ``mul``."""
GATHER_RANK = 6
"""Dims of the strided read that moves a ``transpose`` (rank <= 6) or an ``upsample_nearest`` (5)."""


@dataclass(frozen=True)
class LayerPlan:
    """One op of the graph, sized for HLS.

    ``mults`` is the number of multiplications per pipeline iteration and ``iterations`` the
    number of iterations per inference (output pixels for conv/pool, 1 for dense/elementwise).
    ``in_shifts``: per-input left shifts onto the accumulator grid (``add``) or per-input
    requantize shifts to the output format (``cat``).
    """

    op: Op
    ident: str
    inputs: tuple[Value, ...]
    output: Value
    acc_bits: int
    acc_frac_bits: int
    shift: int
    in_shifts: tuple[int, ...]
    mults: int
    iterations: int
    fan_in: int
    detail: dict = field(default_factory=dict, compare=False)
    """Per kind: ``avgpool2d`` divisor multipliers, ``mul`` / ``transpose`` / ``upsample_nearest``
    dims and strides, ``cat`` slices, ``lut`` table."""

    @property
    def kind(self) -> str:
        return self.op.kind

    @property
    def out_size(self) -> int:
        return math.prod(self.output.shape)

    @property
    def weight_bits(self) -> int:
        """Σ params · bits of this layer: weights at their width, biases at int32."""
        total = 0
        if self.op.weight is not None and self.op.weight_fmt is not None:
            total += self.op.weight.size * self.op.weight_fmt.bits
        if self.op.bias is not None:
            total += self.op.bias.size * BIAS_BITS
        return total


@dataclass(frozen=True)
class ModelPlan:
    """The planned graph: its inputs and outputs in graph order, one :class:`LayerPlan` per op.

    The C model's host interface (``fxq_model_raw``, the ctypes bridge, the testbench) takes one
    sample as every input's integers concatenated in graph order (``in_size`` in all) and returns
    every output's integers concatenated in graph order (``out_size``)."""

    graph: IntegerGraph
    inputs: tuple[Value, ...]
    outputs: tuple[Value, ...]
    layers: tuple[LayerPlan, ...]

    @property
    def input(self) -> Value:
        return self.inputs[0]

    @property
    def output(self) -> Value:
        return self.outputs[0]

    @property
    def in_size(self) -> int:
        return sum(math.prod(v.shape) for v in self.inputs)

    @property
    def out_size(self) -> int:
        return sum(math.prod(v.shape) for v in self.outputs)


def c_ident(index: int, name: str) -> str:
    """A unique C identifier for op ``index`` named ``name`` (``layer1.0.add`` -> ``l3_layer1_0_add``)."""
    return f"l{index}_" + re.sub(r"[^0-9A-Za-z_]", "_", name)


def _check_fmt(fmt: FixedPoint, what: str) -> int:
    if fmt.is_off or fmt.frac_bits is None:
        raise PrecisionError(f"{what} has format {fmt}, which has no integer form",
                             "quantize every value and weight (2..16 bits, fixed FL) before FPGA export")
    if fmt.bits > MAX_BITS:
        raise PrecisionError(f"{what} has {fmt.bits} bits, wider than {MAX_BITS}", f"use 2..{MAX_BITS} bits")
    return fmt.frac_bits


def _check_acc(op: Op, bits: int) -> int:
    if bits > MAX_ACC_BITS:
        raise PrecisionError(f"op {op.name!r}: accumulator needs {bits} bits, more than {MAX_ACC_BITS}",
                             "use narrower formats or a smaller fan-in / format spread")
    return bits


def _check_ints(op: Op, arr: np.ndarray, bits: int, what: str) -> None:
    need = min_signed_bits(arr)
    if need > bits:
        raise PrecisionError(f"op {op.name!r}: {what} needs {need} bits, more than its {bits}-bit format",
                             "re-lower the graph; integers must fit their declared width")


def _window_out(size: int, kernel: int, stride: int, pad: int, dilation: int = 1) -> int:
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def pool_attrs(op: Op) -> tuple[tuple[int, int], ...]:
    """``(kernel, stride, padding, dilation)`` of a pool op, torch's defaults filled in."""
    kernel = tuple(int(k) for k in op.attrs["kernel"])
    return (kernel, tuple(int(s) for s in op.attrs.get("stride", kernel)),
            tuple(int(p) for p in op.attrs.get("padding", (0, 0))),
            tuple(int(d) for d in op.attrs.get("dilation", (1, 1))))


def row_major_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of a C-contiguous array of ``shape``."""
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= d
    return tuple(reversed(strides))


def broadcast_strides(shape: tuple[int, ...], out_shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """Strides reading ``shape`` broadcast (numpy rules) onto ``out_shape``, both padded to ``rank``
    dims with leading 1s: 0 on a dim of size 1."""
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return tuple(0 if d == 1 else s for d, s in zip(padded, row_major_strides(padded)))


def _cat_axis(op: Op, rank: int) -> int:
    """The non-batch axis of a ``cat`` on ``attrs["dim"]`` (batch included, negative counts from the end)."""
    dim = int(op.attrs.get("dim", 1))
    if not -(rank + 1) <= dim <= rank or dim % (rank + 1) == 0:
        raise UnsupportedOpError(f"op {op.name!r}: cat on dim {dim} of a rank-{rank + 1} tensor (with the batch)"
                                 " is not supported by the FPGA backend", "concatenate along a non-batch dim")
    return dim % (rank + 1) - 1


def _empty_windows(op: Op, size: tuple[int, ...], out: tuple[int, ...]) -> list[int]:
    """Axes on which some max-pool window holds no input cell (only padding or ceil-mode overhang)."""
    kernel, stride, pad, dil = pool_attrs(op)
    bad = []
    for axis, (n, o, k, s, p, d) in enumerate(zip(size, out, kernel, stride, pad, dil)):
        cells = (np.arange(o)[:, None] * s - p) + np.arange(k)[None, :] * d
        if not ((cells >= 0) & (cells < n)).any(axis=1).all():
            bad.append(axis)
    return bad


def _expected_shape(op: Op, ins: tuple[Value, ...]) -> tuple[int, ...]:
    """The output shape the reference produces for ``op`` (the generated C indexes by it)."""
    shape = ins[0].shape
    kind = op.kind
    if kind in ("conv2d", "maxpool2d", "avgpool2d", "conv_transpose2d", "upsample_nearest") and len(shape) != 3:
        raise UnsupportedOpError(f"op {op.name!r}: {kind} on an input of shape {list(shape)}; "
                                 "the FPGA kernel takes images (C, H, W)")
    if kind == "linear":
        if not shape or shape[-1] != op.weight.shape[1]:
            raise ExportError(f"op {op.name!r}: linear weight {tuple(op.weight.shape)} does not fit input {shape}")
        return (*shape[:-1], op.weight.shape[0])
    if kind == "matmul":
        return _matmul_shape(op, ins)
    if kind == "embedding":
        if op.weight is None or op.weight.ndim != 2:
            raise ExportError(f"op {op.name!r}: embedding without a (V, D) table", "lower nn.Embedding's weight")
        return (*shape, op.weight.shape[1])
    if kind == "slice":
        return slice_shape(op, shape)
    if kind == "constant":
        if op.weight is None:
            raise ExportError(f"op {op.name!r}: constant without integers", "re-lower the graph")
        return tuple(op.weight.shape)
    if kind in ("softmax", "layernorm") and (not shape or op.attrs.get("dim", len(shape)) != len(shape)):
        raise UnsupportedOpError(f"op {op.name!r}: {kind} over axis {op.attrs.get('dim')!r} of a rank-{len(shape)} "
                                 "value (batch excluded), not its last axis", "normalize over the last axis")
    if kind == "conv2d":
        kh, kw = op.weight.shape[2:]
        stride, dil = op.attrs.get("stride", (1, 1)), op.attrs.get("dilation", (1, 1))
        channels = op.weight.shape[0]
        groups = op.attrs.get("groups", 1)
        if shape[0] != op.weight.shape[1] * groups or channels % groups:
            raise ExportError(f"op {op.name!r}: conv weight {tuple(op.weight.shape)} with groups={groups} "
                              f"does not fit input {shape}")
        pad = op.attrs.get("padding", (0, 0))
        return (channels, _window_out(shape[1], kh, stride[0], pad[0], dil[0]),
                _window_out(shape[2], kw, stride[1], pad[1], dil[1]))
    if kind == "conv_transpose2d":
        cin, cog, kh, kw = op.weight.shape
        groups = op.attrs.get("groups", 1)
        if shape[0] != cin or cin % groups:
            raise ExportError(f"op {op.name!r}: transposed conv weight {tuple(op.weight.shape)} with "
                              f"groups={groups} does not fit input {shape}")
        stride, pad = op.attrs.get("stride", (1, 1)), op.attrs.get("padding", (0, 0))
        opad, dil = op.attrs.get("output_padding", (0, 0)), op.attrs.get("dilation", (1, 1))
        return (cog * groups, *((n - 1) * s - 2 * p + d * (k - 1) + q + 1
                                for n, s, p, d, k, q in zip(shape[1:], stride, pad, dil, (kh, kw), opad)))
    if kind in ("maxpool2d", "avgpool2d"):
        kernel, stride, pad, dil = pool_attrs(op)
        ceil = bool(op.attrs.get("ceil_mode", False))
        return (shape[0], *(pool_output_size(n, k, s, p, d, ceil)
                            for n, k, s, p, d in zip(shape[1:], kernel, stride, pad, dil)))
    if kind == "flatten":
        return (math.prod(shape),)
    if kind == "reshape":
        target = tuple(int(d) for d in op.attrs["shape"])
        if math.prod(target) != math.prod(shape):
            raise ExportError(f"op {op.name!r}: reshape of {list(shape)} into {list(target)}", "re-lower the graph")
        return target
    if kind == "transpose":
        perm = tuple(int(p) for p in op.attrs["perm"])
        if sorted(perm) != list(range(len(shape))):
            raise ExportError(f"op {op.name!r}: perm {perm} of a rank-{len(shape)} value", "re-lower the graph")
        return tuple(shape[p] for p in perm)
    if kind == "upsample_nearest":
        sh, sw = (int(s) for s in op.attrs["scale"])
        if sh < 1 or sw < 1:
            raise ExportError(f"op {op.name!r}: upsampling scale {(sh, sw)}", "use integer factors >= 1")
        return (shape[0], shape[1] * sh, shape[2] * sw)
    if kind == "cat":
        axis = _cat_axis(op, len(shape))
        rest = {tuple(d for i, d in enumerate(v.shape) if i != axis) for v in ins}
        if len({len(v.shape) for v in ins}) != 1 or len(rest) != 1:
            raise ExportError(f"op {op.name!r}: cat of shapes {[list(v.shape) for v in ins]} on dim {axis + 1}")
        return (*shape[:axis], sum(v.shape[axis] for v in ins), *shape[axis + 1:])
    if kind == "mul":
        try:
            return tuple(np.broadcast_shapes(ins[0].shape, ins[1].shape))
        except ValueError:
            raise ExportError(f"op {op.name!r}: mul of shapes {list(ins[0].shape)} and {list(ins[1].shape)}, "
                              "which do not broadcast") from None
    if kind == "add" and ins[1].shape != shape:
        raise ExportError(f"op {op.name!r}: add of shapes {shape} and {ins[1].shape}")
    return shape


def _matmul_shape(op: Op, ins: tuple[Value, ...]) -> tuple[int, ...]:
    a, b = (v.shape for v in ins)
    if not 2 <= len(a) <= MATMUL_RANK or len(a) != len(b):
        raise UnsupportedOpError(f"op {op.name!r}: matmul of shapes {list(a)} and {list(b)} (batch excluded)",
                                 f"the FPGA kernel takes operands of equal rank 2..{MATMUL_RANK}")
    if a[-1] != b[-2]:
        raise ExportError(f"op {op.name!r}: matmul of shapes {list(a)} and {list(b)}: inner dims differ")
    try:
        lead = tuple(np.broadcast_shapes(a[:-2], b[:-2]))
    except ValueError:
        raise ExportError(f"op {op.name!r}: matmul of shapes {list(a)} and {list(b)}, whose leading dims "
                          "do not broadcast") from None
    return (*lead, a[-2], b[-1])


def _avg_plan(op: Op, v: Value, out: Value) -> tuple[int, int, dict]:
    """``(acc_bits, S, detail)`` of an average pool: the divisor multipliers ``m[d] = M_d 2^(S - s_d)``."""
    kernel, _, _, dil = pool_attrs(op)
    if dil != (1, 1):
        raise UnsupportedOpError(f"op {op.name!r}: average pooling with dilation {dil}", "average pools are undilated")
    recips = {d: (m, s) for d, m, s in avg_terms(op, *v.shape[1:])}  # ascending d
    divisors = list(recips)
    top = max(s for _, s in recips.values())
    mults = {d: m << (top - s) for d, (m, s) in recips.items()}
    table = [0] * (math.prod(kernel) + 1)
    for d, m in mults.items():
        table[d] = m
    big = 1 << (v.fmt.bits - 1)
    acc = max(d * big * m for d, m in mults.items()).bit_length() + 1
    detail = {"mults": tuple(table), "mult_bits": max(mults.values()).bit_length() + 1,
              "sum_bits": (math.prod(kernel) * big).bit_length() + 1, "divisors": tuple(divisors)}
    return acc, top, detail


def _plan_op(index: int, op: Op, graph: IntegerGraph) -> LayerPlan:
    if op.kind not in SUPPORTED_KINDS:
        raise UnsupportedOpError(f"op {op.name!r}: kind {op.kind!r} is not supported by the FPGA backend",
                                 f"supported: {', '.join(SUPPORTED_KINDS)}")
    ins = tuple(graph.value(i) for i in op.inputs)
    out = graph.value(op.output)
    in_fls = [_check_fmt(v.fmt, f"value {v.name!r}") for v in ins]
    out_fl = _check_fmt(out.fmt, f"value {out.name!r}")
    kind = op.kind
    arity = {"add": 2, "mul": 2, "matmul": 2}.get(kind, None if kind == "cat" else 1)
    if kind == "softmax" and len(ins) == 2:
        arity = 2
    if (arity is not None and len(ins) != arity) or not ins:
        raise UnsupportedOpError(f"op {op.name!r}: {kind} of {len(ins)} inputs is not supported by the FPGA "
                                 "backend", f"use {arity or 'one or more'}-input {kind}s")
    if kind not in TRANSPARENT_KINDS and op.out_fmt != out.fmt:
        raise ExportError(f"op {op.name!r}: out_fmt {op.out_fmt} differs from its value's format {out.fmt}",
                          "re-lower the graph")
    expected = _expected_shape(op, ins)
    if tuple(out.shape) != expected:
        raise ExportError(f"op {op.name!r}: output value {out.name!r} has shape {tuple(out.shape)}, "
                          f"but {kind} computes {expected}", "re-lower the graph")
    mults, iterations, fan_in, in_shifts, detail = 0, 1, 1, (), {}
    if kind in ("conv2d", "linear", "conv_transpose2d"):
        if op.weight is None or op.weight_fmt is None:
            raise ExportError(f"op {op.name!r}: {kind} has no weight")
        w_fl = _check_fmt(op.weight_fmt, f"weight of op {op.name!r}")
        _check_ints(op, op.weight, op.weight_fmt.bits, "a weight")
        if op.bias is not None:
            _check_ints(op, op.bias, BIAS_BITS, "a bias")
        if kind == "conv_transpose2d":  # an output pixel sums at most every tap of its group's inputs
            fan_in = op.weight.shape[0] // op.attrs.get("groups", 1) * op.weight.shape[2] * op.weight.shape[3]
        else:
            fan_in = int(np.prod(op.weight.shape[1:]))
        acc = accumulator_bits(ins[0].fmt.bits, op.weight_fmt.bits, fan_in,
                               BIAS_BITS if op.bias is not None else None)
        acc_fl = in_fls[0] + w_fl
        mults = op.weight.size
        if kind != "linear":
            iterations = out.shape[1] * out.shape[2]
        else:
            iterations = math.prod(ins[0].shape[:-1])
            detail = {"rows": iterations}
    elif kind == "matmul":
        acc, acc_fl = graph.accumulator_bound(op).bit_length() + 1, in_fls[0] + in_fls[1]
        lead = out.shape[:-2]
        (m, k), n = ins[0].shape[-2:], out.shape[-1]
        pad = (1,) * (MATMUL_RANK - 2 - len(lead))
        detail = {"dims": pad + tuple(lead), "m": m, "k": k, "n": n,
                  "strides": tuple(tuple(s * math.prod(v.shape[-2:]) for s in
                                         broadcast_strides(v.shape[:-2], lead, MATMUL_RANK - 2)) for v in ins)}
        fan_in, mults = k, math.prod(out.shape) * k
    elif kind == "embedding":
        if op.weight_fmt is None:
            raise ExportError(f"op {op.name!r}: embedding has no weight format")
        w_fl = _check_fmt(op.weight_fmt, f"table of op {op.name!r}")
        _check_ints(op, op.weight, op.weight_fmt.bits, "a table entry")
        acc, acc_fl = op.weight_fmt.bits, w_fl
        detail = {"n_ids": math.prod(ins[0].shape), "vocab": op.weight.shape[0], "dim": op.weight.shape[1]}
    elif kind == "constant":
        _check_ints(op, op.weight, out.fmt.bits, "a constant entry")
        acc, acc_fl = out.fmt.bits, out_fl
    elif kind == "softmax":
        acc, acc_fl, detail = _softmax_plan(op, ins, out)
        mults = math.prod(out.shape)
    elif kind == "layernorm":
        acc, acc_fl, detail = _layernorm_plan(op, ins[0], graph)
        mults = 3 * math.prod(out.shape)
        iterations = detail["rows"]
    elif kind == "add":
        acc_fl = max(in_fls)
        in_shifts = tuple(acc_fl - fl for fl in in_fls)
        acc = max(v.fmt.bits + s for v, s in zip(ins, in_shifts)) + 1
    elif kind == "mul":
        if len(out.shape) > MUL_RANK:
            raise UnsupportedOpError(f"op {op.name!r}: mul of rank-{len(out.shape)} values (batch excluded)",
                                     f"the FPGA kernel takes at most {MUL_RANK} dims")
        acc, acc_fl = ins[0].fmt.bits + ins[1].fmt.bits, in_fls[0] + in_fls[1]
        mults = math.prod(out.shape)
        detail = {"dims": (1,) * (MUL_RANK - len(out.shape)) + tuple(out.shape),
                  "strides": tuple(broadcast_strides(v.shape, out.shape, MUL_RANK) for v in ins)}
    elif kind == "cat":
        axis = _cat_axis(op, len(out.shape))
        in_shifts = tuple(out_fl - fl for fl in in_fls)
        acc, acc_fl = max(v.fmt.bits for v in ins), out_fl
        inner = [math.prod(v.shape[axis:]) for v in ins]
        detail = {"outer": math.prod(out.shape[:axis]), "inner": tuple(inner),
                  "offsets": tuple(int(o) for o in np.cumsum([0] + inner[:-1])), "out_inner": sum(inner)}
    elif kind == "avgpool2d":
        acc, top, detail = _avg_plan(op, ins[0], out)
        acc_fl = in_fls[0] + top
        mults = out.shape[0]
        iterations = out.shape[1] * out.shape[2]
    elif kind in ("requantize", "clamp"):
        acc, acc_fl = ins[0].fmt.bits, in_fls[0]
        lo, hi = op.attrs.get("lo"), op.attrs.get("hi")
        if kind == "clamp" and ((lo is not None and lo > out.fmt.qmax) or (hi is not None and hi < out.fmt.qmin)):
            raise ExportError(f"op {op.name!r}: clamp bounds [{lo}, {hi}] leave the output format {out.fmt}",
                              "re-lower the graph (bounds are integers on the output grid)")
    elif kind == "lut":
        bits = ins[0].fmt.bits
        table = np.asarray(op.attrs.get("table", ()), dtype=np.int64)
        if bits > MAX_LUT_BITS or table.size != 1 << bits:
            raise UnsupportedOpError(f"op {op.name!r}: table of {table.size} entries on a {bits}-bit input",
                                     f"tables take inputs of at most {MAX_LUT_BITS} bits, 2^BW_in entries")
        _check_ints(op, table, out.fmt.bits, "a table entry")
        acc, acc_fl = bits, in_fls[0]
        detail = {"table": table}
    elif kind == "mul_pow2":
        if out.fmt.bits != ins[0].fmt.bits or out_fl != in_fls[0] - int(op.attrs["exponent"]):
            raise ExportError(f"op {op.name!r}: mul_pow2 by 2^{op.attrs['exponent']} of {ins[0].fmt} gives "
                              f"{out.fmt}", "re-lower the graph (only FL moves, by -exponent)")
        acc, acc_fl = ins[0].fmt.bits, in_fls[0]
    else:  # maxpool2d, relu, flatten, reshape, transpose, upsample_nearest: the integers move
        if out.fmt != ins[0].fmt:
            raise ExportError(f"op {op.name!r}: {kind} changes the format {ins[0].fmt} -> {out.fmt}",
                              "transparent ops keep their input format")
        acc, acc_fl = ins[0].fmt.bits, in_fls[0]
        if kind == "maxpool2d":
            iterations = out.shape[1] * out.shape[2]
            empty = _empty_windows(op, ins[0].shape[1:], out.shape[1:])
            if empty:
                raise UnsupportedOpError(f"op {op.name!r}: a max pooling window along {'HW'[empty[0]]} holds no "
                                         "input cell (only padding or ceil-mode overhang)",
                                         "use less padding or dilation")
        elif kind == "transpose":
            perm = tuple(int(p) for p in op.attrs["perm"])
            src = row_major_strides(ins[0].shape)
            detail = _gather(op, out.shape, tuple(src[p] for p in perm))
        elif kind == "upsample_nearest":
            (c, h, w), (sh, sw) = ins[0].shape, op.attrs["scale"]
            detail = _gather(op, (c, h, int(sh), w, int(sw)), (h * w, w, 0, 1, 0))
        elif kind == "slice":
            src, axis = list(row_major_strides(ins[0].shape)), int(op.attrs["dim"]) - 1
            if "index" in op.attrs:
                offset = int(op.attrs["index"]) * src.pop(axis)
            else:
                offset = int(op.attrs["start"]) * src[axis]
                src[axis] *= int(op.attrs.get("step", 1))
            detail = _gather(op, out.shape, tuple(src), offset)
    return LayerPlan(op=op, ident=c_ident(index, op.name), inputs=ins, output=out,
                     acc_bits=_check_acc(op, acc), acc_frac_bits=acc_fl, shift=out_fl - acc_fl,
                     in_shifts=in_shifts, mults=mults, iterations=iterations, fan_in=fan_in, detail=detail)


def _gather(op: Op, dims: tuple[int, ...], strides: tuple[int, ...], offset: int = 0) -> dict:
    """An ``fxq::gather`` over ``dims`` read with ``strides`` from ``offset``, padded to :data:`GATHER_RANK` dims."""
    if len(dims) > GATHER_RANK:
        raise UnsupportedOpError(f"op {op.name!r}: a {op.kind} over {len(dims)} dims (batch excluded)",
                                 f"the FPGA kernel moves at most {GATHER_RANK} dims")
    pad = GATHER_RANK - len(dims)
    return {"dims": (1,) * pad + tuple(dims), "strides": (0,) * pad + tuple(strides), "offset": int(offset)}


def _softmax_plan(op: Op, ins: tuple[Value, ...], out: Value) -> tuple[int, int, dict]:
    """``(acc_bits, K, detail)`` of a softmax: the exp ROM and the exact widths of ``e``, ``s``, ``r``, ``e r``.

    ``e <= 2^E``; ``s <= L 2^E``; a row with a kept entry has ``s >= 2^E`` (its maximum's entry is
    ``table[0] = 2^E``), so ``r <= (2^(K+1) + 2^E) // 2^(E+1)`` and ``e r <= 2^E`` times that."""
    scores = ins[0]
    if len(scores.shape) > SOFTMAX_RANK:
        raise UnsupportedOpError(f"op {op.name!r}: softmax of rank-{len(scores.shape)} scores (batch excluded)",
                                 f"the FPGA kernel takes at most {SOFTMAX_RANK} dims")
    e_bits = int(op.attrs.get("exp_bits", SOFTMAX_EXP_BITS))
    big_k = softmax_recip_bits(out.fmt, e_bits)
    table = softmax_exp_table(scores.fmt, e_bits)
    length = scores.shape[-1]
    r_max = ((1 << (big_k + 1)) + (1 << e_bits)) // (2 << e_bits)
    lead = (1,) * (SOFTMAX_RANK - len(scores.shape)) + tuple(scores.shape[:-1])
    if len(ins) > 1:
        mask = ins[1]
        if len(mask.shape) != len(scores.shape) or any(m not in (1, s) for m, s in zip(mask.shape, scores.shape)):
            raise ExportError(f"op {op.name!r}: mask {list(mask.shape)} does not broadcast to scores "
                              f"{list(scores.shape)}", "use a mask of the scores' rank (dims equal or 1)")
        strides = broadcast_strides(mask.shape, scores.shape, SOFTMAX_RANK)
    else:
        strides = (0,) * SOFTMAX_RANK
    detail = {"table": table, "exp_bits": e_bits, "recip_k": big_k, "len": length, "dims": lead[:3],
              "mask_strides": tuple(strides), "causal": bool(op.attrs.get("causal")),
              "exp_t_bits": e_bits + 1, "sum_bits": max(1, (length << e_bits).bit_length()),
              "num_bits": ((1 << (big_k + 1)) + (length << e_bits)).bit_length(),
              "recip_bits": max(1, r_max.bit_length())}
    return ((r_max << e_bits).bit_length() + 1, big_k, detail)


def _layernorm_plan(op: Op, v: Value, graph: IntegerGraph) -> tuple[int, int, dict]:
    """``(acc_bits, FL_g + FL_h, detail)`` of a layernorm: exact widths of the row sum, ``c`` and ``h``."""
    if op.weight is None or op.weight_fmt is None:
        raise ExportError(f"op {op.name!r}: layernorm has no gamma")
    w_fl = _check_fmt(op.weight_fmt, f"gamma of op {op.name!r}")
    _check_ints(op, op.weight, op.weight_fmt.bits, "a gamma entry")
    if op.bias is not None:
        _check_ints(op, op.bias, BIAS_BITS, "a beta entry")
    n, bits = v.shape[-1], v.fmt.bits
    detail = {"rows": math.prod(v.shape[:-1]), "n": n, "eps": int(op.attrs["eps"]),
              "sum_bits": (n << (bits - 1)).bit_length() + 1,  # |sum k| <= n 2^(BW-1)
              "centered_bits": ((n - 1) * ((1 << bits) - 1)).bit_length() + 1,  # |c| <= (n-1)(2^BW - 1)
              "h_bits": layernorm_h_bound(n).bit_length() + 1}
    return graph.accumulator_bound(op).bit_length() + 1, w_fl + LAYERNORM_FRAC_BITS, detail


def _io_problems(graph: IntegerGraph) -> list[str]:
    """Graph-level limits: at least one input and one output; every output computed by an op, once."""
    produced = {op.output for op in graph.ops}
    why = []
    if not graph.inputs or not graph.outputs:
        why.append(f"graph has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; "
                   "the FPGA backend needs at least one of each")
    for name in graph.outputs:
        if name not in produced:
            why.append(f"graph output {name!r} is not computed by an op (a graph input passed through)")
    if len(set(graph.outputs)) != len(graph.outputs):
        why.append(f"graph outputs {graph.outputs} name a value twice")
    return why


def plan_graph(graph: IntegerGraph) -> ModelPlan:
    """Check ``graph`` against the backend's limits and size every layer."""
    if not graph.ops:
        raise ExportError("graph has no ops", "lower a model with at least one layer")
    io = _io_problems(graph)
    if io:
        raise UnsupportedOpError(io[0], "give the FPGA top function inputs and op outputs")
    for v in graph.inputs:
        _check_fmt(v.fmt, f"input {v.name!r}")
    layers = tuple(_plan_op(i, op, graph) for i, op in enumerate(graph.ops))
    return ModelPlan(graph=graph, inputs=tuple(graph.inputs), outputs=tuple(graph.value(o) for o in graph.outputs),
                     layers=layers)


def graph_problems(graph: IntegerGraph) -> list[Problem]:
    """Every limit of this module ``graph`` breaks beyond the op kinds, each naming the layer.

    The shared rules (:mod:`fxquant.legality`) first; every layer they leave unflagged is then
    planned on its own (:func:`_plan_op`), and the error it raises, if any, becomes its problem.
    """
    problems = (legality.format_problems(graph)
                + legality.width_problems(graph, weight_bits=(2, MAX_BITS), act_bits=(2, MAX_BITS))
                + legality.fit_problems(graph)
                + legality.shape_problems(graph, groups=True, add_arity=2, linear_any_rank=True)  # rows of any rank
                + legality.avg_window_problems(graph, reciprocal=True)
                + legality.window_problems(graph, dilation=True, ceil_mode=True))
    if not graph.ops or not graph.outputs:
        problems.append(Problem("graph", "ops", "graph has no ops or no output; lower a model with at least one layer"))
    problems += [Problem("graph", "outputs", why) for why in _io_problems(graph)]
    flagged = {p.layer for p in problems}
    for index, op in enumerate(graph.ops):
        if op.name in flagged or op.kind not in SUPPORTED_KINDS:
            continue
        try:
            _plan_op(index, op, graph)
        except FxquantError as exc:  # one layer's limit: reported with the others, not raised
            problems.append(Problem(op.name, op.kind, exc.message))
    return problems


def check_int_inputs(value: Value, int_inputs: np.ndarray) -> np.ndarray:
    """``int_inputs`` as an int64 batch of ``value``'s shape, every integer inside its format."""
    x = np.asarray(int_inputs)
    if x.ndim != len(value.shape) + 1 or tuple(x.shape[1:]) != tuple(value.shape):
        raise ExportError(f"inputs have shape {tuple(x.shape)}, expected (batch, {', '.join(map(str, value.shape))})",
                          f"pass a batch of integer inputs for {value.name!r}")
    if len(x) == 0:
        raise ExportError("no inputs given", f"pass at least one integer input for {value.name!r}")
    if not np.issubdtype(x.dtype, np.integer):
        raise ExportError(f"inputs have dtype {x.dtype}, expected integers",
                          "quantize real inputs with IntegerGraph.quantize_inputs first")
    if x.size and (x.min() < value.fmt.qmin or x.max() > value.fmt.qmax):
        raise ExportError(f"inputs span [{x.min()}, {x.max()}], outside {value.name!r}'s format {value.fmt}",
                          "quantize real inputs with IntegerGraph.quantize_inputs first")
    return x.astype(np.int64)


def check_graph_inputs(graph: IntegerGraph, int_inputs) -> list[np.ndarray]:
    """Every graph input's integers checked (:func:`check_int_inputs`), one batch size for all, and
    every token id an ``embedding`` reads inside ``[0, V)`` (:class:`~fxquant.errors.InputRangeError`:
    ids are never clipped). ``int_inputs``: one array per graph input, or one array for a one-input graph."""
    from fxquant.errors import InputRangeError

    if isinstance(int_inputs, np.ndarray) and len(graph.inputs) == 1:
        int_inputs = [int_inputs]
    int_inputs = list(int_inputs)
    if len(int_inputs) != len(graph.inputs):
        raise ExportError(f"{len(int_inputs)} input arrays for a graph of {len(graph.inputs)} inputs "
                          f"({', '.join(v.name for v in graph.inputs)})", "pass one integer batch per graph input")
    xs = [check_int_inputs(v, x) for v, x in zip(graph.inputs, int_inputs)]
    if len({len(x) for x in xs}) > 1:
        raise ExportError(f"input batches of sizes {[len(x) for x in xs]}", "pass the same number of samples per input")
    names = [v.name for v in graph.inputs]
    for op in graph.ops:
        if op.kind == "embedding" and op.inputs[0] in names and op.weight is not None:
            ids, rows = xs[names.index(op.inputs[0])], op.weight.shape[0]
            bad = ids[(ids < 0) | (ids >= rows)]
            if bad.size:
                raise InputRangeError(f"op {op.name!r} (embedding): token id {int(bad[0])} outside [0, {rows})",
                                      "feed ids of this vocabulary; ids are never clipped")
    return xs
