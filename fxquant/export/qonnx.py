"""QONNX export: float ONNX ops with QONNX ``Quant`` nodes carrying each ``<BW,FL>``.

Format (``fastmachinelearning/qonnx``, domain ``qonnx.custom_op.general``)::

    Quant(x, scale, zeropt, bitwidth; signed=1, narrow=0, rounding_mode="ROUND")
      = (clamp(round(x / scale + zeropt), -2^(BW-1), 2^(BW-1)-1) - zeropt) * scale

with ``scale = 2^-FL``, ``zeropt = 0``, ``bitwidth = BW``; QONNX's ``ROUND`` is ``np.round``, ties
to even, so ``Quant`` is exactly :func:`fxquant.fixed_point.quantize_int` followed by
:func:`fxquant.fixed_point.dequantize`. Placement: one ``Quant`` on each graph input, on each
Conv/Gemm weight (float initializer ``w * 2^-FL_w``, exact), and on the output of every
requantizing op *after* its fused ReLU (``q(relu(y)) = relu(q(y))``); the bias is a float
initializer ``b * 2^-(FL_w+FL_in)`` (exact in float32 or the export fails). MaxPool, Flatten,
Reshape, Transpose, Resize (nearest upsampling) and Relu ops keep the grid and get no ``Quant``.
``ir_version`` 8, opset 13, as the qonnx tools and hls4ml's QONNX front end read it.

The ops beyond a float layer and a ``Quant`` (each exact, see its builder method):

* ``clamp``: ``Quant(out_fmt)`` then a float ``Clip`` to bounds on the output grid;
* ``lut``: ``Gather`` of the float table on the integer index ``x 2^FL_in - qmin_in`` (``Cast``
  to int64): no function is evaluated in float;
* ``mul``: float ``Mul``, ``Quant`` (exact while ``|a b| <= 2^24``; ``check`` refuses larger);
* ``avgpool2d`` with any window, padding or ceil mode: float32 window sums, the reciprocal
  multiply and ``Round`` in float64, then ``Quant``;
* ``conv_transpose2d``: ``ConvTranspose`` like ``Conv`` (exact while ``|acc| <= 2^24``);
* ``linear`` on an input of rank > 2 (a transformer's projections): ``Reshape`` to rows, ``Gemm``,
  ``Reshape`` back;
* ``embedding``: token ids are an int64 graph input; ``Gather`` of the table (float32 ``w 2^-FL_w``
  behind its weight ``Quant``) on the ids (a negative id mapped to ``V``, so that Gather refuses
  it), then ``Quant(out_fmt)``;
* ``slice``: ``Slice`` / ``Gather`` on the floats (the grid is kept, no ``Quant``);
* ``softmax`` and ``layernorm`` are refused (:data:`fxquant.export.limits.QONNX_NO_EXACT_FORM`):
  QONNX's vocabulary is float ONNX plus ``Quant``, and no float formula reproduces the integer
  exponential table or square root bit for bit; the QDQ export writes them exactly in int64.

onnxruntime has no ``Quant`` kernel; :func:`lower_quant` rewrites each ``Quant`` into standard
``Div → Round → Clip → Mul`` (ONNX ``Round`` is half-to-even too) so that the same graph can be
run and checked against the integer reference (:mod:`fxquant.export.verify`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from fxquant.errors import ExportError, UnsupportedOpError
from fxquant.export.limits import (QONNX_MAX_IR_VERSION, WEIGHTED_KINDS, check_opset, clamp_bounds,  # noqa: F401
                                   float32_risks, qonnx_problems, raise_problems, uses_reciprocal)
from fxquant.export.onnx_builder import (GraphBuilder, LazyTensors, batch_broadcast, float_op, graph_io, guarded_ids, integer_inputs,
                                         linear_rows, linear_unrows, pad_node, pad_node_needed, pow2,
                                         reciprocal_factors, scale_of, window_sums)
from fxquant.fixed_point import FixedPoint, dequantize
from fxquant.integer_graph import IntegerGraph, Op

QONNX_DOMAIN = "qonnx.custom_op.general"
QONNX_OPSET = 13
QONNX_IR_VERSION = 8


def _float_const(b: GraphBuilder, base: str, k: np.ndarray, frac_bits: int, what: str) -> str:
    """Initializer ``k * 2^-FL`` in float32; raises if float32 cannot hold it exactly."""
    exact = dequantize(k, frac_bits)
    values = exact.astype(np.float32)
    if not np.array_equal(values.astype(np.float64), exact):
        raise ExportError(f"{what} is not exactly representable in float32",
                          "keep biases below 2^24 on the accumulator grid")
    return b.const(base, values)


class _QonnxBuilder:
    def __init__(self, graph: IntegerGraph) -> None:
        self.graph, self.b = graph, GraphBuilder()
        self.vals: dict[str, str] = LazyTensors(self._float_of_integer_input)
        self.int_inputs: set[str] = integer_inputs(graph)

    def _float_of_integer_input(self, value: str) -> str:
        """An int64 graph input (ids, mask) read by a float op: ``Cast`` to float32, then its ``Quant``
        (saturation to the format, as ``IntegerGraph.quantize_inputs``)."""
        if value not in self.int_inputs:
            raise ExportError(f"value {value!r} is used before it is computed", "report this as an exporter bug")
        f = self.b.node("Cast", [value], f"{value}_f32", to=onnx.TensorProto.FLOAT)
        return self.quant(f, self.graph.values[value].fmt, f"{value}_quant")

    def ids(self, value: str) -> str:
        """int64 token ids of a ``<BW,0>`` value: the int64 graph input, or a ``Cast`` of the float
        (integers on the grid of FL 0, exact)."""
        if value in self.int_inputs:
            return value
        return self.b.node("Cast", [self.vals[value]], f"{value}_ids", to=onnx.TensorProto.INT64)

    def embedding(self, op: Op) -> str:
        """``Gather`` of the table (float32 ``w 2^-FL_w`` with its weight ``Quant``) on the guarded
        int64 ids, then ``Quant(out_fmt)``: the requantization of the gathered rows (identity when
        ``out_fmt == weight_fmt``)."""
        w, wf = op.weight, op.weight_fmt
        assert w is not None and wf is not None and wf.frac_bits is not None  # transformer_problems
        table = self.quant(_float_const(self.b, f"{op.name}.weight", w, wf.frac_bits, f"op {op.name!r} table"), wf,
                           f"{op.name}.weight_quant")
        rows = self.b.node("Gather", [table, guarded_ids(self.b, op, self.ids(op.inputs[0]))], f"{op.name}_gather",
                           axis=0)
        return self.quant(rows, op.out_fmt, op.output)

    def constant(self, op: Op) -> str:
        """The float32 ``k 2^-FL`` of the stored integers with their ``Quant`` (as a weight),
        expanded to the batch of the op's input."""
        assert op.weight is not None and op.out_fmt.frac_bits is not None  # transformer_problems
        k = np.asarray(op.weight)[None]
        values = self.quant(_float_const(self.b, f"{op.name}.weight", k, op.out_fmt.frac_bits,
                                         f"op {op.name!r} constant"), op.out_fmt, f"{op.name}.weight_quant")
        ref = op.inputs[0] if op.inputs[0] in {v.name for v in self.graph.inputs} else self.vals[op.inputs[0]]
        return batch_broadcast(self.b, op, values, ref)

    def linear_nd(self, op: Op) -> str:
        """A ``linear`` on an input of rank > 2 (with the batch): Gemm on
        :func:`~fxquant.export.onnx_builder.linear_rows`, reshaped back."""
        x = op.inputs[0]
        saved = self.vals[x]
        self.vals[x] = linear_rows(self.b, op, saved, self.graph.values[x].shape)
        try:
            y = self.emit(op, rows=True)
        finally:
            self.vals[x] = saved
        return linear_unrows(self.b, op, y, self.graph.values[op.output].shape)

    def quant(self, x: str, fmt: FixedPoint, base: str) -> str:
        assert fmt.frac_bits is not None  # check_exportable
        return self.b.node("Quant", [x, self.b.const("scale", scale_of(fmt.frac_bits, base)),
                                     self.b.const("zeropt", np.float32(0.0)),
                                     self.b.const("bitwidth", np.float32(fmt.bits))],
                           base, domain=QONNX_DOMAIN, signed=1, narrow=0, rounding_mode="ROUND")

    def relu(self, x: str, relu: bool, base: str) -> str:
        return self.b.node("Relu", [x], f"{base}_relu") if relu else x

    def lut(self, op: Op, x: str) -> str:
        """``Gather`` of the table (float32 initializer ``table * 2^-FL_out``, exact) on the shifted
        integer ``k - qmin_in = x * 2^FL_in - qmin_in`` (exact float32 integers below 2^12, then
        ``Cast`` to int64); the ``Quant`` after it carries the output format (the entries are on its grid)."""
        v = self.graph.values[op.inputs[0]]
        k = self.b.node("Mul", [x, self.b.const("inv_scale", scale_of(-v.fmt.frac_bits, op.name))], f"{op.name}_k")
        k = self.b.node("Add", [k, self.b.const("index_offset", np.float32(-v.fmt.qmin))], f"{op.name}_index_f")
        idx = self.b.node("Cast", [k], f"{op.name}_index", to=onnx.TensorProto.INT64)
        table = _float_const(self.b, f"{op.name}.table", np.asarray(op.attrs["table"], np.int64),
                             op.out_fmt.frac_bits, f"op {op.name!r} table")
        return self.quant(self.b.node("Gather", [table, idx], f"{op.name}_gather", axis=0), op.out_fmt, op.output)

    def reciprocal_avgpool(self, op: Op, x: str, relu: bool) -> str:
        """Window sums (a float32 ``Conv`` of ones on ``k 2^-FL_in``, exact below 2^24), ``Cast`` to
        float64, times each window's ``M_d 2^(FL_out - s_d)``, ``Round`` (half to even) there:
        ``round(sum * M_d 2^(FL_out - FL_in - s_d))``; back to float32 ``r 2^-FL_out`` (an integer
        beyond 2^24 rounds monotonically, so the saturation below is unchanged), the ``Quant`` of
        ``out_fmt`` saturates."""
        v = self.graph.values[op.inputs[0]]
        sums = self.b.node("Cast", [window_sums(self.b, op, x, v.shape)], f"{op.name}_sum_f64",
                           to=onnx.TensorProto.DOUBLE)
        factors = self.b.const(f"{op.name}.reciprocal", reciprocal_factors(op, v.shape, op.out_fmt.frac_bits))
        r = self.b.node("Round", [self.b.node("Mul", [sums, factors], f"{op.name}_scaled")], f"{op.name}_rounded")
        r = self.b.node("Cast", [r], f"{op.name}_rounded_f32", to=onnx.TensorProto.FLOAT)
        y = self.b.node("Mul", [r, self.b.const("scale", scale_of(op.out_fmt.frac_bits, op.name))], f"{op.name}_avg")
        return self.quant(self.relu(y, relu, op.output), op.out_fmt, op.output)

    def emit(self, op: Op, *, rows: bool = False) -> str:
        relu = bool(op.attrs.get("relu"))
        in_shape = self.graph.values[op.inputs[0]].shape
        if op.kind == "embedding":
            return self.embedding(op)
        if op.kind == "constant":
            return self.constant(op)
        if op.kind == "linear" and len(in_shape) > 1 and not rows:
            return self.linear_nd(op)
        xs = [self.vals[i] for i in op.inputs]
        if uses_reciprocal(self.graph, op):
            return self.reciprocal_avgpool(op, xs[0], relu)
        if op.kind == "lut":
            return self.lut(op, xs[0])
        if op.kind == "clamp":  # the bounds lie on the output grid: a float Clip after the Quant is exact
            lo, hi = clamp_bounds(op)
            s = scale_of(op.out_fmt.frac_bits, op.name)
            q = self.quant(xs[0], op.out_fmt, f"{op.output}_quant")
            return self.b.node("Clip", [q, self.b.const("clip_lo", np.float32(lo * s)),
                                        self.b.const("clip_hi", np.float32(hi * s))], op.output)
        if op.kind in WEIGHTED_KINDS:
            w, wf = op.weight, op.weight_fmt
            assert w is not None and wf is not None and wf.frac_bits is not None  # check_exportable
            wq = self.quant(_float_const(self.b, f"{op.name}.weight", w, wf.frac_bits, f"op {op.name!r} weight"),
                            wf, f"{op.name}.weight_quant")
            fl_acc = self.graph.values[op.inputs[0]].fmt.frac_bits + wf.frac_bits
            bias = None if op.bias is None else _float_const(self.b, f"{op.name}.bias", op.bias, fl_acc,
                                                             f"op {op.name!r} bias")
            return self.quant(self.relu(float_op(self.b, op, xs, wq, bias), relu, op.output), op.out_fmt, op.output)
        if op.kind in ("matmul", "add", "mul", "avgpool2d"):
            return self.quant(self.relu(float_op(self.b, op, xs, in_shape=in_shape), relu, op.output), op.out_fmt,
                              op.output)
        if op.kind == "requantize":
            return self.quant(self.relu(xs[0], relu, op.output), op.out_fmt, op.output)
        if op.kind == "cat":
            parts = [x if self.graph.values[i].fmt == op.out_fmt and not relu
                     else self.quant(self.relu(x, relu, f"{i}_to_{op.output}"), op.out_fmt, f"{i}_to_{op.output}")
                     for i, x in zip(op.inputs, xs)]
            return float_op(self.b, op, parts)
        if op.kind == "mul_pow2":  # k * 2^-FL_in * 2^e = k * 2^-FL_out, exact in float32
            return self.b.node("Mul", [xs[0], self.b.const("pow2", pow2(op.attrs["exponent"], op.name))], op.name)
        # maxpool2d, flatten, reshape, transpose, upsample_nearest, relu: the grid is kept
        if pad_node_needed(op, in_shape):  # padded with the format's lowest value (on the grid)
            fmt = self.graph.values[op.inputs[0]].fmt
            lowest = np.float32(fmt.qmin * scale_of(fmt.frac_bits, op.name))
            xs = [pad_node(self.b, op, xs[0], in_shape, lowest)]
        return float_op(self.b, op, xs, in_shape=in_shape)

    def build(self, opset: int) -> onnx.ModelProto:
        g = self.graph
        for name in [v.name for v in g.inputs] + g.outputs:
            self.b.reserve(name)
        for v in g.inputs:
            if v.name not in self.int_inputs:  # int64 ids / masks: read as integers (or cast on use)
                self.vals[v.name] = self.quant(v.name, v.fmt, f"{v.name}_quant")
        for op in g.ops:
            self.vals[op.output] = self.emit(op)
        for name in g.outputs:
            self.b.node("Identity", [self.vals[name]], f"{name}_out", output=name)
        return self.b.model(g, *graph_io(g), {"": opset, QONNX_DOMAIN: 1}, "qonnx", min_ir_version=QONNX_IR_VERSION,
                            float32_risk_ops=float32_risks(g))


def to_qonnx(graph: IntegerGraph, *, opset: int = QONNX_OPSET) -> onnx.ModelProto:
    """QONNX model of ``graph`` (module docstring)."""
    opset = check_opset(opset, QONNX_MAX_IR_VERSION)
    raise_problems(qonnx_problems(graph))
    return _QonnxBuilder(graph).build(opset)


def _const(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise UnsupportedOpError(f"Quant input {name!r} is not an initializer", "use constant scale/zeropt/bitwidth")


def lower_quant(model: onnx.ModelProto) -> onnx.ModelProto:
    """Copy of a QONNX model with each ``Quant`` replaced by ``Div → Round → Clip → Mul``.

    Only the form :func:`to_qonnx` writes is accepted (signed, not narrow, zero point 0, constant
    scale and bit width); the bounds come from :class:`fxquant.fixed_point.FixedPoint`.
    """
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    nodes, extra = [], []
    for node in model.graph.node:
        if node.domain != QONNX_DOMAIN:
            nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, scale, zeropt, bitwidth = node.input
        if (node.op_type != "Quant" or attrs.get("signed", 1) != 1 or attrs.get("narrow", 0) != 0
                or attrs.get("rounding_mode", b"ROUND") not in (b"ROUND", b"HALF_EVEN")
                or np.any(_const(model, zeropt) != 0)):
            raise UnsupportedOpError(f"QONNX node {node.name!r} ({node.op_type} {attrs}) has no lowering",
                                     "only signed, non-narrow, zero-point-0, ROUND Quant nodes are lowered")
        fmt = FixedPoint(int(_const(model, bitwidth)), 0)
        prefix = node.output[0]
        lo, hi = f"{prefix}/lo", f"{prefix}/hi"
        extra += [numpy_helper.from_array(np.float32(fmt.qmin), lo), numpy_helper.from_array(np.float32(fmt.qmax), hi)]
        t = [f"{prefix}/{s}" for s in ("scaled", "rounded", "clipped")]
        nodes += [helper.make_node("Div", [x, scale], [t[0]]), helper.make_node("Round", [t[0]], [t[1]]),
                  helper.make_node("Clip", [t[1], lo, hi], [t[2]]),
                  helper.make_node("Mul", [t[2], scale], [node.output[0]])]
    del lowered.graph.node[:]
    lowered.graph.node.extend(nodes)
    lowered.graph.initializer.extend(extra)
    kept = [o for o in lowered.opset_import if o.domain != QONNX_DOMAIN]
    del lowered.opset_import[:]
    lowered.opset_import.extend(kept)
    return lowered
