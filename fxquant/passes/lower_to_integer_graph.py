"""Lower a deployed quantized ``GraphModule`` to an :class:`~fxquant.integer_graph.IntegerGraph`.

Must run after :class:`InsertQuantizers`, training, :class:`FoldBatchNorm` (eval mode) and with
every quantizer at a fixed format (no 32-bit "off" layer, no dynamic FL). The result holds
integer weights ``quantize_int(W, fmt_w)`` and int32 biases on ``FL_w + FL_in``.

Requantization is placed on the op that produced a value: ``conv → relu → maxpool → q`` becomes
``conv(out_fmt=q) → relu → maxpool`` (exact: ``q`` commutes with ReLU and max pooling), and a
ReLU directly after a compute op is fused into it (``attrs["relu"]``). A quantizer on a value that
is already on a grid becomes an explicit ``requantize`` op (the fx graph rounds twice there too).
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fxquant.errors import ExportError, ModelFileError, UnsupportedOpError
from fxquant.fixed_point import FixedPoint, quantize_bias, quantize_int
from fxquant.integer_graph import IntegerGraph, Op, Value
from fxquant.passes.op_kinds import layer_name, node_kind
from fxquant.quantizers import BiasQuantizer, FixedPointQuantizer

_aten = torch.ops.aten


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


class _Lowering:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.ops: list[Op] = []
        self.value_of: dict[fx.Node, str] = {}
        self.root_of: dict[str, Op | None] = {}  # value -> requantizing op still waiting for a format
        self.fmt_of: dict[str, FixedPoint] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.inputs: list[Value] = []

    def module(self, node: fx.Node) -> torch.nn.Module:
        return self.gm.get_submodule(str(node.target))

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        meta = node.meta.get("tensor_meta")
        return tuple(int(s) for s in meta.shape[1:]) if meta is not None else ()

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

    def lower(self) -> IntegerGraph:
        for node in self.gm.graph.nodes:
            if node.op in ("get_attr",):
                continue
            if node.op == "output":
                outs = node.args[0]
                flat = outs if isinstance(outs, (tuple, list)) else (outs,)
                outputs = [self.resolved(n, "graph output") for n in flat]
                return self.finish(outputs)
            if node.op == "placeholder":
                self.value_of[node] = node.name
                self.root_of[node.name] = None
                self.shape_of[node.name] = self.shape(node)
                continue
            if node.op == "call_module" and isinstance(self.module(node), BiasQuantizer):
                continue
            if node.op == "call_module" and isinstance(self.module(node), FixedPointQuantizer):
                self.lower_quantizer(node)
                continue
            self.lower_op(node)
        raise ExportError("graph has no output node")

    def lower_quantizer(self, node: fx.Node) -> None:
        q: FixedPointQuantizer = self.module(node)
        fmt = self.quantizer_fmt(q)
        src = node.args[0]
        if q.role == "weight":
            return
        if src.op == "placeholder":
            value = Value(src.name, self.shape(src), fmt)
            self.inputs.append(value)
            self.fmt_of[src.name] = fmt
            self.value_of[node] = src.name
            return
        name = self.value_of[src]
        root = self.root_of.get(name)
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
            if root.output == name and len(src.users) == 1:
                root.attrs["relu"] = True
            else:
                self.emit(node, Op(node.name, "relu", (name,), node.name, out_fmt=None), pending=False)
                self.root_of[node.name] = root

    def resolved(self, node: fx.Node, what: str) -> str:
        """The IR value of ``node``, which must already be on a fixed-point grid."""
        name = self.value_of[node]
        if self.fmt(name) is None:
            raise ExportError(f"{what} {node.name!r} is not quantized",
                              "run InsertQuantizers so every value entering a quantized op has a quantizer")
        return name

    def fmt(self, name: str) -> FixedPoint | None:
        """Format of a value: its producer's ``out_fmt``, through transparent ops to their source."""
        if name in self.fmt_of:
            return self.fmt_of[name]
        producer = next((op for op in reversed(self.ops) if op.output == name), None)
        if producer is None:
            return None
        if producer.out_fmt is not None:
            return producer.out_fmt
        if producer.kind in ("relu", "maxpool2d", "flatten"):
            return self.fmt(producer.inputs[0])
        return None

    def lower_op(self, node: fx.Node) -> None:
        kind = node_kind(self.gm, node)
        target = node.target if node.op != "call_module" else type(self.module(node)).__name__
        if kind is None or kind == "batchnorm":
            hint = ("run FoldBatchNorm first (BN must follow a conv/linear)" if kind == "batchnorm"
                    else "supported: conv2d, linear, matmul, add, cat, avg/max pooling, relu, flatten")
            raise UnsupportedOpError(f"node {node.name!r} (op {target}) has no integer form", hint)
        if kind == "identity":
            src = node.args[0]
            self.value_of[node] = self.value_of[src]
            return
        layer = layer_name(self.gm, node, kind)
        if kind in ("conv2d", "linear"):
            self.lower_weighted(node, kind, layer)
        elif kind == "matmul" and self.is_weight(node.args[1]):
            self.lower_weighted(node, "matmul", layer)
        elif kind in ("add", "matmul"):
            ins = tuple(self.resolved(a, f"input of {layer}") for a in node.args[:2])
            self.emit(node, Op(layer, kind, ins, node.name, out_fmt=None), pending=True)
        elif kind == "cat":
            ins = tuple(self.resolved(a, f"input of {layer}") for a in node.args[0])
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            self.emit(node, Op(layer, kind, ins, node.name, out_fmt=None, attrs={"dim": int(dim)}), pending=True)
        elif kind == "avgpool2d":
            self.lower_avgpool(node, layer)
        elif kind == "maxpool2d":
            self.lower_maxpool(node)
        elif kind == "relu":
            self.lower_relu(node)
        elif kind == "flatten":
            src = self.value_of[node.args[0]]
            self.emit(node, Op(node.name, "flatten", (src,), node.name, out_fmt=None), pending=False)
            self.root_of[node.name] = self.root_of.get(src)

    def is_weight(self, arg: object) -> bool:
        return (isinstance(arg, fx.Node) and arg.op == "call_module"
                and isinstance(self.module(arg), FixedPointQuantizer) and self.module(arg).role == "weight")

    def lower_weighted(self, node: fx.Node, kind: str, layer: str) -> None:
        """Conv2d / linear, or ``x @ W`` with a parameter ``W`` (a linear op on ``W^T``)."""
        x, wq_node = node.args[0], node.args[1]
        bias_node = node.args[2] if len(node.args) > 2 and kind != "matmul" else None
        if not (isinstance(wq_node, fx.Node) and wq_node.op == "call_module"
                and isinstance(self.module(wq_node), FixedPointQuantizer)):
            raise ExportError(f"layer {layer!r}: weight is not quantized", "run InsertQuantizers")
        wq: FixedPointQuantizer = self.module(wq_node)
        w_fmt = self.quantizer_fmt(wq)
        w_float = self.gm.get_parameter(str(wq_node.args[0].target)).detach().double().numpy()
        if kind == "matmul":
            if w_float.ndim != 2:
                raise UnsupportedOpError(f"node {node.name!r}: matmul with a {w_float.ndim}-d parameter",
                                         "use a 2-d weight (x @ W) or nn.Linear")
            kind, w_float = "linear", w_float.T
        in_name = self.resolved(x, f"input of {layer}")
        in_fmt = self.fmt(in_name)
        bias = None
        if isinstance(bias_node, fx.Node):
            b_src = bias_node.args[0] if bias_node.op == "call_module" else bias_node
            b_float = self.gm.get_parameter(str(b_src.target)).detach().double().numpy()
            bias = quantize_bias(b_float, w_fmt.frac_bits + in_fmt.frac_bits)
        attrs: dict[str, Any] = {}
        if kind == "conv2d":
            stride, padding, dilation, groups = (list(node.args[3:7]) + [1, 0, 1, 1][len(node.args[3:7]):])
            attrs = {"stride": _pair(stride), "padding": _pair(padding), "dilation": _pair(dilation),
                     "groups": int(groups)}
        op = Op(layer, kind, (in_name,), node.name, out_fmt=None, weight=quantize_int(w_float, w_fmt),
                weight_fmt=w_fmt, bias=bias, attrs=attrs)
        self.emit(node, op, pending=True)

    def lower_avgpool(self, node: fx.Node, layer: str) -> None:
        src = node.args[0]
        in_name = self.resolved(src, f"input of {layer}")
        in_shape = self.shape(src)
        if node.target in (torch.nn.functional.adaptive_avg_pool2d, _aten.adaptive_avg_pool2d.default) or \
                (node.op == "call_module" and isinstance(self.module(node), torch.nn.AdaptiveAvgPool2d)):
            out_hw = _pair(node.args[1] if node.op != "call_module" else self.module(node).output_size)
            if in_shape[1] % out_hw[0] or in_shape[2] % out_hw[1]:
                raise UnsupportedOpError(f"node {node.name!r}: adaptive pooling {in_shape[1:]}→{out_hw} "
                                         "has unequal windows", "use sizes that divide evenly")
            kernel = (in_shape[1] // out_hw[0], in_shape[2] // out_hw[1])
            attrs = {"kernel": kernel, "stride": kernel, "padding": (0, 0)}
        else:
            m = self.module(node) if node.op == "call_module" else None
            k = m.kernel_size if m else node.args[1]
            s = (m.stride if m else (node.args[2] if len(node.args) > 2 else k)) or k
            p = m.padding if m else (node.args[3] if len(node.args) > 3 else 0)
            attrs = {"kernel": _pair(k), "stride": _pair(s), "padding": _pair(p)}
        kh, kw = attrs["kernel"]
        if 2 ** int(math.log2(kh * kw)) != kh * kw or attrs["padding"] != (0, 0):
            raise UnsupportedOpError(f"node {node.name!r}: average pooling over {kh}x{kw} (padding "
                                     f"{attrs['padding']}) is not integer-exact",
                                     "use a power-of-two window without padding")
        self.emit(node, Op(layer, "avgpool2d", (in_name,), node.name, out_fmt=None, attrs=attrs), pending=True)

    def lower_maxpool(self, node: fx.Node) -> None:
        src = self.value_of[node.args[0]]
        if node.op == "call_module":
            m = self.module(node)
            k, s, p, d, ceil = m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode
        else:
            a = list(node.args) + [None] * 6
            k, s, p, d, ceil = a[1], a[2] or a[1], a[3] or 0, a[4] or 1, bool(a[5])
        if _pair(d) != (1, 1) or ceil:
            raise UnsupportedOpError(f"node {node.name!r}: max pooling with dilation/ceil_mode",
                                     "use dilation=1, ceil_mode=False")
        attrs = {"kernel": _pair(k), "stride": _pair(s or k), "padding": _pair(p)}
        self.emit(node, Op(node.name, "maxpool2d", (src,), node.name, out_fmt=None, attrs=attrs), pending=False)
        self.root_of[node.name] = self.root_of.get(src)

    def lower_relu(self, node: fx.Node) -> None:
        src_node = node.args[0]
        src = self.value_of[src_node]
        root = self.root_of.get(src)
        if root is not None and root.output == src and len(src_node.users) == 1 and root.kind != "cat":
            root.attrs["relu"] = True
            self.value_of[node] = src
            return
        self.emit(node, Op(node.name, "relu", (src,), node.name, out_fmt=None), pending=False)
        self.root_of[node.name] = root

    def finish(self, outputs: list[str]) -> IntegerGraph:
        for op in self.ops:
            if op.out_fmt is None and op.kind in ("relu", "maxpool2d", "flatten"):
                op.out_fmt = self.fmt(op.inputs[0])
            if op.out_fmt is None:
                raise ExportError(f"layer {op.name!r} ({op.kind}) output is never quantized",
                                  "its consumer must be a quantized op or the graph output")
            self.fmt_of[op.output] = op.out_fmt
        values = {v.name: v for v in self.inputs}
        values.update({op.output: Value(op.output, self.shape_of[op.output], op.out_fmt) for op in self.ops})
        layers = {}
        for q in self.gm.modules():
            if isinstance(q, FixedPointQuantizer):
                layers.setdefault(q.layer, {})[q.role] = q.fmt.to_dict()
        return IntegerGraph(inputs=self.inputs, ops=self.ops, outputs=outputs, values=values, layers=layers)


def lower_to_integer_graph(gm: fx.GraphModule, *example_inputs: torch.Tensor) -> IntegerGraph:
    """Lower ``gm`` (deployed, eval mode) using ``example_inputs`` for shape propagation."""
    gm.eval()
    try:  # ShapeProp prints the traceback of a failing node itself: keep it off the user's screen
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here means the inputs do not fit the model
        shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                           for x in example_inputs)
        cause = exc.__cause__ or exc
        raise ModelFileError(f"example inputs {shapes} do not fit the model: {str(cause).splitlines()[0][:200]}",
                             "make example_inputs() return tensors of the model's input shape (batch 1)") from exc
    return _Lowering(gm).lower()


__all__ = ["lower_to_integer_graph"]
