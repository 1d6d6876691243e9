"""QDQ ONNX export of an :class:`~fxquant.integer_graph.IntegerGraph`, and the fp32 baseline.

Every integer value ``k`` at ``<BW,FL>`` is an integer tensor read through
``DequantizeLinear(scale=2^-FL)``, written by ``QuantizeLinear(scale=2^-FL)``; ``QuantizeLinear``
rounds half to even and saturates, which is :func:`fxquant.fixed_point.requantize`. Storage
(``docs/onnx_export.md`` has the measurements behind each choice):

* activations ``BW <= 8``: uint8 holding ``k + 128`` (zero point 128, default ``ort_x86=True``) or
  int8 with zero point 0 (``ort_x86=False``). onnxruntime's x86 QDQ fusion rewrites int8
  activations to uint8 only for a QuantizeLinear that feeds exactly one DequantizeLinear; a value
  with two consumers (a residual) or an integer Clip stays int8 and nothing around it is fused.
  Both forms have exactly the integer range ``[-128, 127]``.
* activations ``9 <= BW <= 16``: int16, zero point 0 (opset >= 21; onnxruntime runs these ops in
  float32, exact while the accumulator fits, :mod:`fxquant.export.verify`).
* weights: ONNX INT4 for ``BW_w <= 4`` (opset >= 21; widened by a ``Cast`` to int8 that
  onnxruntime folds at load, so the file holds 4 bits per weight and the runtime still fuses);
  int8 for ``BW_w <= 7``; for 8-bit weights that use all 8 bits uint8 ``w + 128`` with zero point
  128 (``ort_x86``), because MLAS's x86 U8S8 kernel saturates int16 pair sums without VNNI
  (``AVX2_SAFE_WEIGHT_BITS``) and uint8 weights select its exact U8U8 kernel; int16 above 8 bits.
* bias: int32 initializer, ``DequantizeLinear(2^-(FL_w+FL_in))`` (the accumulator grid).

Math per op: a compute op (Conv, Gemm, MatMul, Add, AveragePool) on dequantized inputs yields
``acc * 2^-FL_acc``; ``QuantizeLinear(2^-FL_out)`` gives ``clamp(round_half_even(acc *
2^(FL_out-FL_acc)))`` saturated to the storage type; a narrower range (``BW_out`` below the storage
bits) or a fused ReLU (``[0, qmax]``) is a ``Clip`` on the stored integers (int16: ``Cast(int32) →
Clip → Cast(int16)``, see :meth:`_QdqBuilder.quantize`). ``cat`` requantizes each input to
``out_fmt`` the same way and concatenates integers;
``relu`` is an integer Clip; ``maxpool2d``/``flatten``/``reshape``/``transpose``/``upsample_nearest``
(``Resize`` nearest) are built as ``DQ → op → Q`` and folded onto the integers by
:class:`fxquant.export.passes.FoldTransparentQdq` (MaxPool and Resize on 8-bit storage only;
int16 ones stay float, exact: they copy values); graph inputs are ``QuantizeLinear [→ Clip]``,
outputs ``DequantizeLinear`` (float ``k * 2^-FL``). The vision-zoo ops:

* ``clamp``: the requantize's ``Q → Clip`` with the clamp's bounds (within the output format);
* ``lut``: ``Cast(int32) → Add(-zero point - qmin) → Gather`` of the table stored as the output's
  integers: integers only;
* ``mul``: ``DQ → Mul → Q`` (onnxruntime fuses QLinearMul) while ``|a b| <= 2^24``; beyond, the
  int32 product of the integers and the float64 requantization below;
* ``avgpool2d`` with a window that is not a power of two, padding, or a ceil-mode edge window:
  exact float32 window sums of the integers (a depthwise Conv of ones; ``check`` keeps them within
  2^24), ``Cast(double)``, times the per-window ``M_d 2^(FL_out-FL_in-s_d)``, then the float64
  requantization (``fixed_point.reciprocal``, divisors ``integer_graph.avg_divisors``);
* ``maxpool2d`` with dilation / ceil mode: ``MaxPool`` with ``dilations`` and torch's ceil-mode
  windows as extra end padding (a ``Pad`` with the lowest integer where onnxruntime's MaxPool
  would refuse pads as large as the kernel);
* ``conv_transpose2d``: ``DQ → ConvTranspose → Q`` in float32 (ONNX has no integer form); beyond
  2^24 on <= 8-bit inputs, the equal convolution of the zero-inserted input on the integer path
  below (``check`` refuses the rest).

The transformer kinds (issue 14), all on integers, none through a float Softmax or LayerNorm:

* token ids and masks are **int64 graph inputs** holding the integers (``integer_inputs``); an
  ``embedding`` is a ``Gather`` of the table stored as the output's integers (requantized once at
  export when ``out_fmt != weight_fmt``: element-wise, so it commutes with the gather);
* ``slice``: ``Slice`` / ``Gather`` of the stored integers;
* ``softmax`` and ``layernorm``: the reference's row algorithms as int64 subgraphs
  (:mod:`fxquant.export.onnx_integer`: table gather, ReduceMax/ReduceSum, Div, rounding shifts
  with ties to even, an exact integer square root), stored with ``Add(zero point) → Cast``;
* an activation ``matmul`` whose ``|acc|`` may exceed 2^24: int64 ``MatMul`` and the int64
  requantization (float32 would round); a ``linear`` on a rank > 2 input: the 2-D Gemm paths on
  the rows (``Reshape``, exact).

onnxruntime's QLinear kernels (and float Conv/Gemm) requantize ``float(acc)``: exact only for
``|acc| <= 2^24``. A Conv/Gemm on <= 8-bit inputs whose worst-case accumulator is larger is
exported instead as ConvInteger/MatMulInteger (+ int32 bias) followed by ``Cast(double) →
Mul(2^(FL_out-FL_acc)) → Round → Add(zero point) → Clip → Cast`` (exact in float64); 9..16-bit
weights are split into 8-bit halves, ``acc = 256 acc(hi) + acc(lo) + b`` summed in float64. Ops still computed
in float32 with such accumulators (on 9..16-bit inputs, MatMul) are listed in the
``fxquant.float32_risk_ops`` metadata.

With 8-bit activations onnxruntime (``ORT_ENABLE_ALL``) turns the whole graph into
QLinearConv / QGemm / QLinearMatMul / QLinearAdd / QLinearAveragePool, uint8 Clip, MaxPool,
Flatten and Concat between one QuantizeLinear at the input and one DequantizeLinear at the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto

from fxquant.errors import ExportError, UnsupportedOpError
from fxquant.export.limits import (DEFAULT_OPSET, FLOAT32_EXACT_BOUND, NARROW_STORAGE_OPSET,  # noqa: F401
                                   WEIGHTED_KINDS, check_exportable, check_opset, clamp_bounds, conv_transpose_as_conv,
                                   float32_risks, needs_integer_accumulation, qdq_problems, raise_problems,
                                   split_weights, uses_reciprocal)
from fxquant.export.onnx_builder import (GraphBuilder, LazyTensors, batch_broadcast, conv_attrs, float_io, float_op, fmt_bounds,
                                         graph_io, guarded_ids, integer_inputs, linear_rows, linear_unrows, pad_node,
                                         pad_node_needed, pow2, reciprocal_factors, scale_of, slice_node,
                                         window_sums)
from fxquant.export.onnx_integer import IntegerOps
from fxquant.export.passes import FoldTransparentQdq
from fxquant.fixed_point import BIAS_BITS, SOFTMAX_EXP_BITS, FixedPoint, dequantize, min_signed_bits, requantize
from fxquant.integer_graph import IntegerGraph, Op, avg_divisors

U8_ZERO_POINT = 128
"""``ort_x86`` stores 8-bit integers ``k`` as ``k + 128`` in uint8 with this zero point."""
AVX2_SAFE_WEIGHT_BITS = 7
"""MLAS's x86 U8S8 kernel (CPUs without VNNI) sums pairs of u8*s8 products in int16 with
saturation: exact only while 2 * 255 * |w| <= 32767, i.e. for weights of at most 7 bits."""

_NUMPY = {TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
          TensorProto.INT32: np.int32}
_TYPE_RANGE = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255), TensorProto.INT16: (-32768, 32767)}
_COMPUTE = ("conv2d", "linear", "conv_transpose2d", "matmul", "add", "mul", "avgpool2d")


@dataclass(frozen=True)
class Storage:
    """How integers ``k`` are stored: ONNX type ``dtype`` holding ``k + zero_point``."""

    dtype: int
    zero_point: int = 0

    @property
    def k_range(self) -> tuple[int, int]:
        """The integers ``k`` QuantizeLinear saturates to (activation storage types)."""
        lo, hi = _TYPE_RANGE[self.dtype]
        return lo - self.zero_point, hi - self.zero_point


def activation_storage(bits: int, opset: int, what: str, *, ort_x86: bool) -> Storage:
    """uint8 + 128 (``ort_x86``) or int8 for ``bits <= 8``; int16 for 9..16 (opset >= 21)."""
    if bits <= 8:
        return Storage(TensorProto.UINT8, U8_ZERO_POINT) if ort_x86 else Storage(TensorProto.INT8)
    if opset >= NARROW_STORAGE_OPSET:
        return Storage(TensorProto.INT16)
    raise UnsupportedOpError(f"{what}: {bits}-bit integers need int16 QuantizeLinear, opset {opset} has none",
                             f"export with opset >= {NARROW_STORAGE_OPSET}")


def weight_storage(w: np.ndarray, bits: int, opset: int, what: str, *, ort_x86: bool) -> Storage:
    """INT4 for ``bits <= 4`` (opset >= 21); uint8 + 128 when ``ort_x86`` and ``w`` needs 8 bits;
    else the activation rule with int8."""
    if bits <= 4 and opset >= NARROW_STORAGE_OPSET:
        return Storage(TensorProto.INT4)
    if bits <= 8 and ort_x86 and min_signed_bits(w) > AVX2_SAFE_WEIGHT_BITS:
        return Storage(TensorProto.UINT8, U8_ZERO_POINT)
    return activation_storage(bits, opset, what, ort_x86=False)


def _check_fits(array: np.ndarray, bits: int, what: str) -> None:
    if min_signed_bits(array) > bits:
        raise ExportError(f"{what} holds integers outside the signed {bits}-bit range",
                          "lower the model again; weights must be stored at their <BW,FL>")


class _QdqBuilder:
    """Emits one IntegerGraph as QDQ ONNX (see the module docstring)."""

    def __init__(self, graph: IntegerGraph, opset: int, ort_x86: bool) -> None:
        self.graph, self.opset, self.ort_x86, self.b = graph, opset, ort_x86, GraphBuilder()
        self.ints: dict[str, str] = LazyTensors(self._stored_of_integer_input)
        """Stored integers (``k + zero point`` in the storage type) of every value."""
        self.k64: dict[str, str] = LazyTensors(self._k64_of_stored)
        """The integers ``k`` as int64 (integer graph inputs as fed; others ``Cast`` of the stored form)."""
        self.iops = IntegerOps(self.b, opset)
        self.integer_ops: list[str] = []

    def _k64_of_stored(self, value: str) -> str:
        fmt = self.graph.values[value].fmt
        st = self.storage(fmt, f"value {value!r}")
        k = self.b.node("Cast", [self.ints[value]], f"{value}_i64", to=TensorProto.INT64)
        if st.zero_point:
            k = self.b.node("Sub", [k, self.iops.const("zero_point_i64", st.zero_point)], f"{value}_k64")
        return k

    def _stored_of_integer_input(self, value: str) -> str:
        """An int64 graph input (:func:`~fxquant.export.onnx_builder.integer_inputs`) read by another
        op: saturated to its format (as ``IntegerGraph.quantize_inputs`` does) and stored."""
        if value not in self.k64:
            raise ExportError(f"value {value!r} is used before it is computed", "report this as an exporter bug")
        fmt = self.graph.values[value].fmt
        return self.to_stored(self.iops.clip(self.k64[value], fmt.qmin, fmt.qmax, f"{value}_sat"), fmt,
                              f"{value}_stored")

    def to_stored(self, k: str, fmt: FixedPoint, base: str) -> str:
        """int64 integers ``k`` (within ``fmt``) in the storage of ``fmt``: ``Add(zero point) → Cast``."""
        st = self.storage(fmt, base)
        if st.zero_point:
            k = self.b.node("Add", [k, self.iops.const("zero_point_i64", st.zero_point)], f"{base}_zp")
        return self.b.node("Cast", [k], base, to=st.dtype)

    def storage(self, fmt: FixedPoint, what: str) -> Storage:
        return activation_storage(fmt.bits, self.opset, what, ort_x86=self.ort_x86)

    def _q(self, f: str, frac_bits: int, st: Storage, base: str) -> str:
        scale = self.b.const("scale", scale_of(frac_bits, base))
        return self.b.node("QuantizeLinear", [f, scale, self._zero(st)], base)

    def _dq(self, t: str, frac_bits: int, st: Storage, base: str, output: str | None = None) -> str:
        return self.b.node("DequantizeLinear", [t, self.b.const("scale", scale_of(frac_bits, base)), self._zero(st)],
                           base, output=output)

    def dq(self, value: str, output: str | None = None) -> str:
        """The float tensor ``k * 2^-FL`` of an integer value (a DequantizeLinear per use)."""
        fmt = self.graph.values[value].fmt
        return self._dq(self.ints[value], fmt.frac_bits, self.storage(fmt, f"value {value!r}"), f"{value}_dq", output)

    def quantize(self, f: str, fmt: FixedPoint, relu: bool, base: str, *, requantizing: bool = False,
                 bounds: tuple[int, int] | None = None) -> str:
        """Integers of float ``f`` at ``fmt``: QuantizeLinear, then a Clip to ``[lo, hi]`` if needed.

        QuantizeLinear saturates to its storage type only; a narrower range (``BW`` below the
        storage bits, or ``[0, qmax]`` for a fused ReLU) is a Clip on the stored integers for
        8-bit storage (onnxruntime keeps fusing across it), and ``Cast(int32) → Clip → Cast(int16)``
        for int16 (onnxruntime has no int16 Clip kernel; a float ``DequantizeLinear → Clip →
        QuantizeLinear`` is dropped by its ClipQuantFusion, which judges an int16 Q's range as if it
        were 8-bit, so a 9..15-bit output was not saturated). A
        ``requantizing`` Q→DQ→Q chain always gets the Clip (a no-op one at full range), because
        onnxruntime otherwise merges the two Q/DQ pairs into one and rounds once instead of twice.
        ``bounds`` replaces ``[lo, hi]`` (a ``clamp``'s, within ``fmt``).
        """
        st = self.storage(fmt, base)
        lo, hi = bounds if bounds is not None else fmt_bounds(fmt, relu)
        if (lo, hi) == st.k_range and not requantizing:
            return self._q(f, fmt.frac_bits, st, base)
        q = self._q(f, fmt.frac_bits, st, f"{base}_wide")
        if st.dtype == TensorProto.INT16:  # no int16 Clip kernel: clip the integers in int32
            wide = self.b.node("Cast", [q], f"{base}_wide_i32", to=TensorProto.INT32)
            clipped = self.b.node("Clip", [wide, self.b.const("clip_lo_i32", np.int32(lo)),
                                           self.b.const("clip_hi_i32", np.int32(hi))], f"{base}_clip_i32")
            return self.b.node("Cast", [clipped], base, to=TensorProto.INT16)
        return self._clip_ints(q, st, lo, hi, base)

    def _clip_ints(self, t: str, st: Storage, lo: int, hi: int, base: str) -> str:
        bounds = [self.b.const(f"clip_{b}", np.array(k + st.zero_point, _NUMPY[st.dtype]))
                  for b, k in (("lo", lo), ("hi", hi))]
        return self.b.node("Clip", [t, *bounds], base)

    def weight_ints(self, op: Op, *, transpose: bool = False) -> tuple[str, Storage]:
        """The stored weight integers (``W^T`` with ``transpose``) and their storage."""
        w, fmt = op.weight, op.weight_fmt
        assert w is not None and fmt is not None  # check_exportable
        what = f"op {op.name!r} weight"
        _check_fits(w, fmt.bits, what)
        w = w.T if transpose else w
        st = weight_storage(w, fmt.bits, self.opset, what, ort_x86=self.ort_x86)
        if st.dtype == TensorProto.INT4:
            packed = self.b.const(f"{op.name}.weight", w.astype(ml_dtypes.int4))  # raw, two per byte
            widened = self.b.node("Cast", [packed], f"{op.name}.weight_int8", to=TensorProto.INT8)
            return widened, Storage(TensorProto.INT8)
        return self.b.const(f"{op.name}.weight", (w + st.zero_point).astype(_NUMPY[st.dtype])), st

    def weight(self, op: Op) -> str:
        assert op.weight_fmt is not None and op.weight_fmt.frac_bits is not None  # check_exportable
        t, st = self.weight_ints(op)
        return self._dq(t, op.weight_fmt.frac_bits, st, f"{op.name}.weight_dq")

    def _zero(self, st: Storage) -> str:
        return self.b.const("zero_point", np.array(st.zero_point, _NUMPY[st.dtype]))

    def integer_accumulation(self, op: Op) -> bool:
        return needs_integer_accumulation(self.graph, op, ort_x86=self.ort_x86)

    def integer_op(self, op: Op, relu: bool, x: str | None = None) -> str:
        """Exact form of a Conv/Gemm whose ``|acc|`` may exceed 2^24, where QLinearConv/QGemm (or a
        float Conv/Gemm) would requantize ``float(acc)`` and round twice.

        ConvInteger/MatMulInteger give exact int32 sums: one for weights of <= 8 bits, two for
        9..16-bit weights split as ``w = 256 hi + lo`` (:func:`~fxquant.export.limits.split_weights`;
        uint8 halves, MLAS's exact U8U8 kernel), each within int32
        (:func:`~fxquant.export.limits.integer_path_bound`). In float64 (exact below 2^53):
        ``acc = Σ factor · Cast(sum) + b``, then ``Mul(2^(FL_out-FL_acc)) → Round`` (half to even)
        ``→ Add(zero point) → Clip → Cast``: :func:`fxquant.fixed_point.requantize`. ``x``: stored
        integers to convolve instead of the op's input (same format; a ``conv_transpose2d``'s
        zero-inserted input, :meth:`integer_conv_transpose`)."""
        in_fmt, w_fmt = self.graph.values[op.inputs[0]].fmt, op.weight_fmt
        assert w_fmt is not None and w_fmt.frac_bits is not None and in_fmt.frac_bits is not None  # checked
        assert op.out_fmt.frac_bits is not None
        x, x_zero = x or self.ints[op.inputs[0]], self._zero(self.storage(in_fmt, op.inputs[0]))
        if min_signed_bits(op.weight) <= 8:
            parts = [(*self.weight_ints(op, transpose=op.kind == "linear"), 1, "")]
        else:
            _check_fits(op.weight, w_fmt.bits, f"op {op.name!r} weight")
            hi, lo = split_weights(op.weight.T if op.kind == "linear" else op.weight)
            parts = [(self.b.const(f"{op.name}.weight_hi", (hi + U8_ZERO_POINT).astype(np.uint8)),
                      Storage(TensorProto.UINT8, U8_ZERO_POINT), 256, "_hi"),
                     (self.b.const(f"{op.name}.weight_lo", lo.astype(np.uint8)), Storage(TensorProto.UINT8), 1, "_lo")]
        acc = None
        for w, wst, factor, tag in parts:
            ins = [x, w, x_zero, self._zero(wst)]
            part = (self.b.node("ConvInteger", ins, f"{op.name}_acc{tag}", **conv_attrs(op)) if op.kind == "conv2d"
                    else self.b.node("MatMulInteger", ins, f"{op.name}_acc{tag}"))
            part = self.b.node("Cast", [part], f"{op.name}_acc{tag}_f64", to=TensorProto.DOUBLE)
            if factor != 1:
                part = self.b.node("Mul", [part, self.b.const("radix", np.float64(factor))], f"{op.name}_acc{tag}_scaled")
            acc = part if acc is None else self.b.node("Add", [acc, part], f"{op.name}_acc")
        if op.bias is not None:
            _check_fits(op.bias, BIAS_BITS, f"op {op.name!r} bias")
            shape = (-1, 1, 1) if op.kind == "conv2d" else (-1,)
            bias = self.b.const(f"{op.name}.bias", op.bias.astype(np.float64).reshape(shape))
            acc = self.b.node("Add", [acc, bias], f"{op.name}_acc_bias")
        fl_acc = in_fmt.frac_bits + w_fmt.frac_bits
        shift = self.b.const("shift", np.float64(dequantize(np.int64(1), fl_acc - op.out_fmt.frac_bits)))
        return self.requantize_f64(acc, shift, op, relu)

    def integer_conv_transpose(self, op: Op, relu: bool) -> str:
        """Exact form of a ``conv_transpose2d`` whose ``|acc|`` may exceed 2^24 (ONNX ConvTranspose
        has no integer form): the convolution it equals, on the integers through :meth:`integer_op`.

        ``ConvTranspose(x, W)`` with stride ``s``, padding ``p``, output padding ``q``, dilation
        ``d`` is, per axis, a stride-1 convolution with dilation ``d`` of the zero-inserted input
        (``s - 1`` zeros after each pixel: ``Reshape → Pad → Reshape``) padded by ``d(k-1) - p``
        at the start and ``d(k-1) - p + q - (s-1)`` at the end (a negative pad crops; the pads hold
        the zero point, i.e. integer 0), with the weights
        :func:`~fxquant.export.limits.conv_transpose_as_conv` (per group transposed, flipped)."""
        v = self.graph.values[op.inputs[0]]
        c, h, w = v.shape
        (sh, sw), (ph, pw) = op.attrs.get("stride", (1, 1)), op.attrs.get("padding", (0, 0))
        (qh, qw), (dh, dw) = op.attrs.get("output_padding", (0, 0)), op.attrs.get("dilation", (1, 1))
        kh, kw = op.weight.shape[2:]
        zero = self._zero(self.storage(v.fmt, op.inputs[0]))
        x = self.b.node("Reshape", [self.ints[op.inputs[0]], self.b.const(f"{op.name}.split", np.array(
            [0, c, h, 1, w, 1], np.int64))], f"{op.name}_split")
        x = self.b.node("Pad", [x, self.b.const(f"{op.name}.zeros", np.array(
            [0, 0, 0, 0, 0, 0, 0, 0, 0, sh - 1, 0, sw - 1], np.int64)), zero], f"{op.name}_zeros", mode="constant")
        x = self.b.node("Reshape", [x, self.b.const(f"{op.name}.merge", np.array([0, c, h * sh, w * sw], np.int64))],
                        f"{op.name}_inserted")
        begin = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
        end = (begin[0] + qh - (sh - 1), begin[1] + qw - (sw - 1))
        if any(begin) or any(end):
            x = self.b.node("Pad", [x, self.b.const(f"{op.name}.pads", np.array([0, 0, *begin, 0, 0, *end], np.int64)),
                                    zero], f"{op.name}_padded", mode="constant")
        conv = Op(op.name, "conv2d", op.inputs, op.output, op.out_fmt,
                  weight=conv_transpose_as_conv(op.weight, op.attrs.get("groups", 1)), weight_fmt=op.weight_fmt,
                  bias=op.bias, attrs={"stride": (1, 1), "padding": (0, 0), "dilation": (dh, dw),
                                       "groups": op.attrs.get("groups", 1)})
        return self.integer_op(conv, relu, x=x)

    def requantize_f64(self, acc: str, factor: str, op: Op, relu: bool) -> str:
        """Stored integers of ``op.out_fmt`` from a float64 accumulator: ``Mul(factor) → Round``
        (half to even) ``→ Add(zero point) → Clip → Cast``, :func:`fxquant.fixed_point.requantize`
        exactly while ``|acc * factor|`` needs at most 53 bits (``factor`` a power of two, or an
        average pool's ``M_d 2^-k``)."""
        st, (lo_k, hi_k) = self.storage(op.out_fmt, op.output), fmt_bounds(op.out_fmt, relu)
        d = self.b.node("Mul", [acc, factor], f"{op.name}_scaled")
        d = self.b.node("Add", [self.b.node("Round", [d], f"{op.name}_rounded"),
                                self.b.const("zero_point_f64", np.float64(st.zero_point))], f"{op.name}_stored")
        d = self.b.node("Clip", [d, self.b.const("clip_lo", np.float64(lo_k + st.zero_point)),
                                 self.b.const("clip_hi", np.float64(hi_k + st.zero_point))], f"{op.name}_clip")
        return self.b.node("Cast", [d], op.output, to=st.dtype)

    def as_float(self, value: str) -> str:
        """The integers ``k`` of a value as float32 (``DequantizeLinear`` with scale 1)."""
        fmt = self.graph.values[value].fmt
        st = self.storage(fmt, f"value {value!r}")
        return self.b.node("DequantizeLinear", [self.ints[value], self.b.const("unit_scale", np.float32(1.0)),
                                                self._zero(st)], f"{value}_k")

    def as_int32(self, value: str) -> str:
        """The integers ``k`` of a value as int32 (``Cast``, minus the zero point)."""
        fmt = self.graph.values[value].fmt
        st = self.storage(fmt, f"value {value!r}")
        k = self.b.node("Cast", [self.ints[value]], f"{value}_i32", to=TensorProto.INT32)
        if st.zero_point:
            k = self.b.node("Sub", [k, self.b.const("zero_point_i32", np.int32(st.zero_point))], f"{value}_k32")
        return k

    def integer_mul(self, op: Op, relu: bool) -> str:
        """A ``mul`` whose product may exceed 2^24: ``Mul`` in int32 (``|a b| <= 2^30`` for 16-bit
        inputs), then :meth:`requantize_f64` from ``FL_a + FL_b``."""
        acc = self.b.node("Mul", [self.as_int32(i) for i in op.inputs], f"{op.name}_acc")
        acc = self.b.node("Cast", [acc], f"{op.name}_acc_f64", to=TensorProto.DOUBLE)
        fl_acc = sum(self.graph.values[i].fmt.frac_bits for i in op.inputs)
        shift = self.b.const("shift", np.float64(dequantize(np.int64(1), fl_acc - op.out_fmt.frac_bits)))
        return self.requantize_f64(acc, shift, op, relu)

    def reciprocal_avgpool(self, op: Op, relu: bool) -> str:
        """An average pool on the reciprocal path: exact window sums of the integers
        (:func:`~fxquant.export.onnx_builder.window_sums`), ``Cast`` to float64, times each window's
        ``M_d 2^(FL_out - FL_in - s_d)`` (:func:`~fxquant.export.onnx_builder.reciprocal_factors`),
        then :meth:`requantize_f64`: ``requantize(sum * M_d, FL_in + s_d, out_fmt)`` per window."""
        v = self.graph.values[op.inputs[0]]
        sums = window_sums(self.b, op, self.as_float(op.inputs[0]), v.shape)
        acc = self.b.node("Cast", [sums], f"{op.name}_sum_f64", to=TensorProto.DOUBLE)
        factors = self.b.const(f"{op.name}.reciprocal",
                               reciprocal_factors(op, v.shape, op.out_fmt.frac_bits - v.fmt.frac_bits))
        return self.requantize_f64(acc, factors, op, relu)

    def lut(self, op: Op) -> str:
        """``Gather`` of the table (stored as the output's integers) on ``k - qmin_in``: the stored
        input ``Cast`` to int32 plus ``-(zero point) - qmin``. Integers only."""
        v = self.graph.values[op.inputs[0]]
        st_in, st_out = self.storage(v.fmt, op.inputs[0]), self.storage(op.out_fmt, op.output)
        table = np.asarray(op.attrs["table"], np.int64)
        _check_fits(table, op.out_fmt.bits, f"op {op.name!r} table")
        stored = self.b.const(f"{op.name}.table", (table + st_out.zero_point).astype(_NUMPY[st_out.dtype]))
        idx = self.b.node("Cast", [self.ints[op.inputs[0]]], f"{op.name}_i32", to=TensorProto.INT32)
        idx = self.b.node("Add", [idx, self.b.const("index_offset", np.int32(-st_in.zero_point - v.fmt.qmin))],
                          f"{op.name}_index")
        return self.b.node("Gather", [stored, idx], op.output, axis=0)

    def bias(self, op: Op) -> str | None:
        if op.bias is None:
            return None
        assert op.weight_fmt is not None and op.weight_fmt.frac_bits is not None  # check_exportable
        _check_fits(op.bias, BIAS_BITS, f"op {op.name!r} bias")
        fl_acc = self.graph.values[op.inputs[0]].fmt.frac_bits + op.weight_fmt.frac_bits
        t = self.b.const(f"{op.name}.bias", op.bias.astype(np.int32))
        return self._dq(t, fl_acc, Storage(TensorProto.INT32), f"{op.name}.bias_dq")

    def embedding(self, op: Op) -> str:
        """``Gather`` of the table, stored as the output's integers (``requantize(table, FL_w,
        out_fmt)`` row by row when ``out_fmt != weight_fmt``: the requantization is element-wise, so it
        commutes with the gather), on the int64 ids. A negative id is mapped to ``V`` so that
        onnxruntime's Gather refuses it like an id ``>= V`` (ONNX Gather would wrap it around)."""
        assert op.weight is not None and op.weight_fmt is not None  # transformer_problems
        table = np.asarray(op.weight, np.int64)
        _check_fits(table, op.weight_fmt.bits, f"op {op.name!r} table")
        if op.out_fmt != op.weight_fmt:
            table = requantize(table, op.weight_fmt.frac_bits, op.out_fmt)
        st = self.storage(op.out_fmt, op.output)
        stored = self.b.const(f"{op.name}.weight", (table + st.zero_point).astype(_NUMPY[st.dtype]))
        return self.b.node("Gather", [stored, guarded_ids(self.b, op, self.k64[op.inputs[0]])], op.output, axis=0)

    def constant(self, op: Op) -> str:
        """The stored integers ``(1, *S)`` as an initializer, expanded to the batch of the op's input
        (:func:`~fxquant.export.onnx_builder.batch_broadcast`)."""
        assert op.weight is not None  # transformer_problems
        _check_fits(op.weight, op.out_fmt.bits, f"op {op.name!r} constant")
        st = self.storage(op.out_fmt, op.output)
        stored = self.b.const(f"{op.name}.weight", (np.asarray(op.weight, np.int64)[None] + st.zero_point)
                              .astype(_NUMPY[st.dtype]))
        return batch_broadcast(self.b, op, stored, self.shape_source(op.inputs[0]))

    def shape_source(self, value: str) -> str:
        """A tensor of the batch of ``value``: the graph input itself, or the value's stored form."""
        if value in {v.name for v in self.graph.inputs}:
            return value
        return self.ints[value]

    def softmax(self, op: Op) -> str:
        """:meth:`~fxquant.export.onnx_integer.IntegerOps.softmax` on the int64 scores; keep =
        ``mask != 0`` (broadcast) and, with ``causal``, the lower triangle of the last two axes."""
        v = self.graph.values[op.inputs[0]]
        keep = None
        if len(op.inputs) > 1:
            keep = self.b.node("Not", [self.b.node("Equal", [self.k64[op.inputs[1]], self.iops.const("zero_i64", 0)],
                                                   f"{op.name}_masked")], f"{op.name}_keep")
        if op.attrs.get("causal"):
            q, kk = v.shape[-2:]
            tril = self.b.const(f"{op.name}.causal", np.tril(np.ones((q, kk), dtype=bool)))
            keep = tril if keep is None else self.b.node("And", [keep, tril], f"{op.name}_keep_causal")
        k = self.iops.softmax(self.k64[op.inputs[0]], keep, v.fmt, op.out_fmt,
                              int(op.attrs.get("exp_bits", SOFTMAX_EXP_BITS)), op.name)
        return self.to_stored(k, op.out_fmt, op.output)

    def layernorm(self, op: Op) -> str:
        """:meth:`~fxquant.export.onnx_integer.IntegerOps.layernorm` on the int64 rows."""
        v = self.graph.values[op.inputs[0]]
        assert op.weight is not None and op.weight_fmt is not None  # transformer_problems
        k = self.iops.layernorm(self.k64[op.inputs[0]], v.shape[-1], int(op.attrs["eps"]), op.weight, op.bias,
                                op.weight_fmt.frac_bits, op.out_fmt, bool(op.attrs.get("relu")), op.name,
                                acc_bound=self.graph.accumulator_bound(op))
        return self.to_stored(k, op.out_fmt, op.output)

    def slice(self, op: Op) -> str:
        """:func:`~fxquant.export.onnx_builder.slice_node` on the stored integers (transparent)."""
        return slice_node(self.b, op, self.ints[op.inputs[0]])

    def integer_matmul(self, op: Op, relu: bool) -> str:
        """An activation ``matmul`` whose ``|acc|`` may exceed 2^24 (float32 would round it): int64
        ``MatMul`` of the integers (exact; broadcasting as numpy), then the int64 requantization."""
        a, b = (self.graph.values[i] for i in op.inputs)
        acc = self.b.node("MatMul", [self.k64[op.inputs[0]], self.k64[op.inputs[1]]], f"{op.name}_acc")
        k = self.iops.requantize(acc, op.out_fmt.frac_bits - a.fmt.frac_bits - b.fmt.frac_bits, op.out_fmt,
                                 f"{op.name}_k", relu=relu, bound=self.graph.accumulator_bound(op))
        return self.to_stored(k, op.out_fmt, op.output)

    def linear_nd(self, op: Op) -> str:
        """A ``linear`` on an input of rank > 2 (with the batch): the 2-D op on
        :func:`~fxquant.export.onnx_builder.linear_rows` of the stored integers, reshaped back."""
        x = op.inputs[0]
        stored = self.ints[x]
        self.ints[x] = linear_rows(self.b, op, stored, self.graph.values[x].shape)
        try:
            y = self.emit(op, rows=True)
        finally:
            self.ints[x] = stored
        return linear_unrows(self.b, op, y, self.graph.values[op.output].shape)

    def emit(self, op: Op, *, rows: bool = False) -> str:
        relu = bool(op.attrs.get("relu"))
        in_shape = self.graph.values[op.inputs[0]].shape
        if op.kind == "linear" and len(in_shape) > 1 and not rows:
            return self.linear_nd(op)
        if op.kind == "embedding":
            self.integer_ops.append(op.name)
            return self.embedding(op)
        if op.kind == "softmax":
            self.integer_ops.append(op.name)
            return self.softmax(op)
        if op.kind == "layernorm":
            self.integer_ops.append(op.name)
            return self.layernorm(op)
        if op.kind == "slice":
            return self.slice(op)
        if op.kind == "constant":
            return self.constant(op)
        if op.kind == "matmul" and self.graph.accumulator_bound(op) > FLOAT32_EXACT_BOUND:
            self.integer_ops.append(op.name)
            return self.integer_matmul(op, relu)
        if self.integer_accumulation(op):
            self.integer_ops.append(op.name)
            return self.integer_conv_transpose(op, relu) if op.kind == "conv_transpose2d" else self.integer_op(op, relu)
        if op.kind == "mul" and self.graph.accumulator_bound(op) > FLOAT32_EXACT_BOUND:
            self.integer_ops.append(op.name)
            return self.integer_mul(op, relu)
        if uses_reciprocal(self.graph, op):
            return self.reciprocal_avgpool(op, relu)
        if op.kind == "lut":
            return self.lut(op)
        if op.kind in WEIGHTED_KINDS:
            f = float_op(self.b, op, [self.dq(op.inputs[0])], self.weight(op), self.bias(op))
            return self.quantize(f, op.out_fmt, relu, op.output)
        if op.kind in _COMPUTE:
            f = float_op(self.b, op, [self.dq(i) for i in op.inputs], in_shape=in_shape)
            return self.quantize(f, op.out_fmt, relu, op.output)
        if op.kind == "requantize":
            return self.quantize(self.dq(op.inputs[0]), op.out_fmt, relu, op.output, requantizing=True)
        if op.kind == "clamp":
            return self.quantize(self.dq(op.inputs[0]), op.out_fmt, False, op.output, requantizing=True,
                                 bounds=clamp_bounds(op))
        if op.kind == "cat":
            parts = [self.ints[i] if self.graph.values[i].fmt == op.out_fmt and not relu
                     else self.quantize(self.dq(i), op.out_fmt, relu, f"{i}_to_{op.output}", requantizing=True)
                     for i in op.inputs]
            return float_op(self.b, op, parts)
        if op.kind == "mul_pow2":  # the same integers read at FL_in - e: same tensor, other scale
            return self.ints[op.inputs[0]]
        # transparent: maxpool2d, flatten, reshape, transpose, upsample_nearest, relu keep the input format
        fmt = self.graph.values[op.inputs[0]].fmt
        st = self.storage(fmt, op.output)
        if op.kind == "relu" and st.dtype != TensorProto.INT16:
            return self._clip_ints(self.ints[op.inputs[0]], st, *fmt_bounds(fmt, True), op.output)
        x = self.dq(op.inputs[0])
        if pad_node_needed(op, in_shape) and st.dtype == TensorProto.INT16:  # onnxruntime has no int16 Pad
            x = pad_node(self.b, op, x, in_shape, np.float32(fmt.qmin * scale_of(fmt.frac_bits, op.name)))
        elif pad_node_needed(op, in_shape):  # pad the stored integers with the format's lowest one
            lowest = np.array(fmt.qmin + st.zero_point, _NUMPY[st.dtype])
            padded = pad_node(self.b, op, self.ints[op.inputs[0]], in_shape, lowest)
            x = self._dq(padded, fmt.frac_bits, st, f"{op.inputs[0]}_padded_dq")
        return self._q(float_op(self.b, op, [x], in_shape=in_shape), fmt.frac_bits, st, op.output)

    def build(self) -> onnx.ModelProto:
        g = self.graph
        for name in [v.name for v in g.inputs] + g.outputs:
            self.b.reserve(name)
        ints = integer_inputs(g)
        for v in g.inputs:
            if v.name in ints:  # int64 ids / masks: the integers themselves
                self.k64[v.name] = v.name
            else:
                self.ints[v.name] = self.quantize(v.name, v.fmt, False, f"{v.name}_q")
        for op in g.ops:
            self.ints[op.output] = self.emit(op)
        for name in g.outputs:
            self.dq(name, output=name)
        risks = [name for name in float32_risks(g) if name not in self.integer_ops]
        return self.b.model(g, *graph_io(g), {"": self.opset}, "qdq", float32_risk_ops=risks)


def to_qdq(graph: IntegerGraph, *, opset: int = DEFAULT_OPSET, ort_x86: bool = True,
           fold_transparent: bool = True) -> onnx.ModelProto:
    """QDQ ONNX model of ``graph`` (module docstring); float32 in, float32 ``k * 2^-FL`` out.

    ``ort_x86`` (default) stores 8-bit activations as uint8 with zero point 128 and 8-bit weights
    that need all 8 bits likewise, which is what onnxruntime fuses and computes exactly on x86
    (module docstring); ``False`` gives int8 with zero point 0 everywhere. ``fold_transparent``
    runs :class:`~fxquant.export.passes.FoldTransparentQdq`, so MaxPool and Flatten act on the
    stored integers in the file (onnxruntime does the same at load; other consumers need not).
    """
    raise_problems(qdq_problems(graph, opset=check_opset(opset), ort_x86=ort_x86))
    model = _QdqBuilder(graph, opset, ort_x86).build()
    if not fold_transparent:
        return model
    ir_model = ir.from_proto(model)
    FoldTransparentQdq()(ir_model)
    return ir.to_proto(ir_model)


def to_fp32(graph: IntegerGraph, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Float ONNX model: dequantized weights and biases, float activations, no quantizers.

    The float baseline of the same network (``requantize`` ops become identities, a ``clamp`` a
    float ``Clip`` to its real bounds, an average pool the window sums over the true divisors); its
    outputs approximate, not reproduce, the integer reference. A ``lut`` has no float formula in
    ONNX: it reads its table at the input rounded onto the input grid (the float network's table).
    The transformer kinds: token ids and masks are int64 inputs as in the QDQ model; ``embedding`` a
    ``Gather`` of the float table, ``slice`` Slice / Gather, ``softmax`` the float ``Softmax`` of the
    scores with masked (and, ``causal``, future) entries at ``-inf`` and an all-masked row 0 (as the
    integer op), ``layernorm`` ``LayerNormalization`` (opset >= 17) with the float gamma and beta and
    the ``eps`` the integer ``eps_D`` stands for.
    """
    check_exportable(graph)
    b = GraphBuilder()
    ints = integer_inputs(graph)

    def float_of_integer_input(name: str) -> str:
        if name not in ints:
            raise ExportError(f"value {name!r} is used before it is computed", "report this as an exporter bug")
        return b.node("Cast", [name], f"{name}_f32", to=TensorProto.FLOAT)

    floats: dict[str, str] = LazyTensors(float_of_integer_input)
    for name in [v.name for v in graph.inputs] + graph.outputs:
        b.reserve(name)
    floats.update({v.name: v.name for v in graph.inputs if v.name not in ints})
    for op in graph.ops:
        v = graph.values[op.inputs[0]]
        if op.kind in ("embedding", "softmax", "layernorm"):
            floats[op.output] = _fp32_transformer_op(b, graph, op, floats, ints, opset)
            continue
        if op.kind == "constant":
            assert op.weight is not None  # transformer_problems
            values = dequantize(np.asarray(op.weight)[None], op.out_fmt.frac_bits).astype(np.float32)
            ref = op.inputs[0] if op.inputs[0] in {v.name for v in graph.inputs} else floats[op.inputs[0]]
            floats[op.output] = batch_broadcast(b, op, b.const(f"{op.name}.weight", values), ref)
            continue
        xs = [floats[i] for i in op.inputs]
        if op.kind == "linear" and len(v.shape) > 1:
            xs = [linear_rows(b, op, xs[0], v.shape)]
        if op.kind == "requantize":
            f = xs[0]
        elif op.kind == "mul_pow2":
            f = b.node("Mul", [xs[0], b.const("pow2", pow2(op.attrs["exponent"], op.name))], op.name)
        elif op.kind == "clamp":
            lo, hi = clamp_bounds(op)
            s = scale_of(op.out_fmt.frac_bits, op.name)
            f = b.node("Clip", [xs[0], b.const("clip_lo", np.float32(lo * s)), b.const("clip_hi", np.float32(hi * s))],
                       op.name)
        elif op.kind == "lut":
            k = b.node("Round", [b.node("Mul", [xs[0], b.const("inv_scale", scale_of(-v.fmt.frac_bits, op.name))],
                                        f"{op.name}_k")], f"{op.name}_k_rounded")
            k = b.node("Add", [k, b.const("index_offset", np.float32(-v.fmt.qmin))], f"{op.name}_shifted")
            k = b.node("Clip", [k, b.const("clip_lo", np.float32(0)),
                                b.const("clip_hi", np.float32(v.fmt.qmax - v.fmt.qmin))], f"{op.name}_index_f")
            table = dequantize(np.asarray(op.attrs["table"], np.int64), op.out_fmt.frac_bits).astype(np.float32)
            idx = b.node("Cast", [k], f"{op.name}_index", to=TensorProto.INT64)
            f = b.node("Gather", [b.const(f"{op.name}.table", table), idx], op.name, axis=0)
        elif uses_reciprocal(graph, op):
            divisors = 1.0 / avg_divisors(op, *v.shape[-2:]).astype(np.float32)
            f = b.node("Mul", [window_sums(b, op, xs[0], v.shape), b.const(f"{op.name}.inv_divisors",
                                                                           divisors.reshape(1, 1, *divisors.shape))],
                       op.name)
        elif op.kind in WEIGHTED_KINDS:
            assert op.weight is not None and op.weight_fmt is not None  # check_exportable
            assert op.weight_fmt.frac_bits is not None
            w = b.const(f"{op.name}.weight", dequantize(op.weight, op.weight_fmt.frac_bits).astype(np.float32))
            fl_acc = graph.values[op.inputs[0]].fmt.frac_bits + op.weight_fmt.frac_bits
            bias = None if op.bias is None else b.const(f"{op.name}.bias",
                                                        dequantize(op.bias, fl_acc).astype(np.float32))
            f = float_op(b, op, xs, w, bias)
            if op.kind == "linear" and len(v.shape) > 1:
                f = linear_unrows(b, op, f, graph.values[op.output].shape)
        else:
            if pad_node_needed(op, v.shape):
                xs = [pad_node(b, op, xs[0], v.shape, np.float32(-np.inf))]
            f = float_op(b, op, xs, in_shape=v.shape)
        floats[op.output] = b.node("Relu", [f], f"{op.output}_relu") if op.attrs.get("relu") else f
    for name in graph.outputs:
        b.node("Identity", [floats[name]], f"{name}_out", output=name)
    return b.model(graph, *graph_io(graph), {"": check_opset(opset)}, "fp32")


LAYER_NORMALIZATION_OPSET = 17


def _fp32_transformer_op(b: GraphBuilder, graph: IntegerGraph, op: Op, floats: dict[str, str], ints: set[str],
                         opset: int) -> str:
    """The float baseline of an ``embedding``, ``softmax`` or ``layernorm`` (:func:`to_fp32`)."""
    v = graph.values[op.inputs[0]]
    if op.kind == "embedding":
        assert op.weight is not None and op.weight_fmt is not None  # transformer_problems
        ids = op.inputs[0] if op.inputs[0] in ints else b.node("Cast", [floats[op.inputs[0]]], f"{op.name}_ids_i64",
                                                                 to=TensorProto.INT64)
        table = b.const(f"{op.name}.weight", dequantize(op.weight, op.weight_fmt.frac_bits).astype(np.float32))
        return b.node("Gather", [table, guarded_ids(b, op, ids)], op.name, axis=0)
    if op.kind == "softmax":
        keep = None
        if len(op.inputs) > 1:
            mask = op.inputs[1] if op.inputs[1] in ints else floats[op.inputs[1]]
            zero = b.const("zero_i64" if op.inputs[1] in ints else "zero_f32",
                           np.array(0, np.int64 if op.inputs[1] in ints else np.float32))
            keep = b.node("Not", [b.node("Equal", [mask, zero], f"{op.name}_masked")], f"{op.name}_keep")
        if op.attrs.get("causal"):
            tril = b.const(f"{op.name}.causal", np.tril(np.ones(v.shape[-2:], dtype=bool)))
            keep = tril if keep is None else b.node("And", [keep, tril], f"{op.name}_keep_causal")
        x = floats[op.inputs[0]]
        if keep is None:
            return b.node("Softmax", [x], op.name, axis=-1)
        x = b.node("Where", [keep, x, b.const("minus_inf", np.float32(-np.inf))], f"{op.name}_masked_scores")
        p = b.node("Softmax", [x], f"{op.name}_softmax", axis=-1)  # NaN on an all-masked row
        p = b.node("Where", [keep, p, b.const("zero_f32", np.float32(0.0))], f"{op.name}_kept")
        return b.node("Where", [b.node("IsNaN", [p], f"{op.name}_empty_row"), b.const("zero_f32", np.float32(0.0)), p],
                      op.name)
    assert op.weight is not None and op.weight_fmt is not None  # transformer_problems
    if opset < LAYER_NORMALIZATION_OPSET:
        raise UnsupportedOpError(f"op {op.name!r} (layernorm): the FP32 baseline needs LayerNormalization, which "
                                 f"opset {opset} lacks", f"use opset >= {LAYER_NORMALIZATION_OPSET}")
    from fractions import Fraction

    from fxquant.fixed_point import LAYERNORM_FRAC_BITS

    n = v.shape[-1]
    eps = float(Fraction(int(op.attrs["eps"])) / (n ** 3 * Fraction(2) ** (2 * v.fmt.frac_bits)))
    gamma = b.const(f"{op.name}.weight", dequantize(op.weight, op.weight_fmt.frac_bits).astype(np.float32))
    ins = [floats[op.inputs[0]], gamma]
    if op.bias is not None:
        ins.append(b.const(f"{op.name}.bias", dequantize(op.bias, op.weight_fmt.frac_bits + LAYERNORM_FRAC_BITS)
                           .astype(np.float32)))
    y = b.node("LayerNormalization", ins, f"{op.name}_ln" if op.attrs.get("relu") else op.name, axis=-1, epsilon=eps)
    return b.node("Relu", [y], op.name) if op.attrs.get("relu") else y


def check_artifact(model: onnx.ModelProto, what: str) -> None:
    """``onnx.checker`` (full check) and strict shape inference; raises ExportError."""
    try:
        onnx.checker.check_model(model, full_check=True)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{what} fails the ONNX checker: {first}", "report this as an exporter bug") from e
