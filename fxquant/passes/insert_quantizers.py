"""Insert fixed-point quantizers into a captured graph (after :func:`capture`).

* A **weight quantizer** on every Conv2d/Linear weight (and on a parameter operand of a matmul), and a :class:`BiasQuantizer` putting the
  bias on the accumulator grid ``FL_w + FL_in``. Conv/Linear modules become functional
  ``aten.conv2d`` / ``aten.linear`` calls on ``get_attr`` weights (parameters keep their names).
* An **activation quantizer on every value that enters a quantized op** (conv, linear, matmul,
  residual add, cat, average pooling) and on every graph output. One quantizer per value, shared
  by all its quantized consumers; named after the value's producer layer (``input`` for a model
  input). Float consumers keep the float value.

Before → after (a residual block)::

    x ─ conv1 ─ bn ─ relu ─ conv2 ─ bn ─┐            x ─ q[input] ─ conv1(q_w) ─ bn ─ relu ─ q[conv1] ─ conv2(q_w) ─ bn ─ q[conv2] ─┐
    └───────────────────────────────── add ─ relu     └──────────────────────────────────────────────────────────────────────── add ─ relu ─ q[add]

Quantizers start *off* (32 bits) unless formats are given; a precision map or a policy sets them.
Idempotent: a graph that already has quantizers is returned unchanged (``modified=False``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxquant.errors import UnsupportedOpError
from fxquant.fixed_point import OFF_BITS, FixedPoint
from fxquant.passes.op_kinds import (QUANTIZED_KINDS, WEIGHTED_KINDS, layer_name, module_kind,
                                     node_kind, tensor_inputs)
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
        names: dict[fx.Node, str] = {}
        layers: set[str] = set()
        for node in graph.nodes:
            kind = node_kind(gm, node)
            if kind in QUANTIZED_KINDS:
                names[node] = _unique(layer_name(gm, node, kind), layers)
        used: set[str] = set()  # act quantizer names: one per value
        for node in list(graph.nodes):
            if node.op == "call_module" and module_kind(gm.get_submodule(str(node.target))) in WEIGHTED_KINDS:
                _functionalize(gm, node, names)
        act_q: dict[fx.Node, fx.Node] = {}
        for node in list(graph.nodes):
            kind = names.get(node) and node_kind(gm, node)
            if kind:
                for value in tensor_inputs(node):
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
            if node in names and node_kind(gm, node) in WEIGHTED_KINDS:
                self._quantize_weight_and_bias(gm, node, names[node])
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _add_quantizer(self, gm: fx.GraphModule, layer: str, role: str, fmt: FixedPoint, kind: str) -> str:
        key = module_key(layer, role)
        gm.get_submodule(QUANT_ROOT)[key] = FixedPointQuantizer(layer, role, fmt, self.grad_bits, kind=kind)
        return f"{QUANT_ROOT}.{key}"

    def _act_quantizer(self, gm: fx.GraphModule, value: fx.Node, names: dict[fx.Node, str],
                       used: set[str], act_q: dict[fx.Node, fx.Node]) -> fx.Node:
        if value in act_q:
            return act_q[value]
        if is_quantizer_node(gm, value):
            return value
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


def attach_bias_quantizer(gm: fx.GraphModule, node: fx.Node, layer: str) -> None:
    """Quantize ``node``'s bias (arg 2) to ``FL_w + FL_in`` int32; inputs must be quantizer outputs."""
    wq_node, in_node, bias = node.args[1], node.args[0], node.args[2]
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
    """``(name, kind)`` of the layer that produced ``value``: walk up through non-quantized ops."""
    node = value
    while True:
        if node.op == "placeholder":
            placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
            return (INPUT_LAYER if len(placeholders) == 1 else f"{INPUT_LAYER}.{node.name}"), INPUT_LAYER
        if node in names:
            return names[node], node_kind(gm, node) or ""
        inputs = tensor_inputs(node)
        if not inputs:
            return node.name, ""
        node = inputs[0]


def _functionalize(gm: fx.GraphModule, node: fx.Node, names: dict[fx.Node, str]) -> None:
    """``call_module`` Conv2d/Linear → ``aten.conv2d``/``aten.linear`` on ``get_attr`` parameters."""
    path = str(node.target)
    module = gm.get_submodule(path)
    graph = gm.graph
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{path}.weight")
        bias = graph.get_attr(f"{path}.bias") if module.bias is not None else None
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise UnsupportedOpError(f"conv {path!r}: padding {module.padding!r} / mode "
                                         f"{module.padding_mode!r} is not supported",
                                         "use integer zero padding")
            new = graph.call_function(_aten.conv2d.default, (node.args[0], weight, bias, list(module.stride),
                                      list(module.padding), list(module.dilation), module.groups))
        else:
            new = graph.call_function(_aten.linear.default, (node.args[0], weight, bias))
    new.meta.update(node.meta)
    new.meta["nn_module_stack"] = {path: (path, type(module))}
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    names[new] = names.pop(node)
