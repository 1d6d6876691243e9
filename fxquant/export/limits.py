"""What the ONNX exporters can write exactly, as data: the rules the ``onnx-qdq`` and ``qonnx``
targets' ``check`` apply (no onnx import, so ``check`` stays cheap).

Every rule returns :class:`~fxquant.backends.base.Problem` records, all at once, each naming the
layer; the exporters (:func:`fxquant.export.onnx_qdq.to_qdq`, :func:`fxquant.export.qonnx.to_qonnx`)
raise the same list (:func:`raise_problems`) before building anything. Shared rules come from
:mod:`fxquant.legality`; the exporters' own limits are here:

* every scale ``2^-FL`` is a normal float32, ``-126 <= -FL <= 127`` (then ``k * 2^-FL`` is exact);
* QDQ: 9..16-bit values need int16 QuantizeLinear (opset >= 21); a Conv/Gemm on <= 8-bit inputs
  whose worst-case ``|acc|`` exceeds float32's exact integers (``2^24``) runs as
  ConvInteger/MatMulInteger (9..16-bit weights as two 8-bit halves, combined in float64), whose
  int32 sums must hold each half's worst case;
* QONNX: biases are float32 initializers, so ``b * 2^-FL_acc`` must be exact in float32; a
  ``mul`` of two activations is a float32 ``Mul``, exact only while ``|a*b| <= 2^24``;
* both: an average pool that is not a plain power-of-two window (:func:`uses_reciprocal`) sums its
  windows with a float32 ``Conv`` of ones, exact while the window sum stays within ``2^24``; ONNX
  ``ConvTranspose`` has no integer form and accumulates in float32, so a ``conv_transpose2d``
  whose worst-case ``|acc|`` exceeds ``2^24`` is refused, except that QDQ builds one on <= 8-bit
  inputs as the equal convolution of the zero-inserted input (ConvInteger, like a Conv); a
  ``clamp`` whose bounds leave its output format has no stored form.

Ops whose accumulator can exceed ``2^24`` and still run in float32 (ones on 9..16-bit inputs,
activation matmuls, every such op of the QONNX graph) are not refused: :func:`float32_risks` lists them and
the build facts carry the list (they are verified on held-out inputs only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fxquant.errors import UnsupportedOpError, UsageError
from fxquant.fixed_point import dequantize
from fxquant.integer_graph import IntegerGraph, Op

if TYPE_CHECKING:
    from fxquant.backends.base import Problem

FLOAT32_EXACT_BOUND = 1 << 24
"""float32 represents every integer of magnitude <= 2^24."""
NARROW_STORAGE_OPSET = 21
"""INT4 initializers and int16 QuantizeLinear/DequantizeLinear need opset 21."""
DEFAULT_OPSET = 21
QONNX_MAX_IR_VERSION = 10
"""The qonnx tools and hls4ml read IR versions up to 10 (opset 21)."""
FLOAT32_MIN_EXP, FLOAT32_MAX_EXP = -126, 127
"""The exponents of normal float32 powers of two (``2^e`` exact)."""
MIN_OPSET = 13


def check_opset(opset: int, max_ir_version: int | None = None) -> int:
    """Return ``opset`` if it is an integer >= 13 (whose IR version is <= ``max_ir_version``)."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise UsageError(f"opset={opset!r} is not supported", f"use an integer >= {MIN_OPSET}")
    if max_ir_version is None:
        return opset
    from onnx import helper

    ir_version = helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    if ir_version > max_ir_version:
        raise UsageError(f"opset={opset} needs ONNX IR version {ir_version}, this format allows {max_ir_version}",
                         "choose a lower opset")
    return opset


def exportable_problems(graph: IntegerGraph) -> list["Problem"]:
    """Every reason ``graph`` has no exact ONNX form, one :class:`~fxquant.backends.base.Problem` each.

    Shared by the QDQ and QONNX targets' ``check``. From :mod:`fxquant.legality`: values and
    weights without an integer format, weights and biases outside their widths, ``linear`` on an
    N-D input (ONNX Gemm takes ``(N, features)``; grouped convolutions are fine), max pools
    padding more than half their window (any average window, dilation and ceil mode are built),
    the bounds of the transformer kinds (:func:`fxquant.legality.transformer_problems`); ``linear``
    takes any rank (rows reshaped for Gemm).
    The exporters' own limits: every scale ``2^-FL`` (values, weights, the bias accumulator grid,
    a ``mul`` product, a ``mul_pow2`` factor) a normal float32; :func:`float32_problems` and
    :func:`clamp_problems`. Never raises.
    """
    from fxquant import legality
    from fxquant.backends.base import Problem

    problems: list[Problem] = legality.format_problems(graph)
    problems += [Problem(op.name, op.kind, "no weight or weight format: lower the model again with "
                                           "fxquant.passes.lower_to_integer_graph")
                 for op in graph.ops if op.kind in WEIGHTED_KINDS and (op.weight is None or op.weight_fmt is None)]
    if problems:  # the rules below read formats and weights
        return problems
    # linear on any rank: the exporters reshape (N, *S, D) to rows for Gemm (onnx_builder.linear_rows)
    shapes = [p for p in legality.shape_problems(graph, groups=True) if p.kind != "linear"]
    problems += (legality.fit_problems(graph) + shapes + legality.transformer_problems(graph)
                 + legality.avg_window_problems(graph, reciprocal=True)
                 + legality.window_problems(graph, dilation=True, ceil_mode=True))
    producer = {op.output: op for op in graph.ops}
    for v in graph.values.values():
        if not _scale_ok(v.fmt.frac_bits):
            op = producer.get(v.name)
            problems.append(Problem(op.name if op else v.name, op.kind if op else "input",
                                    f"value {v.name!r}: scale 2^{-v.fmt.frac_bits} is outside the float32 normal range"))
    for op in graph.ops:
        scales = {"factor": -int(op.attrs["exponent"])} if op.kind == "mul_pow2" else {}
        if op.kind in WEIGHTED_KINDS:
            scales["weight scale"] = op.weight_fmt.frac_bits
            if op.bias is not None:
                scales["bias scale"] = graph.values[op.inputs[0]].fmt.frac_bits + op.weight_fmt.frac_bits
        if op.kind == "mul":
            scales["product scale"] = sum(graph.values[i].fmt.frac_bits for i in op.inputs)
        problems += [Problem(op.name, op.kind, f"{what} 2^{-fl} is outside the float32 normal range")
                     for what, fl in scales.items() if not _scale_ok(fl)]
    return problems + float32_problems(graph) + clamp_problems(graph)


WEIGHTED_KINDS = ("conv2d", "linear", "conv_transpose2d")
"""Op kinds with a weight (and optional bias) the exporters store."""


def uses_reciprocal(graph: IntegerGraph, op: Op) -> bool:
    """An ``avgpool2d`` the exporters build as window sums times ``M_d 2^-s_d`` in float64 (any
    window, padding, ceil mode); ``False`` for a power-of-two window without padding and without a
    ceil-mode edge window, which stays one ``AveragePool`` (``sum / 2^p``, exact; onnxruntime fuses
    it to QLinearAveragePool)."""
    from fxquant.legality import avg_window_shift, ceil_adds_window

    return op.kind == "avgpool2d" and (avg_window_shift(op.attrs["kernel"]) is None
                                       or any(op.attrs.get("padding", (0, 0))) or ceil_adds_window(graph, op))


def window_sum_bound(graph: IntegerGraph, op: Op) -> int:
    """Worst case ``|sum|`` of an average window: ``kh * kw * 2^(BW_in-1)``."""
    kh, kw = op.attrs["kernel"]
    return kh * kw << (graph.values[op.inputs[0]].fmt.bits - 1)


def float32_problems(graph: IntegerGraph) -> list["Problem"]:
    """Average pools both exporters would sum in float32 beyond its exact integers (``2^24``):
    window sums of :func:`uses_reciprocal` pools are a float32 ``Conv`` of ones."""
    from fxquant.backends.base import Problem

    problems = []
    for op in graph.ops:
        if uses_reciprocal(graph, op) and window_sum_bound(graph, op) > FLOAT32_EXACT_BOUND:
            problems.append(Problem(op.name, op.kind, f"average window sum can reach {window_sum_bound(graph, op)}, "
                                                      "beyond float32's exact 2^24 (the window sums are a float32 "
                                                      "Conv): use a smaller window or fewer input bits"))
    return problems


def conv_transpose_problems(graph: IntegerGraph, *, integer_path: bool, ort_x86: bool = True) -> list["Problem"]:
    """``conv_transpose2d`` ops whose worst-case ``|acc|`` exceeds float32's exact 2^24 (ONNX
    ConvTranspose accumulates in float32; it has no integer form) and that are not on the QDQ
    integer path (``integer_path``: :func:`needs_integer_accumulation`, the equivalent convolution
    as ConvInteger); and ones whose ``output_padding`` (torch: below ``max(stride, dilation)``)
    reaches the stride by more than the padding can absorb (onnxruntime takes ``< stride``)."""
    from fxquant.backends.base import Problem

    problems = [Problem(op.name, op.kind, f"worst-case accumulator {graph.accumulator_bound(op)} exceeds float32's "
                                          "exact 2^24 (ONNX ConvTranspose has no integer form"
                                          + ("; the integer path takes <= 8-bit inputs" if integer_path else "")
                                          + "): use fewer weight/activation bits or channels")
                for op in graph.ops if op.kind == "conv_transpose2d"
                and graph.accumulator_bound(op) > FLOAT32_EXACT_BOUND
                and not (integer_path and needs_integer_accumulation(graph, op, ort_x86=ort_x86))]
    for op in graph.ops:
        if op.kind != "conv_transpose2d":
            continue
        stride, pads = op.attrs.get("stride", (1, 1)), op.attrs.get("padding", (0, 0))
        out_pads = op.attrs.get("output_padding", (0, 0))
        if any(q >= s and q > p for q, s, p in zip(out_pads, stride, pads)):
            problems.append(Problem(op.name, op.kind, f"output_padding {tuple(out_pads)} reaches the stride "
                                                      f"{tuple(stride)} and exceeds the padding {tuple(pads)}: ONNX "
                                                      "ConvTranspose takes output_padding < stride"))
    return problems


def conv_transpose_as_conv(weight: np.ndarray, groups: int) -> np.ndarray:
    """A ConvTranspose weight ``(C_in, C_out/g, kh, kw)`` as the Conv weight ``(C_out, C_in/g, kh, kw)``
    of the equal convolution over the zero-inserted input: per group transposed, spatially flipped."""
    cin, cog, kh, kw = weight.shape
    w = np.asarray(weight).reshape(groups, cin // groups, cog, kh, kw).transpose(0, 2, 1, 3, 4)[..., ::-1, ::-1]
    return np.ascontiguousarray(w.reshape(groups * cog, cin // groups, kh, kw))


def clamp_bounds(op: Op) -> tuple[int, int]:
    """The ``[lo, hi]`` a ``clamp`` clips its requantized integers to, within its output format
    (``None`` is the format's end): equal to ``np.clip`` of the reference when :func:`clamp_problems`
    finds nothing."""
    lo, hi = op.attrs.get("lo"), op.attrs.get("hi")
    return (op.out_fmt.qmin if lo is None else max(int(lo), op.out_fmt.qmin),
            op.out_fmt.qmax if hi is None else min(int(hi), op.out_fmt.qmax))


def clamp_problems(graph: IntegerGraph) -> list["Problem"]:
    """Clamps whose bounds leave the output format (``lo > qmax``, ``hi < qmin`` or ``lo > hi``):
    every output would be a bound the format cannot store."""
    from fxquant.backends.base import Problem

    problems = []
    for op in graph.ops:
        if op.kind != "clamp":
            continue
        lo, hi = op.attrs.get("lo"), op.attrs.get("hi")
        fmt = op.out_fmt
        if ((lo is not None and lo > fmt.qmax) or (hi is not None and hi < fmt.qmin)
                or (lo is not None and hi is not None and lo > hi)):
            problems.append(Problem(op.name, op.kind, f"clamp bounds [{lo}, {hi}] leave the output format {fmt} "
                                                      f"(integers {fmt.qmin}..{fmt.qmax})"))
    return problems


def raise_problems(problems: list["Problem"], what: str = "no exact ONNX form") -> None:
    """Raise :class:`UnsupportedOpError` listing every problem (nothing when there are none)."""
    if problems:
        raise UnsupportedOpError(f"{what} ({len(problems)} problem{'s' if len(problems) != 1 else ''}): "
                                 + "; ".join(str(p) for p in problems),
                                 "see docs/onnx_export.md for what the ONNX exporters support")


def check_exportable(graph: IntegerGraph) -> None:
    """Raise :class:`UnsupportedOpError` listing every :func:`exportable_problems` of ``graph``."""
    raise_problems(exportable_problems(graph))


def _scale_ok(frac_bits: int | None) -> bool:
    return frac_bits is not None and FLOAT32_MIN_EXP <= -frac_bits <= FLOAT32_MAX_EXP


def float32_risks(graph: IntegerGraph) -> list[str]:
    """Ops whose accumulator may exceed float32's exact range (``|acc| > 2^24``), except average
    pools on the reciprocal path (window sums held below 2^24 by :func:`float32_problems`, the
    multiply by ``M`` in float64)."""
    return [op.name for op in graph.ops
            if graph.accumulator_bound(op) > FLOAT32_EXACT_BOUND and not uses_reciprocal(graph, op)]


def needs_integer_accumulation(graph: IntegerGraph, op: Op, *, ort_x86: bool = True) -> bool:
    """A Conv/Gemm/ConvTranspose on <= 8-bit inputs whose accumulator float32 may not hold:
    exported as ConvInteger / MatMulInteger with int32 accumulators and a float64 requantization
    (``_QdqBuilder.integer_op``; weights of 9..16 bits as two 8-bit halves; a ConvTranspose as the
    convolution of its zero-inserted input, ``_QdqBuilder.integer_conv_transpose``)."""
    if not ort_x86 or op.kind not in WEIGHTED_KINDS or op.weight_fmt is None:
        return False
    fits = (graph.values[op.inputs[0]].fmt.bits <= 8 and op.weight_fmt.bits <= 16 and op.out_fmt.bits <= 16)
    return fits and graph.accumulator_bound(op) > FLOAT32_EXACT_BOUND


def split_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w = 256 * hi + lo`` with ``lo`` in ``[0, 255]`` and ``hi`` in ``[-128, 127]`` (16-bit ``w``)."""
    w = np.asarray(w, dtype=np.int64)
    lo = w & 0xFF
    return (w - lo) >> 8, lo


def integer_path_bound(graph: IntegerGraph, op: Op) -> int:
    """Worst case of the int32 sums on the integer path of ``op`` (ConvInteger/MatMulInteger, bias
    excluded: it is added in float64): ``2^(BW_in-1) * max_o sum |w|`` for 8-bit weights, the larger
    of the two halves' sums for split 9..16-bit weights (:func:`split_weights`)."""
    from fxquant.fixed_point import min_signed_bits
    from fxquant.legality import dot_bound

    top = 1 << (graph.values[op.inputs[0]].fmt.bits - 1)
    weight = (conv_transpose_as_conv(op.weight, op.attrs.get("groups", 1)) if op.kind == "conv_transpose2d"
              else op.weight)
    if min_signed_bits(weight) <= 8:
        return dot_bound(weight, None, top)
    hi, lo = split_weights(weight)
    return max(dot_bound(hi, None, top), dot_bound(lo, None, top))


def qdq_problems(graph: IntegerGraph, *, opset: int = DEFAULT_OPSET, ort_x86: bool = True) -> list["Problem"]:
    """Every reason :func:`to_qdq` cannot write ``graph`` exactly (all at once; never raises).

    :func:`exportable_problems`, plus: 9..16-bit values need int16
    QuantizeLinear (opset >= 21); an op on the integer path (:func:`needs_integer_accumulation`)
    needs its worst-case accumulator in int32 (ConvInteger/MatMulInteger accumulate in int32).
    """
    from fxquant.backends.base import Problem
    from fxquant.legality import int_max

    problems = exportable_problems(graph)
    well_formed = not problems  # the accumulator bound needs integer formats and weights
    if opset < NARROW_STORAGE_OPSET:
        producer = {op.output: op for op in graph.ops}
        for v in graph.values.values():
            if 8 < v.fmt.bits <= 16:
                op = producer.get(v.name)
                problems.append(Problem(op.name if op else v.name, op.kind if op else "input",
                                        f"{v.fmt.bits}-bit value {v.name!r} needs int16 QuantizeLinear, which opset "
                                        f"{opset} lacks (use opset >= {NARROW_STORAGE_OPSET})"))
    if well_formed:
        problems += conv_transpose_problems(graph, integer_path=True, ort_x86=ort_x86)
        if opset < NARROW_STORAGE_OPSET:  # 9..16-bit weights are int16 unless split into 8-bit halves
            from fxquant.fixed_point import min_signed_bits

            problems += [Problem(op.name, op.kind, f"{op.weight_fmt.bits}-bit weights need int16 DequantizeLinear, "
                                                   f"which opset {opset} lacks (use opset >= {NARROW_STORAGE_OPSET})")
                         for op in graph.ops if op.kind in WEIGHTED_KINDS and op.weight_fmt.bits > 8
                         and not (needs_integer_accumulation(graph, op, ort_x86=ort_x86)
                                  and min_signed_bits(op.weight) > 8)]
        for op in graph.ops:
            if not needs_integer_accumulation(graph, op, ort_x86=ort_x86):
                continue
            bound = integer_path_bound(graph, op)
            if bound > int_max(32):
                problems.append(Problem(op.name, op.kind, f"worst-case integer sum {bound} exceeds the int32 "
                                                          "accumulator of ConvInteger/MatMulInteger"))
    return problems


QONNX_NO_EXACT_FORM = {
    "softmax": "QONNX has no exact integer softmax (its graph is float ONNX ops plus Quant; a float "
               "Softmax or Exp rounds differently from the integer exponential table): export onnx-qdq",
    "layernorm": "QONNX has no exact integer LayerNorm (its graph is float ONNX ops plus Quant; a float "
                 "mean, variance and Sqrt round differently from the integer isqrt): export onnx-qdq",
}
"""The op kinds QONNX cannot express bit-exactly, with the one-line reason ``check`` gives."""


def qonnx_problems(graph: IntegerGraph) -> list["Problem"]:
    """Every reason :func:`to_qonnx` cannot write ``graph`` exactly (all at once; never raises):
    :func:`exportable_problems`, ``softmax`` and ``layernorm`` (:data:`QONNX_NO_EXACT_FORM`), biases
    float32 cannot hold, and ``mul`` ops whose product can exceed 2^24 (a float32 ``Mul``; the QDQ
    exporter multiplies in int32 instead)."""
    from fxquant.backends.base import Problem

    problems = exportable_problems(graph)
    problems += [Problem(op.name, op.kind, QONNX_NO_EXACT_FORM[op.kind]) for op in graph.ops
                 if op.kind in QONNX_NO_EXACT_FORM]
    if problems:
        return problems
    problems += conv_transpose_problems(graph, integer_path=False)
    for op in graph.ops:
        if op.kind == "mul" and graph.accumulator_bound(op) > FLOAT32_EXACT_BOUND:
            problems.append(Problem(op.name, op.kind, f"product can reach {graph.accumulator_bound(op)}, beyond "
                                                      "float32's exact 2^24 (QONNX multiplies in float32): use "
                                                      "fewer input bits"))
        if op.bias is not None and op.weight_fmt is not None:
            fl_acc = graph.values[op.inputs[0]].fmt.frac_bits + op.weight_fmt.frac_bits
            exact = dequantize(op.bias, fl_acc)
            if not np.array_equal(exact.astype(np.float32).astype(np.float64), exact):
                problems.append(Problem(op.name, op.kind, "bias is not exactly representable in float32 (QONNX "
                                                          "biases are float initializers): keep |b| <= 2^24"))
    return problems
