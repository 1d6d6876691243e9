"""Lower a deployed quantized ``GraphModule`` to an :class:`~fxquant.integer_graph.IntegerGraph`.

Must run after :class:`InsertQuantizers`, training, :class:`FoldBatchNorm` (eval mode) and with
every quantizer at a fixed format (no 32-bit "off" layer, no dynamic FL). The result holds
integer weights ``quantize_int(W, fmt_w)`` and int32 biases on ``FL_w + FL_in``.

Every call is read in keyword form (:func:`~fxquant.passes.op_kinds.call_arguments`), so
``F.max_pool2d(x, 3, stride=1, padding=1)``, the module and the aten overload lower alike.

Requantization is placed on the op that produced a value: ``conv → relu → maxpool → q`` becomes
``conv(out_fmt=q) → relu → maxpool`` (exact: ``q`` commutes with ReLU, max pooling and reshapes),
and a ReLU directly after a compute op is fused into it (``attrs["relu"]``). The same holds for
the model input: ``x → flatten → q[input]`` becomes the input ``x`` at ``q``'s format, then
``flatten``. A quantizer on a value that is already on a grid becomes an explicit ``requantize``
op (the fx graph rounds twice there too).

**Shapes** come from two shape propagations, at the example batch ``B`` and at ``2B`` (the
second on fake tensors: shapes only; quantizers' recorded ranges are restored afterwards). Shape
arithmetic (``x.size(0)``, ``x.shape[1]``, ``aten.sym_size``, int arithmetic) is evaluated there
and never lowered. A ``view``/``reshape``/``flatten``/``squeeze`` must keep the batch dimension
(output ``(B, *S)`` and ``(2B, *S)`` with the same ``S``): it lowers to ``flatten`` when ``S`` has one
dimension, to nothing when ``S`` is the input's shape, else to ``reshape`` with ``attrs["shape"] = S``.
One batch-touching form is accepted: ``x.view(-1, C)`` of an ``(N, *L, C)`` tensor (Hugging Face's
``Conv1D``) whose rows only meet row-wise ops before a reshape back to ``(N, *L, …)``; that region
is lowered on the unmerged tensor (:meth:`_Lowering.track_rows`).

**Vision ops.** ``clamp`` (ReLU6, Hardtanh, ``torch.clamp``…; bounds rounded onto the output
grid, see :meth:`_Lowering.lower_clamp`); ``lut`` from an
:class:`~fxquant.ops.fake_quant.ElementwiseTable` (the table is built once the output format is
known; a per-channel PReLU is refused); ``mul`` of two activations (broadcast gates
``(C,H,W) x (C,1,1)``); ``mul_pow2`` for a constant power of two (another constant is refused by
name); ``transpose`` (perm over the non-batch dims); ``upsample_nearest`` (integer factors, read
from the shapes); ``conv_transpose2d`` (weight ``(C_in, C_out/g, kh, kw)``); ``conv2d`` with any
``groups`` (depthwise, and the standalone BN's 1x1 affine); max pooling with ``dilation`` and
``ceil_mode``; average pooling with any window, padding (``count_include_pad=True``) and
``ceil_mode``, adaptive to any size whose windows are uniform (each divisor a rounded reciprocal
multiply, :func:`~fxquant.ops.fake_quant.avgpool_window`). Pooled sizes are checked against
torch's. Which targets build each op is legality's business (``fxquant/legality.py``), not the
lowering's: nothing here refuses a window for not being a power of two.

**Transformer ops** (``docs/passes.md``): ``F.embedding(ids, q_w(W))`` → ``embedding`` (the ids,
a model input, become ``<BW, 0>`` with ``V - 1 <= 2^(BW-1) - 1``); :class:`FixedPointLayerNorm` →
``layernorm`` (gamma at its quantizer's format, or 1 at ``<2,0>``; beta int32 on ``FL_w + 16``; ``eps``
by :func:`~fxquant.fixed_point.layernorm_eps`); :class:`FixedPointSoftmax` → ``softmax``, its keep
terms read as a model input mask (``<2, 0>``, reshaped to the scores' rank; nodes that only feed
masks are never lowered themselves) and a constant lower-triangular keep as ``causal``;
``x[:, 0]``, ``x[..., a:b]``, ``select``, ``narrow``, ``split``/``chunk`` pieces (and export's
``aten.slice``/``aten.select``) → one ``slice`` per sliced axis.

``torch.add(a, b, alpha=2^e)`` is exact in fixed point: ``b``'s integers at ``FL_b - e`` are
``2^e b``, so the lowering emits ``mul_pow2`` (integers unchanged, FL relabelled) before the add;
any other ``alpha`` is refused.

Every op that has no integer form is collected and reported in one
:class:`~fxquant.errors.UnsupportedOpError`, each by its module path, qualified op name and the
user's source line.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

import numpy as np

from fxquant.elementwise import lut_attrs
from fxquant.errors import ExportError, ModelFileError, UnsupportedOpError
from fxquant.fixed_point import (FRAC_BITS_LIMIT, LAYERNORM_FRAC_BITS, MAX_LUT_BITS, FixedPoint, layernorm_eps,
                                 quantize_bias, quantize_int, requantize)
from fxquant.integer_graph import IntegerGraph, Op, Value, pool_output_size
from fxquant.ops.fake_quant import (ElementwiseTable, FixedPointAvgPool2d, FixedPointLayerNorm, FixedPointSoftmax,
                                   avgpool_window, window_factors)
from fxquant.passes.op_kinds import (argument, call_arguments, clamp_bounds, constant_factor, describe,
                                     layer_name, mul_operands, node_kind, power_of_two_exponent, table_kind,
                                     tensor_inputs)
from fxquant.quantizers import BiasQuantizer, FixedPointQuantizer

_aten = torch.ops.aten
_PASS_THROUGH = ("relu", "maxpool2d", "flatten", "reshape", "transpose", "upsample_nearest", "clamp", "slice")
"""Ops that keep their input's format (a clamp after a still-unformatted value: see lower_clamp)."""
COVERAGE_HINT = "docs/coverage.md lists the ops and forms each target supports"
_RESHAPE_HINT = "keep the batch dimension: x.view(x.size(0), ...), torch.flatten(x, 1)"
MASK_BITS = 2
"""Attention masks are graph inputs at ``<2, 0>`` (0/1 or bool; nonzero = keep)."""
_EQ = frozenset({operator.eq, torch.eq, _aten.eq.Scalar})
_NOT = frozenset({operator.invert, torch.logical_not, torch.bitwise_not, _aten.logical_not.default,
                  _aten.bitwise_not.default})
_MASK_VIEWS = frozenset({"view", "reshape", "unsqueeze", "float", "bool", "long", "int", "to", "type_as", "double",
                         "half", "type"})
"""Methods a mask may go through between its input and the softmax (shape and dtype only)."""


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if v else (0, 0)
    return (int(v), int(v))


def _is_shape_like(v: Any) -> bool:
    """Ints, sizes and tuples of them (shape arithmetic), as opposed to tensors."""
    if isinstance(v, (bool, int, float, torch.SymInt, type(None), str)):
        return True
    if isinstance(v, _TensorShape):
        return False
    if isinstance(v, (list, tuple)):  # torch.Size is a tuple
        return all(_is_shape_like(x) for x in v)
    return False


def _nodes(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out


class _NotConstant(Exception):
    """An expression that reads a model input (not evaluable at lowering time)."""


_NE = frozenset({operator.ne, torch.ne, _aten.ne.Scalar})
_MASK_FUNCTIONS = frozenset({torch.unsqueeze, torch.reshape, _aten.unsqueeze.default, _aten.view.default,
                             _aten.reshape.default, _aten._to_copy.default, _aten.to.dtype, _aten.alias.default,
                             _aten.clone.default, _aten._unsafe_view.default})


def _is_full_slice(lowering: Any, node: fx.Node) -> bool:
    """``aten.slice.Tensor(x, dim, 0, big)`` taking a whole axis (export's form of ``mask[:, None]``)."""
    if not (node.op == "call_function" and node.target is _aten.slice.Tensor):
        return False
    a = call_arguments(lowering.gm, node) or {}
    return lowering.full_shape(node) == lowering.full_shape(node.args[0]) and a.get("step", 1) == 1


def _is_nonzero_test(node: fx.Node) -> bool:
    """``x != 0`` (keeps exactly the nonzero entries of ``x``: ``pad id 0 -> masked``)."""
    return (node.op == "call_function" and node.target in _NE or node.op == "call_method" and node.target == "ne") \
        and len(node.args) == 2 and node.args[1] == 0 and not isinstance(node.args[1], bool)


def _first_tensor(node: fx.Node, a: dict[str, Any]) -> fx.Node:
    """The tensor a split / select / narrow / aten.slice reads (its first argument)."""
    if node.args and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return next(a[k] for k in ("input", "self", "tensor") if isinstance(a.get(k), fx.Node))


def _none_index(index: Any) -> bool:
    """``[:, None, None, :]``-style indices: full slices, ``None`` and ``...`` only (adding axes)."""
    entries = index if isinstance(index, tuple) else (index,)
    return all(e is None or e is Ellipsis or e == slice(None) for e in entries)


class _TensorShape(tuple):
    """The shape of a tensor result (as opposed to a size computed by shape arithmetic)."""


class _Recorder(ShapeProp):
    """ShapeProp that also keeps every non-tensor result (shape arithmetic) and every shape."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.results: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.results[n] = _TensorShape(result.shape) if isinstance(result, torch.Tensor) else result
        return result


class _Shapes(fx.Interpreter):
    """Shapes of every tensor at another batch size."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.shapes[n] = tuple(result.shape)
        return result


@dataclass
class _InputRoot:
    """A model input whose format is set by the first quantizer it reaches (through transparent ops)."""

    output: str
    out_fmt: FixedPoint | None = None
    kind: str = "input"
    attrs: dict[str, Any] = field(default_factory=dict)


class _Lowering:
    def __init__(self, gm: fx.GraphModule, results: dict[fx.Node, Any],
                 shapes2: dict[fx.Node, tuple[int, ...]] | None, failure2: str | None) -> None:
        self.gm = gm
        self.results = results
        self.shapes2 = shapes2
        self.failure2 = failure2
        self.ops: list[Op] = []
        self.value_of: dict[fx.Node, str] = {}
        self.root_of: dict[str, Op | _InputRoot | None] = {}  # value -> op still waiting for a format
        self.input_roots: dict[str, _InputRoot] = {}
        self.fmt_of: dict[str, FixedPoint] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.constants: set[fx.Node] = set()
        self.f64: dict[str, Any] = {}  # parameters and buffers as constant() reads them (float64)
        self.problems: list[tuple[str, str | None]] = []
        self.rows: dict[fx.Node, tuple[int, ...]] = {}  # row-merged values: their leading dims L
        self.poisoned: set[fx.Node] = set()
        self.splits: dict[fx.Node, tuple[str, int, list[int]]] = {}  # split node -> (src, dim, piece starts)
        self.mask_only = self.mask_subgraph()

    def mask_subgraph(self) -> set[fx.Node]:
        """Nodes read only by softmax keep terms (mask arithmetic): lowered with the softmax's mask."""
        out: set[fx.Node] = set()
        for node in reversed(list(self.gm.graph.nodes)):
            if node.op in ("placeholder", "get_attr", "output") or not node.users:
                continue
            def only_mask(user: fx.Node) -> bool:
                if user in out:
                    return True
                return (user.op == "call_module" and isinstance(self.module(user), FixedPointSoftmax)
                        and node not in user.args[:5])
            if all(only_mask(u) for u in node.users):
                out.add(node)
        return out
    # ---------------------------------------------------------------- helpers
    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.gm.get_submodule(str(node.target))

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        """Shape without the batch dimension (a row-merged value keeps its leading dims ``L``)."""
        meta = node.meta.get("tensor_meta")
        shape = tuple(int(s) for s in meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else ()
        return self.rows[node] + shape if node in self.rows else shape

    def full_shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(int(s) for s in self.results[node])

    def value(self, arg: Any) -> Any:
        """A call argument with shape-arithmetic nodes replaced by their propagated values."""
        return fx.node.map_arg(arg, lambda n: self.results[n])

    def constant(self, node: Any) -> Any:
        """The value of a constant expression: parameters, buffers, shape arithmetic (``x.shape[0]`` of
        ``token.expand(N, -1, -1)``), tensors made from sizes (``arange(S)``) and ops on them only
        (``aten.t(W)``, ``embedding(arange(S), q_w(W))``; a quantizer quantizes); ``_NotConstant`` if it reads
        a model input."""
        if not isinstance(node, fx.Node):
            return fx.node.map_arg(node, self.constant) if isinstance(node, (list, tuple, dict)) else node
        if node.op == "get_attr":  # float64, as the reference check runs the model (model.double()):
            key = str(node.target)  # W * s rounds alike on both sides; one copy per parameter
            if key not in self.f64:
                value = operator.attrgetter(key)(self.gm)
                self.f64[key] = (value.detach().double() if isinstance(value, torch.Tensor)
                                 and value.is_floating_point() else value)
            return self.f64[key]
        if node in self.results and _is_shape_like(self.results[node]):
            return self.results[node]
        if node.op == "call_module" and isinstance(self.module(node), FixedPointQuantizer):
            return self.quantized(self.module(node), self.constant(node.args[0]))
        if node.op not in ("call_function", "call_method"):
            raise _NotConstant(node.name)
        args = [self.constant(a) for a in node.args]
        kwargs = {k: self.constant(v) for k, v in node.kwargs.items()}
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    def quantized(self, q: FixedPointQuantizer, value: Any) -> Any:
        """``q(value)`` as the deployed model computes it (round half even, saturate, ReLU), without
        running the module (which would record a range)."""
        fmt = q.fmt
        if fmt.is_off or not isinstance(value, torch.Tensor):
            return value
        k = quantize_int(value.detach().double().numpy(), fmt)
        return torch.from_numpy(np.ldexp(np.maximum(k, 0) if q.relu else k, -fmt.frac_bits).astype(np.float64))

    def ir(self, node: fx.Node) -> str:
        """The IR value lowered for ``node``; a parameter or constant used as an activation is refused."""
        if node not in self.value_of:
            raise self.refuse(node, "a constant tensor used as an activation",
                              "make it a parameter of a conv/linear, or compute it outside the model")
        return self.value_of[node]

    def quantizer_fmt(self, q: FixedPointQuantizer) -> FixedPoint:
        fmt = q.fmt
        if fmt.is_off:
            raise ExportError(f"layer {q.layer!r}: {q.role} quantizer is off (32-bit float)",
                              "give every layer a fixed-point format in the precision map")
        return fmt

    def emit(self, node: fx.Node, op: Op, pending: bool) -> None:
        self.ops.append(op)
        self.value_of[node] = op.output
        self.shape_of[op.output] = self.shape(node)
        self.root_of[op.output] = op if pending else None

    def refuse(self, node: fx.Node, reason: str, hint: str | None = None) -> UnsupportedOpError:
        return UnsupportedOpError(f"{describe(self.gm, node)}: {reason}", hint)

    # ---------------------------------------------------------------- driver
    def lower(self) -> IntegerGraph:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                return self.finish(node)
            if node.op == "get_attr":
                self.constants.add(node)
                continue
            if node.op == "placeholder":
                self.value_of[node] = node.name
                self.input_roots[node.name] = self.root_of[node.name] = _InputRoot(node.name)
                self.shape_of[node.name] = self.shape(node)
                continue
            if node.op == "call_module" and isinstance(self.module(node), BiasQuantizer):
                self.constants.add(node)  # read by lower_weighted from the parameter
                continue
            if node in self.mask_only:
                continue  # read by lower_softmax
            inputs = _nodes((node.args, node.kwargs))
            is_quantizer = node.op == "call_module" and isinstance(self.module(node), FixedPointQuantizer)
            act_quantizer = is_quantizer and self.module(node).role != "weight"
            tensors = [n for n in inputs if not (n in self.results and _is_shape_like(self.results[n]))]
            made = (not tensors and node.op in ("call_function", "call_method")
                    and isinstance(self.results.get(node), _TensorShape))  # arange(S), ones(S, S)
            if (made or tensors and all(n in self.constants for n in tensors)) and not act_quantizer:
                self.constants.add(node)  # parameter arithmetic (a weight's transpose, a token's expand)
                continue
            if node in self.results and _is_shape_like(self.results[node]):
                continue  # shape arithmetic: evaluated by shape propagation, never an op
            if any(n in self.poisoned for n in inputs):
                self.poisoned.add(node)
                kind = node_kind(self.gm, node)
                if not is_quantizer and (kind is None or kind == "batchnorm"):
                    self.record(self.no_integer_form(node, kind))
                continue
            try:
                self.track_rows(node, inputs, is_quantizer)
                if is_quantizer:
                    self.lower_quantizer(node)
                else:
                    self.lower_op(node)
            except UnsupportedOpError as exc:
                self.record(exc)
                self.poisoned.add(node)
        raise ExportError("graph has no output node")

    def track_rows(self, node: fx.Node, inputs: list[fx.Node], is_quantizer: bool) -> None:
        """Row-merged values (``x.view(-1, C)`` of an ``(N, *L, C)`` tensor, as in Hugging Face's
        ``Conv1D``) may only flow through row-wise ops (quantizers, linear, relu, add, dropout)
        into a reshape back to ``(N, *L, …)``; they then lower on the unmerged tensor."""
        merged = [self.rows[n] for n in inputs if n in self.rows]
        if not merged:
            return
        kind = node_kind(self.gm, node)
        if kind in ("flatten", "reshape"):
            return  # lower_reshape decides
        if (is_quantizer or kind in ("linear", "relu", "add", "identity")) and len(set(merged)) == 1 and \
                len(merged) == len([n for n in inputs if n not in self.constants]):
            self.rows[node] = merged[0]
            return
        raise self.refuse(node, f"reads a reshape that merged the batch into rows ({describe(self.gm, inputs[0])})",
                          _RESHAPE_HINT)

    def record(self, exc: UnsupportedOpError) -> None:
        self.problems.append((exc.message, exc.hint))

    def raise_problems(self) -> None:
        if not self.problems:
            return
        messages = [m for m, _ in self.problems]
        hints = list(dict.fromkeys(h for _, h in self.problems if h))
        raise UnsupportedOpError(f"{len(messages)} op(s) have no integer form: " + "; ".join(messages),
                                 "; ".join(hints + [COVERAGE_HINT]))

    def no_integer_form(self, node: fx.Node, kind: str | None) -> UnsupportedOpError:
        if kind == "batchnorm":
            return self.refuse(node, "BatchNorm is not folded", "run FoldBatchNorm first (BN must follow a conv/linear)")
        if node.op in ("call_function", "call_method") and table_kind(node) in ("conv2d", "linear"):
            return self.refuse(node, "its weight is computed, not a parameter (or addmm has alpha/beta)",
                               "use an nn.Parameter as the weight")
        if node.op in ("call_function", "call_method"):
            factor = constant_factor(self.gm, node)
            if factor is not None:
                return self.refuse(node, f"multiply by the constant {factor[1]!r} (only powers of two are exact "
                                         "in fixed point)", "fold the constant into the producing layer's weights")
        return self.refuse(node, "no integer form")

    # ---------------------------------------------------------------- quantizers
    def lower_quantizer(self, node: fx.Node) -> None:
        q: FixedPointQuantizer = self.module(node)
        fmt = self.quantizer_fmt(q)
        if q.role == "weight":
            return
        src = node.args[0]
        if src in self.constants:
            self.lower_constant(node, q, fmt)
            return
        name = self.ir(src)
        root = self.root_of.get(name)
        producer = next((op for op in reversed(self.ops) if op.output == name), None)
        if root is None and producer is not None and producer.kind == "constant" and len(src.users) == 1:
            producer.weight = requantize(producer.weight, producer.out_fmt.frac_bits, fmt)  # folded: exact
            producer.weight = np.maximum(producer.weight, 0) if q.relu else producer.weight
            producer.out_fmt = producer.weight_fmt = fmt
            self.value_of[node] = name
            return
        if root is None:  # already on a grid: an explicit change of format
            op = Op(q.layer, "requantize", (name,), node.name, out_fmt=fmt, attrs={"relu": q.relu})
            self.emit(node, op, pending=False)
            return
        if root.out_fmt is None:
            root.out_fmt = fmt
        elif root.out_fmt != fmt:
            raise ExportError(f"value {name!r} reaches quantizers of two formats ({root.out_fmt} and {fmt} "
                              f"for layer {q.layer!r})", "share one quantizer for the value")
        self.value_of[node] = name
        if q.relu:  # a ReLU fused into the quantizer: onto the op itself when nothing else reads it
            if isinstance(root, Op) and root.output == name and len(src.users) == 1:
                root.attrs["relu"] = True
            else:
                self.emit(node, Op(node.name, "relu", (name,), node.name, out_fmt=None), pending=False)
                self.root_of[node.name] = root

    def lower_constant(self, node: fx.Node, q: FixedPointQuantizer, fmt: FixedPoint) -> None:
        """An activation quantizer on a constant (a parameter, ``token.expand(N, -1, -1)``,
        ``pos_embedding``): a ``constant`` op holding its integers at ``fmt``, broadcast over the batch."""
        value = self.unbatched(node, self.constant(node.args[0]))
        ints = quantize_int(value, fmt)
        self.emit_constant(node, q.layer, np.maximum(ints, 0) if q.relu else ints, fmt)

    def unbatched(self, node: fx.Node, value: Any) -> np.ndarray:
        """The per-sample array ``S`` of constant ``value`` computed at ``node`` (float64).

        A batch-sized constant (an ``expand`` to ``N``) drops its batch axis (its rows must agree); any
        other is right-aligned to its readers' rank and must lead with 1 (``(1, S, D)``, or ``(S, D)``
        added to ``(N, S, D)``); read only by element-wise ops, it is broadcast to their shape (the
        targets' add and mul then see equal shapes)."""
        value = torch.as_tensor(value).detach().double()
        full = self.full_shape(node)
        users = [u for u in node.users if u in self.results and isinstance(self.results[u], _TensorShape)]
        rank = max([len(full)] + [len(self.results[u]) for u in users])
        value = value.reshape((1,) * (rank - value.dim()) + tuple(value.shape))
        second = self.shapes2.get(node) if self.shapes2 is not None else None
        if second is not None and full and second[0] == 2 * full[0] and value.shape[0] == full[0]:
            if not bool((value == value[:1]).all()):
                raise self.refuse(node, "a batch-sized constant whose rows differ")
            value = value[:1]
        elif value.shape[0] != 1:
            raise self.refuse(node, f"a constant tensor of shape {list(value.shape)} used as an activation "
                                    "(its leading axis is neither 1 nor the batch)",
                              "give it a leading axis of 1 (broadcast over the batch)")
        kinds = {node_kind(self.gm, u) for u in node.users}
        if users and kinds <= {"add", "mul"}:
            shapes = {tuple(self.results[u][1:]) for u in users}
            if len(shapes) == 1:
                value = torch.broadcast_to(value, (1, *shapes.pop()))
        return value[0].numpy()

    def emit_constant(self, node: fx.Node, layer: str, ints: np.ndarray, fmt: FixedPoint) -> None:
        """A ``constant`` op of integers ``ints`` at ``fmt``, sized by the first model input."""
        ref = next(n.name for n in self.gm.graph.nodes if n.op == "placeholder")
        self.emit(node, Op(layer, "constant", (ref,), node.name, out_fmt=fmt, weight=ints, weight_fmt=fmt),
                  pending=False)
        self.shape_of[node.name] = tuple(int(s) for s in ints.shape)

    def resolved(self, node: fx.Node, what: str) -> str:
        """The IR value of ``node``, which must already be on a fixed-point grid."""
        name = self.ir(node)
        if self.fmt(name) is None:
            raise ExportError(f"{what} {node.name!r} is not quantized",
                              "run InsertQuantizers so every value entering a quantized op has a quantizer")
        return name

    def fmt(self, name: str) -> FixedPoint | None:
        """Format of a value: its producer's ``out_fmt``, through transparent ops to their source."""
        if name in self.fmt_of:
            return self.fmt_of[name]
        if name in self.input_roots:
            return self.input_roots[name].out_fmt
        producer = next((op for op in reversed(self.ops) if op.output == name), None)
        if producer is None:
            return None
        if producer.out_fmt is not None:
            return producer.out_fmt
        if producer.kind in _PASS_THROUGH:
            return self.fmt(producer.inputs[0])
        return None

    # ---------------------------------------------------------------- ops
    def lower_op(self, node: fx.Node) -> None:
        kind = node_kind(self.gm, node)
        if kind is None or kind == "batchnorm":
            raise self.no_integer_form(node, kind)
        special = {"clamp": self.lower_clamp, "lut": self.lower_lut, "mul": self.lower_mul,
                   "mul_pow2": self.lower_mul_pow2, "transpose": self.lower_transpose,
                   "upsample_nearest": self.lower_upsample, "softmax": self.lower_softmax,
                   "layernorm": self.lower_layernorm, "embedding": self.lower_embedding,
                   "slice": self.lower_slice, "split": self.lower_split}
        if kind in special:
            special[kind](node, layer_name(self.gm, node, kind))
            return
        a = call_arguments(self.gm, node)
        if a is None:
            raise self.refuse(node, "its arguments do not match the op's signature")
        if kind == "identity":
            if node.op == "call_function" and node.target is torch.nn.functional.dropout and a.get("training"):
                raise self.refuse(node, "dropout with training=True in the deployed model",
                                  "use nn.Dropout or F.dropout(x, p, self.training)")
            self.value_of[node] = self.ir(a["input"])
            return
        layer = layer_name(self.gm, node, kind)
        if kind in ("conv2d", "linear", "conv_transpose2d"):
            self.lower_weighted(node, a, kind, layer)
        elif kind == "matmul" and self.is_weight(a.get("other")):
            self.lower_weighted(node, a, "matmul", layer)
        elif kind == "matmul":
            ins = tuple(self.resolved(x, f"input of {layer}") for x in (a["input"], a["other"]))
            self.emit(node, Op(layer, kind, ins, node.name, out_fmt=None), pending=True)
        elif kind == "add":
            self.lower_add(node, a, layer)
        elif kind == "cat":
            self.lower_cat(node, a, layer)
        elif kind == "avgpool2d":
            self.lower_avgpool(node, a, layer)
        elif kind == "maxpool2d":
            self.lower_maxpool(node, a)
        elif kind == "relu":
            self.lower_relu(node, a["input"])
        elif kind in ("flatten", "reshape"):
            self.lower_reshape(node, a["input"])
        else:  # pragma: no cover - every kind of op_kinds is handled above
            raise self.no_integer_form(node, None)

    def is_weight(self, arg: object) -> bool:
        return (isinstance(arg, fx.Node) and arg.op == "call_module"
                and isinstance(self.module(arg), FixedPointQuantizer) and self.module(arg).role == "weight")

    def lower_weighted(self, node: fx.Node, a: dict[str, Any], kind: str, layer: str) -> None:
        """Conv2d / linear, or ``x @ W`` with a parameter ``W`` (a linear op on ``W^T``)."""
        x = a["input"]
        wq_node = a["other"] if kind == "matmul" else a["weight"]
        bias_node = a.get("bias") if kind != "matmul" else None
        if not self.is_weight(wq_node):
            raise ExportError(f"layer {layer!r}: weight is not quantized", "run InsertQuantizers")
        wq: FixedPointQuantizer = self.module(wq_node)
        w_fmt = self.quantizer_fmt(wq)
        w_float = self.constant(wq_node.args[0]).detach().double().numpy()
        if kind == "matmul":
            if w_float.ndim != 2:
                raise self.refuse(node, f"matmul with a {w_float.ndim}-d parameter",
                                  "use a 2-d weight (x @ W) or nn.Linear")
            kind, w_float = "linear", w_float.T
        in_name = self.resolved(x, f"input of {layer}")
        in_fmt = self.fmt(in_name)
        bias = None
        if isinstance(bias_node, fx.Node):
            b_src = bias_node.args[0] if bias_node.op == "call_module" else bias_node
            b_float = self.constant(b_src).detach().double().numpy()
            bias = quantize_bias(b_float, w_fmt.frac_bits + in_fmt.frac_bits)
        attrs: dict[str, Any] = {}
        if kind == "conv_transpose2d":
            attrs = {"stride": _pair(self.value(a.get("stride", 1))), "padding": _pair(self.value(a.get("padding", 0))),
                     "output_padding": _pair(self.value(a.get("output_padding", 0))),
                     "dilation": _pair(self.value(a.get("dilation", 1))), "groups": int(self.value(a.get("groups", 1)))}
        if kind == "conv2d":
            padding = self.value(a.get("padding", 0))
            if isinstance(padding, str):
                raise self.refuse(node, f"padding {padding!r}", "use integer zero padding")
            attrs = {"stride": _pair(self.value(a.get("stride", 1))), "padding": _pair(padding),
                     "dilation": _pair(self.value(a.get("dilation", 1))), "groups": int(self.value(a.get("groups", 1)))}
        op = Op(layer, kind, (in_name,), node.name, out_fmt=None, weight=quantize_int(w_float, w_fmt),
                weight_fmt=w_fmt, bias=bias, attrs=attrs)
        self.emit(node, op, pending=True)

    def lower_add(self, node: fx.Node, a: dict[str, Any], layer: str) -> None:
        ins = [self.resolved(x, f"input of {layer}") for x in (a["input"], a["other"])]
        alpha = self.value(a.get("alpha", 1))
        if alpha != 1:
            mantissa, exp = math.frexp(float(alpha)) if isinstance(alpha, (int, float)) else (0.0, 0)
            exponent = exp - 1
            b_fmt = self.fmt(ins[1])
            if mantissa != 0.5 or abs(b_fmt.frac_bits - exponent) > FRAC_BITS_LIMIT:
                raise self.refuse(node, f"add with alpha={alpha!r} (only powers of two are exact)",
                                  "scale by a power of two, or fold alpha into the producing layer")
            scaled = f"{node.name}_alpha"
            self.ops.append(Op(f"{layer}.alpha", "mul_pow2", (ins[1],), scaled,
                               out_fmt=FixedPoint(b_fmt.bits, b_fmt.frac_bits - exponent),
                               attrs={"exponent": exponent}))
            self.shape_of[scaled] = self.shape_of[ins[1]]
            self.root_of[scaled] = None
            ins[1] = scaled
        self.emit(node, Op(layer, "add", tuple(ins), node.name, out_fmt=None), pending=True)

    def lower_cat(self, node: fx.Node, a: dict[str, Any], layer: str) -> None:
        ins = tuple(self.resolved(x, f"input of {layer}") for x in a["tensors"])
        rank = len(self.full_shape(node))
        dim = int(self.value(a.get("dim", 0))) % rank
        if dim == 0:
            raise self.refuse(node, "concatenation along the batch dimension")
        self.emit(node, Op(layer, "cat", ins, node.name, out_fmt=None, attrs={"dim": dim}), pending=True)

    def check_pooled_shape(self, node: fx.Node, src: fx.Node, attrs: dict[str, Any], what: str) -> None:
        """The integer op's pooled size (:func:`~fxquant.integer_graph.pool_output_size`) must be torch's."""
        h, w = self.full_shape(src)[2:]
        (kh, kw), (sh, sw), (ph, pw) = attrs["kernel"], attrs["stride"], attrs["padding"]
        dh, dw = attrs.get("dilation", (1, 1))
        ceil = bool(attrs.get("ceil_mode", False))
        expect = (pool_output_size(h, kh, sh, ph, dh, ceil), pool_output_size(w, kw, sw, pw, dw, ceil))
        if tuple(self.full_shape(node)[2:]) != expect:
            raise self.refuse(node, f"{what}: torch pools {h}x{w} to {tuple(self.full_shape(node)[2:])}, "
                                    f"the integer op to {expect}")

    def lower_avgpool(self, node: fx.Node, a: dict[str, Any], layer: str) -> None:
        """Any window, padding (counted) and ceil_mode; adaptive pooling with uniform windows. The
        integer op multiplies each window sum by the rounded reciprocal of its divisor; the graph
        must compute the same (:class:`~fxquant.ops.fake_quant.FixedPointAvgPool2d`, which
        :class:`InsertQuantizers` puts in place of every average pooling), or divide by powers of
        two only (exact)."""
        src = a["input"]
        in_name = self.resolved(src, f"input of {layer}")
        if len(self.full_shape(src)) != 4:
            raise self.refuse(node, f"average pooling of a {len(self.full_shape(src))}-d tensor (NCHW only)")
        h, w = self.full_shape(src)[2:]
        config = {k: self.value(v) for k, v in a.items() if k != "input"}
        attrs = avgpool_window(config, h, w)
        if isinstance(attrs, str):
            raise self.refuse(node, attrs, "use count_include_pad=True, or adaptive sizes that divide the input")
        if not (node.op == "call_module" and isinstance(self.module(node), FixedPointAvgPool2d)) and \
                not window_factors(attrs, h, w)[1]:
            raise self.refuse(node, "average pooling by torch's division in a quantized graph "
                                    "(its divisors are not powers of two)", "run InsertQuantizers on the float graph")
        self.check_pooled_shape(node, src, attrs, "average pooling")
        if not attrs["ceil_mode"]:
            del attrs["ceil_mode"]
        self.emit(node, Op(layer, "avgpool2d", (in_name,), node.name, out_fmt=None, attrs=attrs), pending=True)

    def lower_maxpool(self, node: fx.Node, a: dict[str, Any]) -> None:
        src_node = a["input"]
        src = self.ir(src_node)
        k = _pair(self.value(a["kernel_size"]))
        s = self.value(a.get("stride")) or k
        if self.value(a.get("return_indices", False)):
            raise self.refuse(node, "max pooling with return_indices", "use return_indices=False")
        attrs = {"kernel": k, "stride": _pair(s), "padding": _pair(self.value(a.get("padding", 0)))}
        dilation = _pair(self.value(a.get("dilation", 1)))
        if dilation != (1, 1):
            attrs["dilation"] = dilation
        if self.value(a.get("ceil_mode", False)):
            attrs["ceil_mode"] = True
        self.check_pooled_shape(node, src_node, attrs, "max pooling")
        self.emit(node, Op(node.name, "maxpool2d", (src,), node.name, out_fmt=None, attrs=attrs), pending=False)
        self.root_of[node.name] = self.root_of.get(src)

    def pass_through(self, node: fx.Node, op: Op, src: str) -> None:
        """Emit an op that keeps its input's integers (and format): the quantizer after it
        formats its source (``root_of``)."""
        self.emit(node, op, pending=False)
        self.root_of[node.name] = self.root_of.get(src)

    def lower_clamp(self, node: fx.Node, layer: str) -> None:
        """``clamp(x, lo, hi)``: when ``x``'s producer still waits for a format, the clamp commutes
        with the quantizer after it (``q(clamp(x)) = clamp(q(x), q(lo), q(hi))``, rounding is
        monotone) and keeps its format; after a value already on a grid, it requantizes to the
        next quantizer's format. Bounds are rounded onto the output grid when it is known."""
        src_node = tensor_inputs(node, self.gm)[0]
        lo, hi = clamp_bounds(self.gm, node)
        src = self.ir(src_node)
        root = self.root_of.get(src)
        attrs = {"_bounds": (lo, hi)}
        if root is not None and root.out_fmt is None:
            self.pass_through(node, Op(node.name, "clamp", (src,), node.name, out_fmt=None, attrs=attrs), src)
        else:
            src = self.resolved(src_node, f"input of {layer}")
            self.emit(node, Op(layer, "clamp", (src,), node.name, out_fmt=None, attrs=attrs), pending=True)

    def lower_lut(self, node: fx.Node, layer: str) -> None:
        module = self.module(node)
        if not isinstance(module, ElementwiseTable):
            raise self.refuse(node, "an element-wise function not prepared by InsertQuantizers",
                              "run InsertQuantizers on the float graph")
        in_name = self.resolved(node.args[0], f"input of {layer}")
        in_fmt = self.fmt(in_name)
        if in_fmt.bits > MAX_LUT_BITS:
            raise self.refuse(node, f"a {in_fmt.bits}-bit table input (at most {MAX_LUT_BITS} bits)",
                              "cap the input quantizer's width")
        weight = self.constant(node.args[5]) if len(node.args) > 5 else None
        try:
            function, params = module.table_function(weight)
        except ValueError as exc:
            raise self.refuse(node, str(exc), "use nn.PReLU() (one parameter) or LeakyReLU") from None
        attrs = {"function": function, "params": dict(params)}
        self.emit(node, Op(layer, "lut", (in_name,), node.name, out_fmt=None, attrs=attrs), pending=True)

    def lower_mul(self, node: fx.Node, layer: str) -> None:
        ins = mul_operands(self.gm, node)
        names = tuple(self.resolved(x, f"input of {layer}") for x in ins)
        batch = self.full_shape(node)[0]
        if any(self.full_shape(x)[0] != batch for x in ins):
            raise self.refuse(node, "a product that broadcasts over the batch dimension")
        self.emit(node, Op(layer, "mul", names, node.name, out_fmt=None), pending=True)

    def lower_mul_pow2(self, node: fx.Node, layer: str) -> None:
        x, c = constant_factor(self.gm, node)
        exponent = power_of_two_exponent(c)
        src = self.resolved(x, f"input of {layer}")
        fmt = self.fmt(src)
        if abs(fmt.frac_bits - exponent) > FRAC_BITS_LIMIT:
            raise self.refuse(node, f"multiply by 2^{exponent} leaves the FL range")
        op = Op(layer, "mul_pow2", (src,), node.name, out_fmt=FixedPoint(fmt.bits, fmt.frac_bits - exponent),
                attrs={"exponent": exponent})
        self.emit(node, op, pending=False)

    def lower_transpose(self, node: fx.Node, layer: str) -> None:
        src_node = tensor_inputs(node, self.gm)[0]
        src = self.ir(src_node)
        rank = len(self.full_shape(src_node))
        if str(node.target) in ("permute",) and node.op == "call_method":
            dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
            dims = self.value(node.kwargs.get("dims", dims))
            perm = [int(d) % rank for d in dims]
        elif node.target in (torch.permute, torch.ops.aten.permute.default):
            perm = [int(d) % rank for d in self.value(argument(node, 1, "dims"))]
        else:
            d0 = int(self.value(argument(node, 1, "dim0", argument(node, 1, "axis0")))) % rank
            d1 = int(self.value(argument(node, 2, "dim1", argument(node, 2, "axis1")))) % rank
            perm = list(range(rank))
            perm[d0], perm[d1] = perm[d1], perm[d0]
        if perm[0] != 0:
            raise self.refuse(node, f"a transpose {perm} that moves the batch dimension")
        if perm == list(range(rank)):
            self.value_of[node] = src
            return
        op = Op(node.name, "transpose", (src,), node.name, out_fmt=None, attrs={"perm": tuple(p - 1 for p in perm[1:])})
        self.pass_through(node, op, src)

    def lower_upsample(self, node: fx.Node, layer: str) -> None:
        src_node = tensor_inputs(node, self.gm)[0]
        src = self.ir(src_node)
        ins, out = self.full_shape(src_node), self.full_shape(node)
        if len(ins) != 4 or ins[:2] != out[:2] or out[2] % ins[2] or out[3] % ins[3]:
            raise self.refuse(node, f"nearest upsampling {ins} → {out} by a non-integer factor",
                              "use an integer scale_factor")
        scale = (out[2] // ins[2], out[3] // ins[3])
        self.pass_through(node, Op(node.name, "upsample_nearest", (src,), node.name, out_fmt=None,
                                   attrs={"scale": scale}), src)

    def lower_relu(self, node: fx.Node, src_node: fx.Node) -> None:
        src = self.ir(src_node)
        root = self.root_of.get(src)
        if isinstance(root, Op) and root.output == src and len(src_node.users) == 1 and root.kind != "cat":
            root.attrs["relu"] = True
            self.value_of[node] = src
            return
        self.emit(node, Op(node.name, "relu", (src,), node.name, out_fmt=None), pending=False)
        self.root_of[node.name] = root

    def lower_reshape(self, node: fx.Node, src_node: fx.Node) -> None:
        """flatten / view / reshape / squeeze that keep the batch dimension (module docstring)."""
        src = self.ir(src_node)
        in1, out1 = self.full_shape(src_node), self.full_shape(node)
        if self.shapes2 is None or node not in self.shapes2:
            raise self.refuse(node, f"the model does not run at another batch size ({self.failure2}), so "
                                    f"reshape {in1} → {out1} may fix the batch", _RESHAPE_HINT)
        in2, out2 = self.shapes2[src_node], self.shapes2[node]
        if src_node in self.rows:  # back from rows: (N*prod(L), X) -> (N, *L, X)
            lead = self.rows[src_node]
            if out1 == (in1[0] // math.prod(lead), *lead, *in1[1:]) and out2 == (in2[0] // math.prod(lead), *lead, *in2[1:]):
                self.value_of[node] = src
                return
            raise self.refuse(node, f"reshape {in1} → {out1} does not restore the rows' leading dims {lead}",
                              _RESHAPE_HINT)
        lead = tuple(in1[1:-1])
        if lead and len(out1) == 2 and out1 == (math.prod(in1[:-1]), in1[-1]) and \
                out2 == (math.prod(in2[:-1]), in2[-1]) and tuple(in2[1:-1]) == lead:
            self.rows[node] = lead  # (N, *L, C) -> (N*prod(L), C): rows, lowered unmerged
            self.value_of[node] = src
            return
        if not (len(out1) >= 1 and out1[0] == in1[0] and out2[0] == in2[0] and out1[1:] == out2[1:]):
            raise self.refuse(node, f"reshape {in1} → {out1} touches the batch dimension", _RESHAPE_HINT)
        shape = tuple(out1[1:])
        if shape == tuple(in1[1:]):
            self.value_of[node] = src
            return
        if len(shape) == 1:
            op = Op(node.name, "flatten", (src,), node.name, out_fmt=None)
        else:
            op = Op(node.name, "reshape", (src,), node.name, out_fmt=None, attrs={"shape": shape})
        self.emit(node, op, pending=False)
        self.root_of[node.name] = self.root_of.get(src)


    # ---------------------------------------------------------------- transformer ops
    def append(self, op: Op, shape: tuple[int, ...], src: str) -> None:
        """Emit a pass-through op whose output has no fx node of its own (a step of ``x[:, 0, 1:]``)."""
        self.ops.append(op)
        self.shape_of[op.output] = tuple(shape)
        self.root_of[op.output] = self.root_of.get(src)

    def lower_embedding(self, node: fx.Node, layer: str) -> None:
        """``F.embedding(ids, q_w(W))``: the ids input becomes ``<BW, 0>`` with ``V - 1 <= 2^(BW-1) - 1``."""
        a = call_arguments(self.gm, node) or {}
        ids, wq_node = a.get("input"), a.get("weight")
        if not self.is_weight(wq_node):
            raise self.refuse(node, "an embedding whose table is not a quantized parameter",
                              "use nn.Embedding (InsertQuantizers quantizes its table)")
        if self.value(a.get("max_norm")) is not None:
            raise self.refuse(node, "embedding with max_norm", "use max_norm=None")
        w_fmt = self.quantizer_fmt(self.module(wq_node))
        table = self.constant(wq_node.args[0]).detach().double().numpy()
        if not (isinstance(ids, fx.Node) and ids.op == "placeholder"):
            what = describe(self.gm, ids) if isinstance(ids, fx.Node) else repr(ids)
            raise self.refuse(node, f"token ids computed from the model's inputs ({what})",
                              "feed the token ids (and position ids) as model inputs")
        bits = max(MASK_BITS, (table.shape[0] - 1).bit_length() + 1)
        self.integer_input(node, ids, bits)
        self.emit(node, Op(layer, "embedding", (ids.name,), node.name, out_fmt=None,
                           weight=quantize_int(table, w_fmt), weight_fmt=w_fmt), pending=True)

    def integer_input(self, node: fx.Node, ph: fx.Node, bits: int) -> None:
        """Make model input ``ph`` an integer input ``<bits, 0>`` (the widest of its readers)."""
        root = self.input_roots[ph.name]
        if root.out_fmt is not None and (root.out_fmt.frac_bits != 0 or root.kind != "integer"):
            raise self.refuse(node, f"input {ph.name!r} is read as integers (token ids / mask) and as a "
                                    f"quantized activation at {root.out_fmt}",
                              "feed ids and masks as their own model inputs")
        root.kind = "integer"
        root.out_fmt = FixedPoint(max(bits, root.out_fmt.bits if root.out_fmt else 0), 0)

    def lower_layernorm(self, node: fx.Node, layer: str) -> None:
        module = self.module(node) if node.op == "call_module" else None
        if not isinstance(module, FixedPointLayerNorm):
            raise self.refuse(node, "a layer norm not prepared by InsertQuantizers (computed gamma/beta or shape)",
                              "use nn.LayerNorm, or F.layer_norm on parameters")
        in_name = self.resolved(node.args[0], f"input of {layer}")
        in_fmt, shape = self.fmt(in_name), self.shape_of[in_name]
        if len(module.normalized_shape) != 1 or not shape or module.normalized_shape[0] != shape[-1]:
            raise self.refuse(node, f"layer norm over {list(module.normalized_shape)} of a {list(shape)} value "
                                    "(the integer op normalizes the last axis only)", "normalize the last axis")
        n = shape[-1]
        wq_node, bias_node = (node.args[7], node.args[8]) if len(node.args) > 8 else (None, None)
        if wq_node is None:
            gamma, w_fmt = np.ones(n, dtype=np.int64), FixedPoint(2, 0)
        else:
            w_fmt = self.quantizer_fmt(self.module(wq_node))
            gamma = quantize_int(self.constant(wq_node.args[0]).detach().double().numpy(), w_fmt)
        bias = None
        if isinstance(bias_node, fx.Node):
            bias = quantize_bias(self.constant(bias_node).detach().double().numpy(),
                                 w_fmt.frac_bits + LAYERNORM_FRAC_BITS)
        attrs = {"dim": len(shape), "eps": layernorm_eps(module.eps, n, in_fmt)}
        self.emit(node, Op(layer, "layernorm", (in_name,), node.name, out_fmt=None, weight=gamma, weight_fmt=w_fmt,
                           bias=bias, attrs=attrs), pending=True)

    def lower_softmax(self, node: fx.Node, layer: str) -> None:
        """A :class:`FixedPointSoftmax`: scores, and its keep terms as the op's mask input (a model
        input, reshaped to the scores' rank) and ``causal`` (a constant lower-triangular keep)."""
        module = self.module(node) if node.op == "call_module" else None
        if not isinstance(module, FixedPointSoftmax):
            raise self.refuse(node, "a softmax not prepared by InsertQuantizers (no integer dim)",
                              "use F.softmax(x, dim=-1) / x.softmax(-1)")
        scores = self.resolved(node.args[0], f"input of {layer}")
        full = self.full_shape(node.args[0])
        rank = len(full)
        if rank < 2 or module.dim % rank != rank - 1:
            raise self.refuse(node, f"softmax over dim {module.dim} of a rank-{rank} tensor (the integer op "
                                    "normalizes the last axis)", "use dim=-1 (transpose first)")
        mask, consts = None, []
        for term in node.args[5:]:
            kind, value = self.keep_term(node, term)
            if kind == "const":
                consts.append(value)
            elif mask is not None and mask[0] is not value[0]:
                raise self.refuse(node, "two different mask inputs", "combine the masks into one model input")
            else:
                mask = value
        attrs: dict[str, Any] = {"dim": rank - 1, "causal": False, "exp_bits": module.exp_bits}
        if consts:
            keep = np.ones(full, dtype=bool)
            for c in consts:
                keep = keep & np.broadcast_to(c, full)
            tril = np.broadcast_to(np.tril(np.ones(full[-2:], dtype=bool)), full)
            if np.array_equal(keep, tril):
                attrs["causal"] = True
            elif not keep.all():
                raise self.refuse(node, "a constant mask that is not causal (keep key j <= query i)",
                                  "use a lower-triangular (torch.tril) mask, or feed the mask as a model input")
        inputs = (scores,)
        if mask is not None:
            ph, shape = mask
            self.integer_input(node, ph, MASK_BITS)
            shape = (1,) * (rank - len(shape)) + tuple(shape)
            batch2 = self.shapes2 is None or self.shapes2.get(ph, (0,))[0] == self.shapes2.get(node.args[0], (0,))[0]
            if shape[0] != full[0] or not batch2 or any(m not in (1, s) for m, s in zip(shape[1:], full[1:])):
                raise self.refuse(node, f"mask of shape {list(shape)} does not broadcast to the scores {list(full)} "
                                        "per sample", "give the mask a batch dimension")
            name = ph.name
            if tuple(shape[1:]) != self.shape_of[ph.name]:
                name = f"{node.name}_mask"
                self.append(Op(name, "reshape", (ph.name,), name, out_fmt=None, attrs={"shape": tuple(shape[1:])}),
                            shape[1:], ph.name)
            inputs = (scores, name)
        self.emit(node, Op(layer, "softmax", inputs, node.name, out_fmt=None, attrs=attrs), pending=True)

    def keep_term(self, softmax: fx.Node, term: fx.Node) -> tuple[str, Any]:
        """``("const", bool array)`` or ``("mask", (placeholder, shape with batch))`` of a keep term
        (``logical_not(mask == 0)``, ``logical_not(~mask)``, ``mask``; through views and casts)."""
        try:
            return "const", torch.as_tensor(self.constant(term)).detach().cpu().numpy() != 0
        except _NotConstant:
            pass
        m = term
        if m.op == "call_function" and m.target is torch.logical_not:
            inner = m.args[0]
            is_eq = isinstance(inner, fx.Node) and (inner.target in _EQ or inner.op == "call_method" and
                                                    inner.target == "eq")
            if is_eq and len(inner.args) == 2 and inner.args[1] == 0 and isinstance(inner.args[0], fx.Node):
                m = inner.args[0]
            elif isinstance(inner, fx.Node) and (inner.target in _NOT or inner.op == "call_method" and
                                                 inner.target in ("logical_not", "bitwise_not", "__invert__")):
                m = inner.args[0]
            else:
                raise self.refuse(softmax, f"a mask condition {describe(self.gm, inner)} that is not "
                                           "'mask == 0' or '~mask'", "mask with masked_fill(mask == 0, -inf)")
        shape = self.full_shape(m)
        x = m
        while x.op != "placeholder":
            ok = (x.op == "call_method" and x.target in _MASK_VIEWS or _is_nonzero_test(x) or
                  x.op == "call_function" and x.target in _MASK_FUNCTIONS or _is_full_slice(self, x) or
                  x.op == "call_function" and x.target is operator.getitem and _none_index(x.args[1]))
            if not ok or not isinstance(x.args[0], fx.Node):
                raise self.refuse(softmax, f"the mask goes through {describe(self.gm, x)}",
                                  "feed a 0/1 (or bool) mask input; only views and dtype casts may follow it")
            x = x.args[0]
        if [d for d in shape if d != 1] != [d for d in self.full_shape(x) if d != 1]:
            raise self.refuse(softmax, f"the mask {list(self.full_shape(x))} is rearranged to {list(shape)}",
                              "only add axes of size 1 to a mask")
        return "mask", (x, shape)

    def lower_split(self, node: fx.Node, layer: str) -> None:
        """``split``/``chunk``: pieces are read by ``pieces[i]`` (:meth:`lower_slice`)."""
        a = call_arguments(self.gm, node) or {}
        src_node = _first_tensor(node, a)
        rank = len(self.full_shape(src_node))
        dim = int(self.value(a.get("dim", 0))) % rank
        if dim == 0:
            raise self.refuse(node, "split along the batch dimension")
        pieces = self.results[node]
        starts = [0]
        for t in pieces:
            starts.append(starts[-1] + int(t.shape[dim]))
        self.splits[node] = (self.ir(src_node), dim, starts)

    def lower_slice(self, node: fx.Node, layer: str) -> None:
        """``x[:, 0]``, ``x[:, 1:]``, ``x[..., a:b:c]``, ``split``/``chunk`` pieces, ``select``,
        ``narrow``: one ``slice`` op per sliced axis (right to left, so axis numbers stay valid)."""
        steps: list[dict[str, int]] = []
        if node.target is operator.getitem:
            src_node, index = node.args
            if src_node in self.splits:
                src, dim, starts = self.splits[src_node]
                steps.append({"dim": dim, "start": starts[index], "stop": starts[index + 1], "step": 1})
            else:
                src, full = self.ir(src_node), self.full_shape(src_node)
                entries = list(self.value(index) if isinstance(index, tuple) else (self.value(index),))
                if Ellipsis in entries:
                    i = entries.index(Ellipsis)
                    entries[i:i + 1] = [slice(None)] * (len(full) - len(entries) + 1)
                for axis, e in enumerate(entries):
                    size = full[axis]
                    if isinstance(e, int):
                        steps.append({"dim": axis, "index": e % size})
                        continue
                    start, stop, step = e.indices(size)
                    if (start, stop, step) != (0, size, 1):
                        steps.append({"dim": axis, "start": start, "stop": stop, "step": step})
        else:
            a = call_arguments(self.gm, node) or {}
            src_node = _first_tensor(node, a)
            src, full = self.ir(src_node), self.full_shape(src_node)
            dim = int(self.value(a.get("dim", 0))) % len(full)
            size = full[dim]
            if "index" in a:
                steps.append({"dim": dim, "index": int(self.value(a["index"])) % size})
            elif "length" in a:
                start = int(self.value(a["start"])) % size
                steps.append({"dim": dim, "start": start, "stop": start + int(self.value(a["length"])), "step": 1})
            else:
                start, stop, step = slice(self.value(a.get("start")), self.value(a.get("end")),
                                          self.value(a.get("step", 1))).indices(size)
                if (start, stop, step) != (0, size, 1):  # export's x[:, 0] is a full slice, then a select
                    steps.append({"dim": dim, "start": start, "stop": stop, "step": step})
        if src_node not in self.splits:
            src = self.ir(src_node)
        for s in steps:
            if s["dim"] == 0:
                raise self.refuse(node, "slicing the batch dimension", "slice the other axes only (x[:, ...])")
            if "start" in s and (s["step"] < 1 or s["start"] >= s["stop"]):
                raise self.refuse(node, f"an empty or reversed slice {s['start']}:{s['stop']}:{s['step']}")
        if not steps:
            self.value_of[node] = src
            return
        shape = list(self.shape_of[src])
        for i, s in enumerate(sorted(steps, key=lambda s: -s["dim"])):
            if "index" in s:
                del shape[s["dim"] - 1]
            else:
                shape[s["dim"] - 1] = len(range(s["start"], s["stop"], s["step"]))
            last = i == len(steps) - 1
            name = node.name if last else f"{node.name}_{i}"
            self.append(Op(name, "slice", (src,), name, out_fmt=None, attrs=dict(s)), tuple(shape), src)
            src = name
        if tuple(shape) != self.shape(node):
            raise self.refuse(node, f"indexing gives {list(self.shape(node))}, the slices {list(shape)}")
        self.value_of[node] = src

    # ---------------------------------------------------------------- result
    def finish(self, output: fx.Node) -> IntegerGraph:
        self.raise_problems()  # nothing poisoned without a problem: every output is lowered
        outs = output.args[0]
        flat = outs if isinstance(outs, (tuple, list)) else (outs,)
        for n in flat:
            if n in self.rows:
                self.record(self.refuse(n, "a graph output with the batch merged into rows", _RESHAPE_HINT))
        self.raise_problems()
        return self.build([self.resolved(n, "graph output") for n in flat])

    def build(self, outputs: list[str]) -> IntegerGraph:
        for op in self.ops:
            if op.out_fmt is None and op.kind in _PASS_THROUGH:
                op.out_fmt = self.fmt(op.inputs[0])
            if op.out_fmt is None:
                raise ExportError(f"layer {op.name!r} ({op.kind}) output is never quantized",
                                  "its consumer must be a quantized op or the graph output")
            self.fmt_of[op.output] = op.out_fmt
            if op.kind == "clamp" and "_bounds" in op.attrs:  # bounds onto the output grid
                lo, hi = op.attrs.pop("_bounds")
                op.attrs["lo"] = None if lo is None else int(quantize_int(np.array(lo), op.out_fmt))
                op.attrs["hi"] = None if hi is None else int(quantize_int(np.array(hi), op.out_fmt))
            if op.kind == "lut" and "table" not in op.attrs:
                in_fmt = self.fmt(op.inputs[0])
                op.attrs.update(lut_attrs(op.attrs["function"], in_fmt, op.out_fmt, op.attrs["params"]))
        inputs = [Value(name, self.shape_of[name], root.out_fmt)
                  for name, root in self.input_roots.items() if root.out_fmt is not None]
        values = {v.name: v for v in inputs}
        values.update({op.output: Value(op.output, self.shape_of[op.output], op.out_fmt) for op in self.ops})
        layers = {}
        for q in self.gm.modules():
            if isinstance(q, FixedPointQuantizer):
                layers.setdefault(q.layer, {})[q.role] = q.fmt.to_dict()
        return IntegerGraph(inputs=inputs, ops=self.ops, outputs=outputs, values=values, layers=layers)


def _doubled(x: Any) -> Any:
    return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x


def _doubled_batch_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]
                          ) -> tuple[dict[fx.Node, tuple[int, ...]] | None, str | None]:
    """Every tensor's shape at twice the example batch (fake tensors: shapes only, no arithmetic),
    or ``None`` and why the model does not run at that batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    failure = None
    for fake in (True, False):  # fake tensors are fast; the real run is the fallback for exotic ops
        second = _Shapes(gm)
        try:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                if fake:
                    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
                        second.run(*(mode.from_tensor(_doubled(x)) if isinstance(x, torch.Tensor) else x
                                     for x in example_inputs))
                else:
                    second.run(*(_doubled(x) for x in example_inputs))
            return second.shapes, None
        except Exception as exc:  # noqa: BLE001 - recorded: reshapes then cannot be proven batch-safe
            cause = exc.__cause__ or exc
            failure = str(cause).splitlines()[0][:120] if str(cause) else type(cause).__name__
    return None, failure


def lower_to_integer_graph(gm: fx.GraphModule, *example_inputs: torch.Tensor) -> IntegerGraph:
    """Lower ``gm`` (deployed, eval mode) using ``example_inputs`` for shape propagation."""
    gm.eval()
    qs = [m for m in gm.modules() if isinstance(m, FixedPointQuantizer)]
    saved = [q.amax.clone() for q in qs]
    recorder = _Recorder(gm)
    try:
        try:  # ShapeProp prints the traceback of a failing node itself: keep it off the user's screen
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
                recorder.propagate(*example_inputs)
        except Exception as exc:  # noqa: BLE001 - any failure here means the inputs do not fit the model
            shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                               for x in example_inputs)
            cause = exc.__cause__ or exc
            raise ModelFileError(f"example inputs {shapes} do not fit the model: "
                                 f"{str(cause).splitlines()[0][:200]}",
                                 "make example_inputs() return tensors of the model's input shape (batch 1)"
                                 ) from exc
        shapes2, failure2 = _doubled_batch_shapes(gm, example_inputs)
    finally:  # shape propagation is no calibration: the quantizers' recorded ranges stay
        for q, amax in zip(qs, saved):
            q.amax.copy_(amax)
    return _Lowering(gm, recorder.results, shapes2, failure2).lower()


__all__ = ["COVERAGE_HINT", "lower_to_integer_graph"]
