"""Layer plan: an :class:`~fxquant.integer_graph.IntegerGraph` checked and sized for the HLS backend.

Runs first in the FPGA backend; the code generator (:mod:`.codegen`) and the resource model
(:mod:`.estimates`) both read the plan, so widths and shapes are computed once.

Every value is an ``ap_int<BW>`` holding the integer ``k`` of ``k * 2^-FL`` (the HLS twin of
``ap_fixed<BW, BW-FL, AP_RND_CONV, AP_SAT>``, which is not used because it is undefined for the
shifts that extreme ``FL`` produce; see ``docs/fpga.md``). Per op kind, with ``FL_acc`` the grid of
the accumulator and ``shift = FL_out - FL_acc`` the requantize shift:

* ``conv2d``/``linear``: ``acc = sum(a*w) + b`` in ``ap_int<accumulator_bits(BW_in, BW_w, fan_in,
  32 if bias)>`` (exact, :func:`fxquant.fixed_point.accumulator_bits`), ``FL_acc = FL_in + FL_w``.
* ``add`` (two inputs): ``acc = (a << (FL - FL_a)) + (b << (FL - FL_b))`` with ``FL = max(FL_a,
  FL_b)``; width ``max(BW_i + FL - FL_i) + 1``.
* ``avgpool2d`` (window ``2^p``, no padding): window sum in ``ap_int<BW_in + p>`` at ``FL_in + p``.
* ``cat`` (two inputs, channel axis): each input requantized to the output format on its own
  (``in_shifts[i] = FL_out - FL_i``) and written to its slice; in CHW order that is a
  concatenation of the flat arrays.
* ``requantize``: ``acc`` is the input itself.
* ``maxpool2d``, ``relu``, ``flatten``: act on the integers; the output format is the input's.

Limits: one graph input and one output, value widths 2..16 (``BW = 32`` is *off*, i.e. float,
and has no integer form), accumulators of at most :data:`MAX_ACC_BITS` bits (the reference
simulator computes in int64), weights and biases that fit their declared widths.
:func:`graph_problems` lists every limit a graph breaks (the shared rules from
:mod:`fxquant.legality`, then each remaining layer planned on its own), which is what
``FpgaTarget.check`` reports; :func:`plan_graph` raises :mod:`fxquant.errors` at the first.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from fxquant import legality
from fxquant.backends.base import Problem
from fxquant.errors import ExportError, FxquantError, PrecisionError, UnsupportedOpError
from fxquant.fixed_point import BIAS_BITS, FixedPoint, accumulator_bits, min_signed_bits
from fxquant.integer_graph import TRANSPARENT_KINDS, IntegerGraph, Op, Value

MAX_BITS = 16
"""Widest value / weight format generated (``ap_int<2..16>``)."""
MAX_ACC_BITS = 64
"""Widest accumulator generated: the integer reference (:meth:`IntegerGraph.run`) is int64."""
SUPPORTED_KINDS = ("conv2d", "linear", "add", "cat", "avgpool2d", "maxpool2d", "relu", "flatten", "requantize")


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
    graph: IntegerGraph
    input: Value
    output: Value
    layers: tuple[LayerPlan, ...]

    @property
    def in_size(self) -> int:
        return math.prod(self.input.shape)

    @property
    def out_size(self) -> int:
        return math.prod(self.output.shape)


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


def _expected_shape(op: Op, ins: tuple[Value, ...]) -> tuple[int, ...]:
    """The output shape the reference produces for ``op`` (the generated C indexes by it)."""
    shape = ins[0].shape
    if op.kind == "linear":
        if shape != (op.weight.shape[1],):
            raise ExportError(f"op {op.name!r}: linear weight {tuple(op.weight.shape)} does not fit input {shape}")
        return (op.weight.shape[0],)
    if op.kind in ("conv2d", "maxpool2d", "avgpool2d"):
        if op.kind == "conv2d":
            kh, kw = op.weight.shape[2:]
            stride, dil = op.attrs.get("stride", (1, 1)), op.attrs.get("dilation", (1, 1))
            channels = op.weight.shape[0]
            groups = op.attrs.get("groups", 1)
            if shape[0] != op.weight.shape[1] * groups or channels % groups:
                raise ExportError(f"op {op.name!r}: conv weight {tuple(op.weight.shape)} with groups={groups} "
                                  f"does not fit input {shape}")
        else:
            kh, kw = op.attrs["kernel"]
            stride, dil, channels = op.attrs.get("stride", (kh, kw)), (1, 1), shape[0]
        pad = op.attrs.get("padding", (0, 0))
        return (channels, _window_out(shape[1], kh, stride[0], pad[0], dil[0]),
                _window_out(shape[2], kw, stride[1], pad[1], dil[1]))
    if op.kind == "flatten":
        return (math.prod(shape),)
    if op.kind == "cat":
        return (ins[0].shape[0] + ins[1].shape[0], *shape[1:])
    if op.kind == "add" and ins[1].shape != shape:
        raise ExportError(f"op {op.name!r}: add of shapes {shape} and {ins[1].shape}")
    return shape


def _plan_op(index: int, op: Op, graph: IntegerGraph) -> LayerPlan:
    if op.kind not in SUPPORTED_KINDS:
        raise UnsupportedOpError(f"op {op.name!r}: kind {op.kind!r} is not supported by the FPGA backend",
                                 f"supported: {', '.join(SUPPORTED_KINDS)}")
    ins = tuple(graph.value(i) for i in op.inputs)
    out = graph.value(op.output)
    in_fls = [_check_fmt(v.fmt, f"value {v.name!r}") for v in ins]
    out_fl = _check_fmt(out.fmt, f"value {out.name!r}")
    kind = op.kind
    if kind not in TRANSPARENT_KINDS and op.out_fmt != out.fmt:
        raise ExportError(f"op {op.name!r}: out_fmt {op.out_fmt} differs from its value's format {out.fmt}",
                          "re-lower the graph")
    mults, iterations, fan_in, in_shifts = 0, 1, 1, ()
    if kind in ("conv2d", "linear"):
        if op.weight is None or op.weight_fmt is None:
            raise ExportError(f"op {op.name!r}: {kind} has no weight")
        w_fl = _check_fmt(op.weight_fmt, f"weight of op {op.name!r}")
        _check_ints(op, op.weight, op.weight_fmt.bits, "a weight")
        if op.bias is not None:
            _check_ints(op, op.bias, BIAS_BITS, "a bias")
        fan_in = int(np.prod(op.weight.shape[1:]))
        acc = accumulator_bits(ins[0].fmt.bits, op.weight_fmt.bits, fan_in,
                               BIAS_BITS if op.bias is not None else None)
        acc_fl = in_fls[0] + w_fl
        mults = op.weight.size
        if kind == "conv2d":
            iterations = out.shape[1] * out.shape[2]
    elif kind == "add":
        if len(ins) != 2:
            raise UnsupportedOpError(f"op {op.name!r}: add of {len(ins)} inputs is not supported by "
                                     "the FPGA backend", "use two-input adds")
        acc_fl = max(in_fls)
        in_shifts = tuple(acc_fl - fl for fl in in_fls)
        acc = max(v.fmt.bits + s for v, s in zip(ins, in_shifts)) + 1
    elif kind == "cat":
        dim = op.attrs.get("dim", 1)
        if len(ins) != 2 or dim % (len(out.shape) + 1) != 1:
            raise UnsupportedOpError(f"op {op.name!r}: cat of {len(ins)} inputs on dim {dim} is not supported by "
                                     "the FPGA backend", "concatenate two tensors on the channel dim (1)")
        in_shifts = tuple(out_fl - fl for fl in in_fls)
        acc, acc_fl = max(v.fmt.bits for v in ins), out_fl
    elif kind == "avgpool2d":
        p = legality.require_avg_window(op.attrs["kernel"], op.attrs.get("padding", (0, 0)), f"op {op.name!r}")
        acc, acc_fl = ins[0].fmt.bits + p, in_fls[0] + p
        iterations = out.shape[1] * out.shape[2]
    elif kind == "requantize":
        acc, acc_fl = ins[0].fmt.bits, in_fls[0]
    else:  # maxpool2d, relu, flatten: the integers pass through
        if out.fmt != ins[0].fmt:
            raise ExportError(f"op {op.name!r}: {kind} changes the format {ins[0].fmt} -> {out.fmt}",
                              "transparent ops keep their input format")
        acc, acc_fl = ins[0].fmt.bits, in_fls[0]
        if kind == "maxpool2d":
            iterations = out.shape[1] * out.shape[2]
    expected = _expected_shape(op, ins)
    if tuple(out.shape) != expected:
        raise ExportError(f"op {op.name!r}: output value {out.name!r} has shape {tuple(out.shape)}, "
                          f"but {kind} computes {expected}", "re-lower the graph")
    return LayerPlan(op=op, ident=c_ident(index, op.name), inputs=ins, output=out,
                     acc_bits=_check_acc(op, acc), acc_frac_bits=acc_fl, shift=out_fl - acc_fl,
                     in_shifts=in_shifts, mults=mults, iterations=iterations, fan_in=fan_in)


def plan_graph(graph: IntegerGraph) -> ModelPlan:
    """Check ``graph`` against the backend's limits and size every layer."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise UnsupportedOpError(f"graph has {len(graph.inputs)} inputs and {len(graph.outputs)} outputs; "
                                 "the FPGA backend supports exactly one of each")
    if not graph.ops:
        raise ExportError("graph has no ops", "lower a model with at least one layer")
    _check_fmt(graph.inputs[0].fmt, f"input {graph.inputs[0].name!r}")
    layers = tuple(_plan_op(i, op, graph) for i, op in enumerate(graph.ops))
    return ModelPlan(graph=graph, input=graph.inputs[0], output=graph.value(graph.outputs[0]), layers=layers)


def graph_problems(graph: IntegerGraph) -> list[Problem]:
    """Every limit of this module ``graph`` breaks beyond the op kinds, each naming the layer.

    The shared rules (:mod:`fxquant.legality`) first; every layer they leave unflagged is then
    planned on its own (:func:`_plan_op`), and the error it raises, if any, becomes its problem.
    """
    problems = (legality.format_problems(graph)
                + legality.width_problems(graph, weight_bits=(2, MAX_BITS), act_bits=(2, MAX_BITS))
                + legality.fit_problems(graph)
                + legality.shape_problems(graph, groups=True, max_inputs=1, max_outputs=1, add_arity=2)
                + legality.avg_window_problems(graph)
                + legality.window_problems(graph))
    if not graph.ops or not graph.outputs:
        problems.append(Problem("graph", "ops", "graph has no ops or no output; lower a model with at least one layer"))
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
