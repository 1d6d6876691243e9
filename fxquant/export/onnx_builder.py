"""Shared ONNX graph building for the exporters (QDQ, QONNX, fp32).

Nothing here is numeric: the fixed-point math (rounding, saturation, requantization) is stated in
:mod:`fxquant.fixed_point`; each flavour re-expresses it with ONNX ops. This module gives

* :class:`GraphBuilder`: unique tensor names, deduplicated constants, node creation, model
  assembly with the ``fxquant.*`` metadata;
* :func:`float_op`: the float ONNX node of one integer op's *accumulation* (Conv, ConvTranspose,
  Gemm, MatMul, Add/Sum, Mul, Concat, AveragePool, MaxPool, Relu, Flatten, Reshape, Transpose,
  Resize, and a ``slice`` as Slice / Gather: :func:`slice_node`) on float tensors, without the
  requantization and without the fused ReLU, which each flavour places itself;
* :func:`integer_inputs`, :func:`graph_io`: token ids and masks are int64 graph inputs (the
  integers themselves) in every flavour, other inputs float32; :func:`guarded_ids` makes a
  negative id fail in ``Gather`` like an id ``>= V``; :func:`linear_rows` / :func:`linear_unrows`
  put a ``linear`` on a rank > 2 input through the 2-D Gemm paths;
* :func:`window_sums` and :func:`reciprocal_factors`: an average pool on the reciprocal path
  (:func:`fxquant.export.limits.uses_reciprocal`) as exact window sums (a depthwise float32 Conv of
  ones, padding and ceil-mode overhang as zero padding) and the per-window factor
  ``M_d 2^(shift - s_d)`` of :func:`fxquant.fixed_point.reciprocal` (float64, exact);
* (re-exported from :mod:`fxquant.export.limits`, which imports no onnx) :func:`check_opset`,
  :func:`exportable_problems`, :func:`check_exportable`;
* :func:`float32_risks` (from :meth:`IntegerGraph.accumulator_bound`, the worst-case ``|acc|``): the ops
  whose accumulator float32 cannot hold (``> 2^24``), where onnxruntime's float32 requantization
  may round twice.

The real value of an integer ``k`` at ``<BW,FL>`` is ``k * 2^-FL``; every scale is the power of
two ``2^-FL`` (:func:`fxquant.fixed_point.dequantize` of 1), held in float32, which is exact for
``-126 <= FL <= 127``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fxquant.errors import ExportError, UnsupportedOpError
from fxquant.export.limits import (FLOAT32_EXACT_BOUND, FLOAT32_MAX_EXP, FLOAT32_MIN_EXP, MIN_OPSET,  # noqa: F401
                                   check_exportable, check_opset, exportable_problems, float32_risks, raise_problems)
from fxquant.fixed_point import FixedPoint, dequantize, reciprocal
from fxquant.integer_graph import IntegerGraph, Op, avg_divisors, pool_output_size

META_PRECISION_MAP = "fxquant.precision_map"
"""Metadata key: ``json.dumps(graph.layers)``, the precision map's ``layers`` section."""
META_VALUE_FORMATS = "fxquant.value_formats"
"""Metadata key: JSON ``{value name: {"bits", "frac_bits", "shape"}}`` of every integer value."""
META_FLAVOUR = "fxquant.flavour"
"""Metadata key: ``qdq``, ``qonnx`` or ``fp32``."""
META_FLOAT32_RISKS = "fxquant.float32_risk_ops"
"""Metadata key: JSON list of the ops this model computes in float32 although their accumulator
may exceed 2^24, so that onnxruntime may round them twice (:func:`float32_risks`)."""
PRODUCER = "fxquant"


_ONNX_OP = {"matmul": "MatMul", "avgpool2d": "AveragePool", "maxpool2d": "MaxPool", "relu": "Relu"}


def pow2(exponent: int, what: str) -> np.float32:
    """The float32 factor ``2^e`` of a ``mul_pow2`` op (exact: :func:`scale_of` of ``-e``)."""
    return scale_of(-int(exponent), what)


def scale_of(frac_bits: int, what: str) -> np.float32:
    """The float32 scale ``2^-FL``; raises if it is not a normal float32 (inexact)."""
    if not FLOAT32_MIN_EXP <= -frac_bits <= FLOAT32_MAX_EXP:
        raise ExportError(f"{what}: scale 2^{-frac_bits} is outside the float32 normal range",
                          f"keep frac_bits in [{-FLOAT32_MAX_EXP}, {-FLOAT32_MIN_EXP}]")
    return np.float32(dequantize(np.int64(1), frac_bits))


def value_formats(graph: IntegerGraph) -> dict[str, dict[str, Any]]:
    return {v.name: {**v.fmt.to_dict(), "shape": list(v.shape)} for v in graph.values.values()}


class GraphBuilder:
    """Accumulates nodes and initializers with unique names; constants are deduplicated."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple[int, tuple[int, ...], bytes], str] = {}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Claim an exact name (graph inputs and outputs)."""
        if name in self._names:
            raise ExportError(f"tensor name {name!r} is used twice", "give graph inputs/outputs unique names")
        self._names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        """An initializer holding ``array`` (reused when an identical one exists)."""
        tensor = numpy_helper.from_array(np.asarray(array), "")
        key = (tensor.data_type, tuple(tensor.dims), tensor.SerializeToString())
        if key not in self._consts:
            tensor.name = self.fresh(base)
            self.initializers.append(tensor)
            self._consts[key] = tensor.name
        return self._consts[key]

    def node(self, op_type: str, inputs: list[str], base: str, *, domain: str = "",
             output: str | None = None, **attrs: Any) -> str:
        """Add a single-output node; returns the output name (``output`` if given, else fresh)."""
        out = output if output is not None else self.fresh(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=self.fresh(f"{base}/{op_type}"),
                                           domain=domain, **attrs))
        return out

    def model(self, graph: IntegerGraph, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto], opsets: dict[str, int], flavour: str,
              min_ir_version: int = 0, float32_risk_ops: list[str] | None = None) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, f"fxquant_{flavour}", inputs, outputs, self.initializers)
        opset_ids = [helper.make_opsetid(d, v) for d, v in opsets.items()]
        model = helper.make_model(g, opset_imports=opset_ids, producer_name=PRODUCER)
        model.ir_version = max(min_ir_version, helper.find_min_ir_version_for(opset_ids, ignore_unknown=True))
        helper.set_model_props(model, {
            META_FLAVOUR: flavour,
            META_PRECISION_MAP: json.dumps(graph.layers, sort_keys=True),
            META_VALUE_FORMATS: json.dumps(value_formats(graph), sort_keys=True),
            META_FLOAT32_RISKS: json.dumps(float32_risk_ops or []),
        })
        return model


def float_io(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    """A float32 graph input/output with a symbolic batch dimension ``N``."""
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape])


def int_io(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    """An int64 graph input with a symbolic batch dimension ``N`` (token ids, masks)."""
    return helper.make_tensor_value_info(name, TensorProto.INT64, ["N", *shape])


def integer_inputs(graph: IntegerGraph) -> set[str]:
    """The graph inputs both flavours declare as int64 ONNX inputs holding the integers ``k``
    themselves: token ids (the input of an ``embedding``) and masks (a ``softmax``'s second input).
    Every other graph input stays float32 ``k * 2^-FL``, quantized by the model."""
    names = {v.name for v in graph.inputs}
    used = {op.inputs[0] for op in graph.ops if op.kind == "embedding"}
    used |= {op.inputs[1] for op in graph.ops if op.kind == "softmax" and len(op.inputs) > 1}
    return names & used


def graph_io(graph: IntegerGraph) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """The ONNX inputs (int64 for :func:`integer_inputs`, else float32) and float32 outputs of ``graph``."""
    ints = integer_inputs(graph)
    return ([(int_io if v.name in ints else float_io)(v.name, v.shape) for v in graph.inputs],
            [float_io(n, graph.values[n].shape) for n in graph.outputs])


class LazyTensors(dict):
    """``{value name: tensor name}`` that builds a missing entry with ``make(value)`` on first use
    (the node it emits comes after its producer's, so the node list stays topologically ordered)."""

    def __init__(self, make) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: str) -> str:
        self[key] = self._make(key)
        return self[key]


def linear_rows(b: GraphBuilder, op: Op, x: str, in_shape: tuple[int, ...]) -> str:
    """A ``linear`` input of shape ``(N, *S, D)`` (rank > 2 with the batch) as ``(N prod(S), D)``
    for Gemm / MatMulInteger (``Reshape``: the integers are unchanged); :func:`linear_unrows` undoes it."""
    return b.node("Reshape", [x, b.const(f"{op.name}.rows", np.array([-1, in_shape[-1]], np.int64))],
                  f"{op.name}_rows")


def linear_unrows(b: GraphBuilder, op: Op, y: str, out_shape: tuple[int, ...], output: str | None = None) -> str:
    """The ``(N prod(S), F)`` result of :func:`linear_rows`'s op back to ``(N, *S, F)``."""
    return b.node("Reshape", [y, b.const(f"{op.name}.unrows", np.array([-1, *out_shape], np.int64))],
                  f"{op.name}_unrows", output=output)


def conv_attrs(op: Op) -> dict[str, Any]:
    """ONNX Conv/ConvInteger attributes of a ``conv2d`` op (``kernel_shape`` too, which hls4ml's
    QONNX front end needs although ONNX makes it optional)."""
    assert op.weight is not None  # check_exportable
    ph, pw = op.attrs.get("padding", (0, 0))
    return {"kernel_shape": list(op.weight.shape[2:]), "strides": list(op.attrs.get("stride", (1, 1))),
            "pads": [ph, pw, ph, pw],
            "dilations": list(op.attrs.get("dilation", (1, 1))), "group": op.attrs.get("groups", 1)}


def conv_transpose_attrs(op: Op) -> dict[str, Any]:
    """ONNX ConvTranspose attributes of a ``conv_transpose2d`` op (the weight layout
    ``(C_in, C_out/groups, kh, kw)`` and the output size are torch's and ONNX's alike).

    torch takes ``output_padding < max(stride, dilation)``, onnxruntime only ``< stride``; output
    padding only stops the end padding from cropping (both crop the full output), so an
    ``output_padding`` of at least the stride is written as end padding ``p - q`` (``q <= p``:
    :func:`~fxquant.export.limits.conv_transpose_problems` refuses the rest)."""
    assert op.weight is not None  # check_exportable
    pads, out_pads = op.attrs.get("padding", (0, 0)), op.attrs.get("output_padding", (0, 0))
    ends = [p - q if q >= s else p for p, q, s in zip(pads, out_pads, op.attrs.get("stride", (1, 1)))]
    out_pads = [0 if q >= s else q for q, s in zip(out_pads, op.attrs.get("stride", (1, 1)))]
    return {"kernel_shape": list(op.weight.shape[2:]), "strides": list(op.attrs.get("stride", (1, 1))),
            "pads": [*pads, *ends], "output_padding": out_pads,
            "dilations": list(op.attrs.get("dilation", (1, 1))), "group": op.attrs.get("groups", 1)}


def pool_pads(op: Op, in_shape: tuple[int, ...]) -> list[int]:
    """ONNX ``pads`` (begin h, w, end h, w) of a pool: its padding, plus, at the end, the overhang
    of torch's ``ceil_mode`` windows (:func:`fxquant.integer_graph.pool_output_size`), so that floor
    mode gives torch's windows. (ONNX's own ``ceil_mode`` output size differs from torch's where a
    last window would start in the end padding.)"""
    h, w = in_shape[-2:]
    kh, kw = op.attrs["kernel"]
    sh, sw = op.attrs.get("stride", (kh, kw))
    ph, pw = op.attrs.get("padding", (0, 0))
    dh, dw = op.attrs.get("dilation", (1, 1))
    ceil = bool(op.attrs.get("ceil_mode", False))
    ends = []
    for n, k, s, p, d in ((h, kh, sh, ph, dh), (w, kw, sw, pw, dw)):
        out = pool_output_size(n, k, s, p, d, ceil)
        ends.append(p + max(0, (out - 1) * s + d * (k - 1) + 1 - (n + 2 * p)))
    return [ph, pw, *ends]


def pad_node_needed(op: Op, in_shape: tuple[int, ...]) -> bool:
    """Whether a max pool's :func:`pool_pads` need a ``Pad`` node before it: onnxruntime's MaxPool
    takes only pads smaller than the kernel, and a dilated ceil-mode overhang can be larger."""
    if op.kind != "maxpool2d":
        return False
    kh, kw = op.attrs["kernel"]
    return any(p >= k for p, k in zip(pool_pads(op, in_shape), (kh, kw, kh, kw)))


def pad_node(b: GraphBuilder, op: Op, x: str, in_shape: tuple[int, ...], value: np.ndarray) -> str:
    """``Pad`` of an NCHW tensor by :func:`pool_pads` with the constant ``value`` (a max pool's
    lowest value: every window holds an input cell, so the maximum is unchanged)."""
    ph, pw, eh, ew = pool_pads(op, in_shape)
    pads = b.const(f"{op.name}.pads", np.array([0, 0, ph, pw, 0, 0, eh, ew], np.int64))
    return b.node("Pad", [x, pads, b.const(f"{op.name}.pad_value", value)], f"{op.name}_pad", mode="constant")


def window_sums(b: GraphBuilder, op: Op, x: str, in_shape: tuple[int, ...]) -> str:
    """Float32 window sums of an average pool: a depthwise ``Conv`` of ones over ``x`` (zero
    padding, :func:`pool_pads`), exact while every sum stays within 2^24 (``check``)."""
    c = in_shape[0]
    kh, kw = op.attrs["kernel"]
    ones = b.const(f"{op.name}.ones", np.ones((c, 1, kh, kw), np.float32))
    return b.node("Conv", [x, ones], f"{op.name}_sum", kernel_shape=[kh, kw],
                  strides=list(op.attrs.get("stride", (kh, kw))), pads=pool_pads(op, in_shape), group=c)


def reciprocal_factors(op: Op, in_shape: tuple[int, ...], shift: int) -> np.ndarray:
    """``(1, 1, oh, ow)`` float64 factors ``M_d 2^(shift - s_d)``, ``(M_d, s_d) =
    fixed_point.reciprocal(d)`` of each window's divisor ``d`` (:func:`fxquant.integer_graph.avg_divisors`):
    ``round(sum * factor)`` is the reference's requantize of ``sum * M_d`` from ``FL_in + s_d`` when
    ``shift = FL_out - FL_in`` (exact in float64: ``|sum * M_d| < 2^53``). One divisor for every
    window gives a scalar."""
    divisors = avg_divisors(op, *in_shape[-2:])
    if np.all(divisors == divisors.flat[0]):
        m, s = reciprocal(int(divisors.flat[0]))
        return np.array(np.ldexp(float(m), shift - s), np.float64)
    factors = np.empty(divisors.shape, np.float64)
    for d in np.unique(divisors):
        m, s = reciprocal(int(d))
        factors[divisors == d] = np.ldexp(float(m), shift - s)
    return factors.reshape(1, 1, *factors.shape)


def float_op(b: GraphBuilder, op: Op, xs: list[str], weight: str | None = None,
             bias: str | None = None, in_shape: tuple[int, ...] | None = None) -> str:
    """The float node computing ``op``'s accumulation (before requantization and fused ReLU).

    ``xs`` are float input tensors, ``weight``/``bias`` float weight and bias tensors, ``in_shape``
    the first input's shape (without the batch; pools need it; a max pool whose
    :func:`pad_node_needed` takes its input already padded). ``cat`` is a plain Concat of its
    (already requantized) inputs along ``attrs["dim"]``; ``avgpool2d`` here is the power-of-two
    ``AveragePool`` (:func:`~fxquant.export.limits.uses_reciprocal` pools are built by each flavour
    from :func:`window_sums`); ``upsample_nearest`` is ``Resize`` nearest with integer scales
    (``asymmetric``/``floor``: output pixel ``i`` reads ``floor(i / s)``, exact).
    """
    a = op.attrs
    if op.kind == "conv2d":
        return b.node("Conv", xs + [weight] + ([bias] if bias else []), op.name, **conv_attrs(op))
    if op.kind == "conv_transpose2d":
        return b.node("ConvTranspose", xs + [weight] + ([bias] if bias else []), op.name, **conv_transpose_attrs(op))
    if op.kind == "linear":
        return b.node("Gemm", xs + [weight] + ([bias] if bias else []), op.name, transB=1)
    if op.kind == "add":
        return b.node("Add" if len(xs) == 2 else "Sum", xs, op.name)
    if op.kind == "mul":
        return b.node("Mul", xs, op.name)
    if op.kind in ("avgpool2d", "maxpool2d"):
        if in_shape is None:
            raise ExportError(f"op {op.name!r}: a pool needs its input shape", "report this as an exporter bug")
        kernel = list(a["kernel"])
        extra = {"dilations": list(a["dilation"])} if op.kind == "maxpool2d" and "dilation" in a else {}
        pads = [0, 0, 0, 0] if pad_node_needed(op, in_shape) else pool_pads(op, in_shape)  # padded by the caller
        return b.node(_ONNX_OP[op.kind], xs, op.name, kernel_shape=kernel,
                      strides=list(a.get("stride", kernel)), pads=pads, **extra)
    if op.kind == "transpose":
        return b.node("Transpose", xs, op.name, perm=[0, *(int(p) + 1 for p in a["perm"])])
    if op.kind == "upsample_nearest":
        sh, sw = a["scale"]
        scales = b.const(f"{op.name}.scales", np.array([1, 1, sh, sw], np.float32))
        return b.node("Resize", [*xs, "", scales], op.name, mode="nearest",
                      coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    if op.kind == "flatten":
        return b.node("Flatten", xs, op.name, axis=1)
    if op.kind == "reshape":  # attrs["shape"] excludes the batch; ONNX 0 copies the batch dimension
        shape = b.const(f"{op.name}.shape", np.array([0, *a["shape"]], np.int64))
        return b.node("Reshape", [*xs, shape], op.name)
    if op.kind == "cat":
        return b.node("Concat", xs, op.name, axis=a.get("dim", 1))
    if op.kind in ("matmul", "relu"):
        return b.node(_ONNX_OP[op.kind], xs, op.name)
    if op.kind == "slice":
        return slice_node(b, op, xs[0])
    raise UnsupportedOpError(f"op {op.name!r}: kind {op.kind!r} has no float ONNX form",
                             "requantize ops are expressed by each flavour's quantizer")


def slice_node(b: GraphBuilder, op: Op, x: str, output: str | None = None) -> str:
    """A ``slice`` op on any tensor (it copies values): ``Gather`` of the scalar ``index`` on axis
    ``dim`` (the axis removed, ``x[:, 0]``), else ``Slice(start, stop, dim, step)``."""
    a = op.attrs
    if "index" in a:
        return b.node("Gather", [x, b.const(f"{op.name}.index", np.array(int(a["index"]), np.int64))], op.name,
                      output=output, axis=int(a["dim"]))
    ins = [b.const(f"{op.name}.{n}", np.array([int(v)], np.int64))
           for n, v in (("start", a["start"]), ("stop", a["stop"]), ("dim", a["dim"]), ("step", a.get("step", 1)))]
    return b.node("Slice", [x, *ins], op.name, output=output)


def batch_broadcast(b: GraphBuilder, op: Op, x: str, ref: str, output: str | None = None) -> str:
    """A ``constant`` op's tensor ``x`` of shape ``(1, *S)`` expanded to ``(N, *S)``, ``N`` the batch
    of the tensor ``ref`` (``Shape → Slice → Concat → Expand``; any opset from 8, dynamic batch)."""
    assert op.weight is not None  # transformer_problems
    shape = b.node("Shape", [ref], f"{op.name}_ref_shape")
    batch = b.node("Slice", [shape, b.const("zero_1d_i64", np.array([0], np.int64)),
                             b.const("one_1d_i64", np.array([1], np.int64))], f"{op.name}_batch")
    full = b.node("Concat", [batch, b.const(f"{op.name}.shape", np.array(op.weight.shape, np.int64))],
                  f"{op.name}_shape", axis=0)
    return b.node("Expand", [x, full], op.name, output=output)


def guarded_ids(b: GraphBuilder, op: Op, ids: str) -> str:
    """int64 token ids with every negative id replaced by ``V`` (the table's row count), so that
    onnxruntime's ``Gather`` refuses it as it refuses ids ``>= V`` (ONNX Gather wraps negatives)."""
    assert op.weight is not None  # transformer_problems
    negative = b.node("Less", [ids, b.const("zero_i64", np.array(0, np.int64))], f"{op.name}_negative")
    return b.node("Where", [negative, b.const(f"{op.name}.rows", np.array(op.weight.shape[0], np.int64)), ids],
                  f"{op.name}_ids")


def fmt_bounds(fmt: FixedPoint, relu: bool) -> tuple[int, int]:
    """The integer range of ``fmt`` (``[0, qmax]`` when a ReLU follows)."""
    return (0 if relu else fmt.qmin), fmt.qmax
