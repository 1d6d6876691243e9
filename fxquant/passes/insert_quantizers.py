"""Insert fixed-point quantizers into a captured graph (after :func:`capture`).

* Every conv/linear form — ``nn.Conv2d``/``nn.Linear``, ``F.conv2d``/``F.linear`` on parameters,
  export's aten calls, ``torch.addmm(b, x, W)`` (Hugging Face ``Conv1D``) — becomes one canonical
  call, ``aten.conv2d.default(x, w, b, stride, padding, dilation, groups)`` /
  ``aten.linear.default(x, w, b)`` with every argument positional, on ``get_attr`` parameters
  (parameters keep their names; ``addmm``'s ``(in, out)`` weight is read through ``aten.t``).
* A **weight quantizer** on every conv/linear weight (and on a parameter operand of a matmul),
  and a :class:`BiasQuantizer` putting the bias on the accumulator grid ``FL_w + FL_in``.
* An **activation quantizer on every value that enters a quantized op** (conv, linear,
  conv_transpose, matmul, residual add, cat, average pooling, mul, mul_pow2, lookup table,
  standalone BatchNorm) and on every graph output; a value that already comes out of a quantizer
  through grid-keeping ops (ReLU, max pooling, reshapes, transposes, upsampling) keeps it. One quantizer per value, shared
  by all its quantized consumers; named after the op that produced the value, looking through
  transparent ops and BatchNorm only (``input`` for a model input, ``sigmoid`` for a value a
  sigmoid produced). Float consumers keep the float value. Every quantized op's layer name is
  recorded in ``node.meta[LAYER_META]``.

* **Element-wise functions** (kind ``lut``) become
  ``q_out(ElementwiseTable(q_in(x), <q_in's bits, FL>, <q_out's bits, FL>))``
  (:class:`~fxquant.ops.fake_quant.ElementwiseTable`: forward = the integer graph's table, backward
  = the function's derivative). ``q_in`` is the value's activation quantizer with its width capped
  at :data:`~fxquant.ops.fake_quant.DEFAULT_LUT_INPUT_BITS` (8: a 256-entry table; the cap is the
  quantizer's ``max_bits``, so a policy asking for more gets 8, and a value shared with other
  quantized consumers shares the cap); ``q_out`` is the table's own output quantizer (layer =
  the function's layer name, kind ``lut``: in the precision map and set by the policy like any
  activation), read by every consumer.
* **Average pooling** becomes :class:`~fxquant.ops.fake_quant.FixedPointAvgPool2d` (window sum
  times the rounded reciprocal of its divisor, exactly the integer op).
* A **standalone BatchNorm2d** (not after a single-user conv) gets an input quantizer and a weight
  quantizer (layer = the BN's path, kind ``batchnorm``, unused in training) for the depthwise 1x1
  conv :class:`~fxquant.passes.FoldBatchNorm` makes of it.

Before → after (a residual block)::

    x ─ conv1 ─ bn ─ relu ─ conv2 ─ bn ─┐            x ─ q[input] ─ conv1(q_w) ─ bn ─ relu ─ q[conv1] ─ conv2(q_w) ─ bn ─ q[conv2] ─┐
    └───────────────────────────────── add ─ relu     └──────────────────────────────────────────────────────────────────────── add ─ relu ─ q[add]

Quantizers start *off* (32 bits) unless formats are given; a precision map or a policy sets them.
Idempotent: a graph that already has quantizers is returned unchanged (``modified=False``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxquant.errors import UnsupportedOpError
from fxquant.fixed_point import OFF_BITS, FixedPoint
from fxquant.ops.fake_quant import DEFAULT_LUT_INPUT_BITS, ElementwiseTable, FixedPointAvgPool2d
from fxquant.passes.op_kinds import (GRID_KEEPING_KINDS, LAYER_META, QUANTIZED_KINDS, TRANSPARENT_KINDS,
                                     WEIGHTED_KINDS, argument, call_arguments, elementwise_function, layer_name,
                                     node_kind, short_name, spatial_mean, tensor_inputs)
from fxquant.quantizers import ACT, WEIGHT, BiasQuantizer, FixedPointQuantizer

QUANT_ROOT = "fxq"
"""Quantizer modules live under ``gm.fxq`` (a ModuleDict) so their ``state_dict`` keys are stable."""
INPUT_LAYER = "input"
_aten = torch.ops.aten


def module_key(layer: str, role: str) -> str:
    """ModuleDict key of a quantizer: dots are not allowed in module names."""
    return f"{layer.replace('.', '_').replace(':', '_')}__{role}"


def has_quantizers(gm: fx.GraphModule) -> bool:
    return any(isinstance(m, FixedPointQuantizer) for m in gm.modules())


def is_quantizer_node(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), FixedPointQuantizer)


@dataclass
class InsertQuantizers(PassBase):
    """The pass; ``weight_fmt`` / ``act_fmt`` / ``grad_bits`` are the initial formats."""

    weight_fmt: FixedPoint = field(default_factory=lambda: FixedPoint(OFF_BITS, 0))
    act_fmt: FixedPoint = field(default_factory=lambda: FixedPoint(OFF_BITS, 0))
    grad_bits: int = OFF_BITS

    def call(self, gm: fx.GraphModule) -> PassResult:
        if has_quantizers(gm):
            return PassResult(gm, False)
        if not hasattr(gm, QUANT_ROOT):
            gm.add_module(QUANT_ROOT, nn.ModuleDict())
        graph = gm.graph
        for node in list(graph.nodes):
            if node_kind(gm, node) in WEIGHTED_KINDS:
                _canonicalize_weighted(gm, node)
        names: dict[fx.Node, str] = {}
        layers: set[str] = set()
        for node in graph.nodes:
            kind = node_kind(gm, node)
            if kind in QUANTIZED_KINDS or is_standalone_batchnorm(gm, node):
                if kind == "lut":
                    fn = elementwise_function(gm, node)
                    label = fn[0] if fn is not None else "lut"
                else:
                    label = kind
                names[node] = _unique(layer_name(gm, node, label), layers)
                node.meta[LAYER_META] = names[node]
        used: set[str] = set()  # act quantizer names: one per value
        act_q: dict[fx.Node, fx.Node] = {}
        for node in list(graph.nodes):  # tables first: their outputs carry their own quantizer
            if node in names and node_kind(gm, node) == "lut":
                self._lut(gm, node, names, used, act_q)
        for node in list(graph.nodes):
            kind = names.get(node) and node_kind(gm, node)
            if kind and kind != "lut":
                for value in tensor_inputs(node, gm):
                    if kind == "matmul" and value.op == "get_attr":  # x @ W with a parameter W
                        target = self._add_quantizer(gm, names[node], WEIGHT, self.weight_fmt, kind)
                        with graph.inserting_before(node):
                            node.replace_input_with(value, graph.call_module(target, (value,)))
                        continue
                    node.replace_input_with(value, self._act_quantizer(gm, value, names, used, act_q))
            if node.op == "output":
                outs = node.args[0]
                flat = outs if isinstance(outs, (tuple, list)) else (outs,)
                for value in flat:
                    if isinstance(value, fx.Node):
                        node.replace_input_with(value, self._act_quantizer(gm, value, names, used, act_q))
        for node in list(graph.nodes):
            kind = node_kind(gm, node) if node in names else None
            if kind in WEIGHTED_KINDS:
                self._quantize_weight_and_bias(gm, node, names[node])
            elif kind == "avgpool2d":
                self._avgpool(gm, node, names[node])
            elif kind == "batchnorm":  # standalone BN: deployed as a depthwise 1x1 conv (FoldBatchNorm)
                self._add_quantizer(gm, names[node], WEIGHT, self.weight_fmt, "batchnorm")
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _lut(self, gm: fx.GraphModule, node: fx.Node, names: dict[fx.Node, str], used: set[str],
             act_q: dict[fx.Node, fx.Node]) -> None:
        """``f(x)`` → ``q_out(ElementwiseTable(q_in(x), q_in formats, q_out formats))`` (module docstring)."""
        graph = gm.graph
        layer = names[node]
        fn = elementwise_function(gm, node)
        if fn is None:  # already an ElementwiseTable
            return
        name, params = fn
        x = tensor_inputs(node, gm)[0]
        q_in = self._act_quantizer(gm, x, names, used, act_q)
        in_q_node = grid_quantizer(gm, q_in)
        in_q: FixedPointQuantizer = gm.get_submodule(str(in_q_node.target))
        in_q.max_bits = min(in_q.max_bits or DEFAULT_LUT_INPUT_BITS, DEFAULT_LUT_INPUT_BITS)
        in_q.set_format(in_q.fmt)
        weights: tuple[fx.Node, ...] = ()
        if name == "prelu":
            with graph.inserting_before(node):
                w = graph.get_attr(f"{node.target}.weight") if node.op == "call_module" else \
                    argument(node, 1, "weight")
            weights = (w,)
        key = module_key(layer, "lut")
        gm.get_submodule(QUANT_ROOT)[key] = ElementwiseTable(layer, name, params)
        out_target = self._add_quantizer(gm, _unique(layer, used), ACT, self.act_fmt, "lut")
        with graph.inserting_before(node):
            formats = [graph.get_attr(f"{q}.{buf}") for q, buf in
                       ((in_q_node.target, "bits"), (in_q_node.target, "frac_bits"),
                        (out_target, "bits"), (out_target, "frac_bits"))]
            table = graph.call_module(f"{QUANT_ROOT}.{key}", (q_in, *formats, *weights))
            q_out = graph.call_module(out_target, (table,))
        table.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        table.meta[LAYER_META] = layer
        names[table] = layer
        node.replace_all_uses_with(q_out)
        graph.erase_node(node)
        act_q[table] = q_out

    def _avgpool(self, gm: fx.GraphModule, node: fx.Node, layer: str) -> None:
        """Average pooling → :class:`FixedPointAvgPool2d` (window sum times the rounded reciprocal)."""
        keepdim = spatial_mean(node)
        if keepdim is not None:  # x.mean([2, 3]): global pooling, then (N, C) unless keepdim
            a: dict[str, Any] | None = {"input": node.args[0] if node.args else node.kwargs["input"],
                                        "output_size": 1}
        else:
            a = call_arguments(gm, node)
        if a is None:
            return
        config = {k: v for k, v in a.items() if k != "input"}
        if any(_nodes_of(v) for v in config.values()):
            return  # shape-dependent arguments: stays torch's op (the lowering checks it)
        key = module_key(layer, "avgpool")
        gm.get_submodule(QUANT_ROOT)[key] = FixedPointAvgPool2d(layer, config)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(f"{QUANT_ROOT}.{key}", (a["input"],))
            if keepdim is False:
                new.meta.update(node.meta)
                new = gm.graph.call_function(torch.flatten, (new, 1))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)

    def _add_quantizer(self, gm: fx.GraphModule, layer: str, role: str, fmt: FixedPoint, kind: str) -> str:
        key = module_key(layer, role)
        gm.get_submodule(QUANT_ROOT)[key] = FixedPointQuantizer(layer, role, fmt, self.grad_bits, kind=kind)
        return f"{QUANT_ROOT}.{key}"

    def _act_quantizer(self, gm: fx.GraphModule, value: fx.Node, names: dict[fx.Node, str],
                       used: set[str], act_q: dict[fx.Node, fx.Node]) -> fx.Node:
        if value in act_q:
            return act_q[value]
        if grid_quantizer(gm, value) is not None:
            return value  # a quantizer's output, through ops that keep its grid
        source, kind = _source_layer(gm, value, names)
        layer = _unique(source, used)
        target = self._add_quantizer(gm, layer, ACT, self.act_fmt, kind)
        with gm.graph.inserting_after(value):
            q = gm.graph.call_module(target, (value,))
        act_q[value] = q
        return q

    def _quantize_weight_and_bias(self, gm: fx.GraphModule, node: fx.Node, layer: str) -> None:
        weight = node.args[1]
        target = self._add_quantizer(gm, layer, WEIGHT, self.weight_fmt, node_kind(gm, node) or "")
        with gm.graph.inserting_before(node):
            wq = gm.graph.call_module(target, (weight,))
        node.update_arg(1, wq)
        if len(node.args) > 2 and isinstance(node.args[2], fx.Node):
            attach_bias_quantizer(gm, node, layer)


def grid_quantizer(gm: fx.GraphModule, value: fx.Node) -> fx.Node | None:
    """The activation quantizer node ``value`` comes from through grid-keeping ops (ReLU, max
    pooling, reshapes, transposes, upsampling, identity), or ``None``."""
    node = value
    while True:
        if is_quantizer_node(gm, node) and gm.get_submodule(str(node.target)).role != WEIGHT:
            return node
        if node.op not in ("call_module", "call_function", "call_method") or \
                node_kind(gm, node) not in GRID_KEEPING_KINDS:
            return None
        inputs = tensor_inputs(node, gm)
        if not inputs:
            return None
        node = inputs[0]


def is_standalone_batchnorm(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A ``BatchNorm2d`` module that :class:`FoldBatchNorm` cannot fold into a conv (its input is
    not a conv/linear read by it alone): pre-activation BN, BN after a cat or a pool."""
    if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), nn.BatchNorm2d):
        return False
    src = node.args[0] if node.args else None
    return not (isinstance(src, fx.Node) and node_kind(gm, src) in ("conv2d", "linear") and len(src.users) == 1)


def _nodes_of(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out


def attach_bias_quantizer(gm: fx.GraphModule, node: fx.Node, layer: str) -> None:
    """Quantize ``node``'s bias (arg 2) to ``FL_w + FL_in`` int32; inputs must be quantizer outputs."""
    wq_node, in_node, bias = node.args[1], grid_quantizer(gm, node.args[0]) or node.args[0], node.args[2]
    key = module_key(layer, "bias")
    gm.get_submodule(QUANT_ROOT)[key] = BiasQuantizer(layer)
    with gm.graph.inserting_before(node):
        attrs = [gm.graph.get_attr(f"{q.target}.{buf}") for q, buf in
                 ((wq_node, "frac_bits"), (in_node, "frac_bits"), (wq_node, "bits"), (in_node, "bits"))]
        bq = gm.graph.call_module(f"{QUANT_ROOT}.{key}", (bias, *attrs))
    node.update_arg(2, bq)


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``name:1``, ``name:2``… if taken; the result is added to ``used``."""
    candidate, k = name, 1
    while candidate in used:
        candidate = f"{name}:{k}"
        k += 1
    used.add(candidate)
    return candidate


def _source_layer(gm: fx.GraphModule, value: fx.Node, names: dict[fx.Node, str]) -> tuple[str, str]:
    """``(name, kind)`` of the op that produced ``value``, looking through transparent ops and BN.

    ReLU, max pooling, flatten/reshape, dropout and BatchNorm (folded into its conv) keep the
    producer's name (``conv1`` for conv1 → bn → relu → maxpool); any other op (a quantized layer,
    or a float op such as ``sigmoid``) names the value itself.
    """
    node = value
    while True:
        if node.op == "placeholder":
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            return (INPUT_LAYER if len(placeholders) == 1 else f"{INPUT_LAYER}.{node.name}"), INPUT_LAYER
        if node in names:
            return names[node], node_kind(gm, node) or ""
        kind = node_kind(gm, node)
        inputs = tensor_inputs(node, gm) if node.op in ("call_module", "call_function", "call_method") else []
        if (kind in TRANSPARENT_KINDS or kind == "batchnorm") and inputs:
            node = inputs[0]
            continue
        if node.op == "get_attr":
            return str(node.target), "constant"
        op = short_name(gm, node)
        return layer_name(gm, node, op), op


def _padding(padding: Any, kernel: tuple[int, ...], dilation: Any) -> list[int] | None:
    """Explicit symmetric integer padding, or ``None`` where there is none ('same', even kernel)."""
    if not isinstance(padding, str):
        return [int(p) for p in (padding if isinstance(padding, (list, tuple)) else (padding, padding))]
    if padding == "valid":
        return [0, 0]
    dil = dilation if isinstance(dilation, (list, tuple)) else (dilation, dilation)
    totals = [int(d) * (int(k) - 1) for d, k in zip(dil, kernel)]
    return [t // 2 for t in totals] if padding == "same" and all(t % 2 == 0 for t in totals) else None


def _pair_list(v: Any) -> list[int]:
    """``1``, ``[1]`` or ``(1, 1)`` as ``[1, 1]``."""
    if not isinstance(v, (list, tuple)):
        return [int(v), int(v)]
    return [int(v[0])] * 2 if len(v) == 1 else [int(x) for x in v]


def _canonicalize_weighted(gm: fx.GraphModule, node: fx.Node) -> None:
    """Every conv/linear form → ``aten.conv2d.default(x, w, b, stride, padding, dilation, groups)`` /
    ``aten.linear.default(x, w, b)`` on ``get_attr`` parameters, every argument positional.

    Covers ``nn.Conv2d``/``nn.Linear`` modules (parameters keep their names), ``F.conv2d`` /
    ``F.linear`` with parameter weights, export's aten calls (keyword or short forms), and
    ``torch.addmm(b, x, W)`` (Hugging Face ``Conv1D``, ``W`` of shape ``(in, out)``), which becomes
    ``linear(x, aten.t(W), b)``: the same sum, and the weight quantizer sees the ``(out, in)`` matrix.
    """
    graph = gm.graph
    a = call_arguments(gm, node)
    kind = node_kind(gm, node)
    if a is None:
        return
    meta_stack = None
    if node.op == "call_module":
        path = str(node.target)
        module = gm.get_submodule(path)
        if isinstance(module, nn.ConvTranspose2d) and module.padding_mode != "zeros":
            raise UnsupportedOpError(f"conv_transpose {path!r}: padding mode {module.padding_mode!r}",
                                     "use zero padding")
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or _padding(module.padding, module.kernel_size, module.dilation) is None:
                raise UnsupportedOpError(f"conv {path!r}: padding {module.padding!r} / mode "
                                         f"{module.padding_mode!r} is not supported",
                                         "use integer zero padding (or 'same' with an odd kernel)")
        with graph.inserting_before(node):
            a["weight"] = graph.get_attr(f"{path}.weight")
            a["bias"] = graph.get_attr(f"{path}.bias") if module.bias is not None else None
        meta_stack = {path: (path, type(module))}
    with graph.inserting_before(node):
        if node.target in (torch.addmm, _aten.addmm.default):
            mat2 = a["mat2"]
            weight = graph.call_function(_aten.t.default, (mat2,)) if mat2.op == "get_attr" else mat2.args[0]
            new = graph.call_function(_aten.linear.default, (a["mat1"], weight, a["input"]))
        elif kind == "conv_transpose2d":
            if _pair_list(a.get("padding", 0)) is None:
                return
            new = graph.call_function(_aten.conv_transpose2d.input, (
                a["input"], a["weight"], a.get("bias"), _pair_list(a.get("stride", 1)),
                _pair_list(a.get("padding", 0)), _pair_list(a.get("output_padding", 0)),
                int(a.get("groups", 1)), _pair_list(a.get("dilation", 1))))
        elif kind == "conv2d":
            kernel = tuple(operator.attrgetter(str(a["weight"].target))(gm).shape[2:])
            padding = _padding(a.get("padding", 0), kernel, a.get("dilation", 1))
            if padding is None:
                return  # asymmetric 'same' padding: stays a float op, the lowering names it
            new = graph.call_function(_aten.conv2d.default, (
                a["input"], a["weight"], a.get("bias"), _pair_list(a.get("stride", 1)), padding,
                _pair_list(a.get("dilation", 1)), int(a.get("groups", 1))))
        else:
            new = graph.call_function(_aten.linear.default, (a["input"], a["weight"], a.get("bias")))
    new.meta.update(node.meta)
    if meta_stack is not None:
        new.meta["nn_module_stack"] = meta_stack
    node.replace_all_uses_with(new)
    graph.erase_node(node)
