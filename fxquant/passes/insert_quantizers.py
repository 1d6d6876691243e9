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

* **Transformers** (``docs/passes.md``): an ``nn.Embedding`` / ``F.embedding`` becomes
  ``F.embedding(ids, q_w(W))`` (the table is a weight, kind ``embedding``; the token ids are integer
  inputs and get **no** quantizer). ``nn.LayerNorm`` / ``F.layer_norm`` becomes
  ``q_out(FixedPointLayerNorm(q_in(x), formats, q_w(gamma), beta))`` and a softmax
  ``q_out(FixedPointSoftmax(q_in(scores), formats, *keep))``: their forward is the integer reference
  (:mod:`fxquant.ops.fake_quant`), ``q_out`` the layer's own output quantizer (kinds ``layernorm``,
  ``softmax``: in the precision map, set by the policy like any activation). The softmax's input is
  peeled of its mask ops (:func:`~fxquant.passes.op_kinds.masked_scores`: ``masked_fill(cond, -inf)``,
  ``torch.where(cond, x, -inf)``, ``x + (1 - m) * -1e9``), which become boolean keep terms; the
  quantizer sits on the unmasked scores, as in the integer graph. A value that is sliced
  (``x[:, 0]``, ``split``/``chunk`` pieces, then views) is quantized **before** the slicing, one
  quantizer shared by every piece (an integer op has one output format).
* **Constant scales** (:func:`fold_constant_scales`, first): ``y * c`` / ``y / c`` with ``c`` not a
  power of two (attention's ``1/sqrt(d)``) is folded into the linear layer ``y`` comes from (through
  views, transposes and activation matmuls): exact, no rounded constant multiply is left.

Before → after (a residual block)::

    x ─ conv1 ─ bn ─ relu ─ conv2 ─ bn ─┐            x ─ q[input] ─ conv1(q_w) ─ bn ─ relu ─ q[conv1] ─ conv2(q_w) ─ bn ─ q[conv2] ─┐
    └───────────────────────────────── add ─ relu     └──────────────────────────────────────────────────────────────────────── add ─ relu ─ q[add]

Quantizers start *off* (32 bits) unless formats are given; a precision map or a policy sets them.
Idempotent: a graph that already has quantizers is returned unchanged (``modified=False``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxquant.errors import UnsupportedOpError
from fxquant.fixed_point import OFF_BITS, FixedPoint
from fxquant.ops.fake_quant import (DEFAULT_LUT_INPUT_BITS, ElementwiseTable, FixedPointAvgPool2d, FixedPointLayerNorm,
                                   FixedPointSoftmax)
from fxquant.passes.op_kinds import (GRID_KEEPING_KINDS, LAYER_META, QUANTIZED_KINDS, TRANSPARENT_KINDS,
                                     WEIGHTED_KINDS, argument, call_arguments, constant_factor, elementwise_function,
                                     is_shape_value, layer_name, masked_scores, node_kind, power_of_two_exponent,
                                     scaled_parameter, short_name, spatial_mean, table_kind, tensor_inputs)
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
        fold_constant_scales(gm)
        masks: dict[fx.Node, tuple[fx.Node, list[tuple[str, fx.Node]], list[fx.Node]]] = {}
        for node in graph.nodes:
            if node_kind(gm, node) == "softmax" and not _is_fxq_module(gm, node):
                a = call_arguments(gm, node) or {}
                if isinstance(a.get("input"), fx.Node):
                    masks[node] = masked_scores(gm, a["input"])
        mask_nodes = {n for _, _, peeled in masks.values() for n in peeled}
        names: dict[fx.Node, str] = {}
        layers: set[str] = set()
        for node in graph.nodes:
            kind = node_kind(gm, node)
            if node in mask_nodes:
                continue
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
            elif node in names and node_kind(gm, node) == "softmax" and node in masks:
                self._softmax(gm, node, masks[node], names, used, act_q)
            elif node in names and node_kind(gm, node) == "layernorm" and not _is_fxq_module(gm, node):
                self._layernorm(gm, node, names, used, act_q)
        for node in list(graph.nodes):
            kind = names.get(node) and node_kind(gm, node)
            if kind == "embedding":  # token ids are integer inputs: no float quantizer
                self._embedding(gm, node, names[node])
                continue
            if kind and kind not in ("lut", "softmax", "layernorm"):
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
        _erase_dead(graph, mask_nodes)
        graph.lint()
        gm.recompile()
        return PassResult(gm, True)

    def _formats(self, gm: fx.GraphModule, *targets: str) -> list[fx.Node]:
        """``get_attr`` nodes of the ``bits`` and ``frac_bits`` buffers of each quantizer target."""
        return [gm.graph.get_attr(f"{t}.{buf}") for t in targets for buf in ("bits", "frac_bits")]

    def _softmax(self, gm: fx.GraphModule, node: fx.Node,
                 peeled: tuple[fx.Node, list[tuple[str, fx.Node]], list[fx.Node]], names: dict[fx.Node, str], used: set[str], act_q: dict[fx.Node, fx.Node]) -> None:
        """``softmax(mask(scores))`` → ``q_out(FixedPointSoftmax(q_in(scores), formats, *keep_terms))``:
        the mask ops become boolean keep terms (module docstring of :mod:`fxquant.ops.fake_quant`)."""
        graph = gm.graph
        layer = names[node]
        if node.op == "call_module":
            dim = gm.get_submodule(str(node.target)).dim
        else:
            dim = argument(node, 1, "dim")
        if not isinstance(dim, int):
            return  # no dim (legacy implicit dim) or a computed one: stays torch's softmax, the lowering names it
        scores, terms, _ = peeled
        q_in = self._act_quantizer(gm, scores, names, used, act_q)
        in_q = grid_quantizer(gm, q_in)
        key = module_key(layer, "softmax")
        gm.get_submodule(QUANT_ROOT)[key] = FixedPointSoftmax(layer, dim)
        out_target = self._add_quantizer(gm, _unique(layer, used), ACT, self.act_fmt, "softmax")
        with graph.inserting_before(node):
            keep = [graph.call_function(torch.logical_not, (t,)) if how == "not" else t for how, t in terms]
            formats = self._formats(gm, str(in_q.target), out_target)
            new = graph.call_module(f"{QUANT_ROOT}.{key}", (q_in, *formats, *keep))
            q_out = graph.call_module(out_target, (new,))
        self._replace(node, new, q_out, layer, names, act_q)

    def _layernorm(self, gm: fx.GraphModule, node: fx.Node, names: dict[fx.Node, str], used: set[str],
                   act_q: dict[fx.Node, fx.Node]) -> None:
        """``layer_norm(x)`` → ``q_out(FixedPointLayerNorm(q_in(x), formats, q_w(gamma), beta))``."""
        graph = gm.graph
        layer = names[node]
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            shape, eps = module.normalized_shape, module.eps
            with graph.inserting_before(node):
                weight = graph.get_attr(f"{node.target}.weight") if module.weight is not None else None
                bias = graph.get_attr(f"{node.target}.bias") if getattr(module, "bias", None) is not None else None
            x = node.args[0]
        else:
            a = call_arguments(gm, node)
            if a is None:
                return
            x, shape, weight, bias = a["input"], a.get("normalized_shape"), a.get("weight"), a.get("bias")
            eps = a.get("eps", 1e-5)
            if any(v is not None and not (isinstance(v, fx.Node) and v.op == "get_attr") for v in (weight, bias)) \
                    or not isinstance(eps, float) or _nodes_of(shape):
                return  # computed gamma/beta or shape: stays torch's layer_norm, the lowering names it
        q_in = self._act_quantizer(gm, x, names, used, act_q)
        in_q = grid_quantizer(gm, q_in)
        key = module_key(layer, "layernorm")
        gm.get_submodule(QUANT_ROOT)[key] = FixedPointLayerNorm(layer, list(shape), eps)
        w_target = self._add_quantizer(gm, layer, WEIGHT, self.weight_fmt, "layernorm") if weight is not None \
            else str(in_q.target)  # no gamma: the w formats are unused
        out_target = self._add_quantizer(gm, _unique(layer, used), ACT, self.act_fmt, "layernorm")
        with graph.inserting_before(node):
            wq = graph.call_module(w_target, (weight,)) if weight is not None else None
            formats = self._formats(gm, str(in_q.target), w_target, out_target)
            new = graph.call_module(f"{QUANT_ROOT}.{key}", (q_in, *formats, wq, bias))
            q_out = graph.call_module(out_target, (new,))
        self._replace(node, new, q_out, layer, names, act_q)

    def _replace(self, node: fx.Node, new: fx.Node, q_out: fx.Node, layer: str, names: dict[fx.Node, str],
                 act_q: dict[fx.Node, fx.Node]) -> None:
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        new.meta[LAYER_META] = layer
        names[new] = layer
        node.replace_all_uses_with(q_out)
        node.graph.erase_node(node)
        act_q[new] = q_out

    def _embedding(self, gm: fx.GraphModule, node: fx.Node, layer: str) -> None:
        """``nn.Embedding(ids)`` / ``F.embedding(ids, W)`` → ``F.embedding(ids, q_w(W))``: the table is a
        weight (layer kind ``embedding``), the ids stay integer (no quantizer)."""
        graph = gm.graph
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if module.max_norm is not None:
                raise UnsupportedOpError(f"embedding {node.target!r}: max_norm renormalizes the table in forward",
                                         "use max_norm=None")
            with graph.inserting_before(node):
                weight = graph.get_attr(f"{node.target}.weight")
            ids, padding_idx = node.args[0], module.padding_idx
        else:
            a = call_arguments(gm, node) or {}
            ids, weight, padding_idx = a.get("input"), a.get("weight"), a.get("padding_idx")
            if node.target is _aten.embedding.default:
                ids, weight = argument(node, 1, "indices"), argument(node, 0, "weight")
                padding_idx = argument(node, 2, "padding_idx", -1)
                padding_idx = None if padding_idx == -1 else padding_idx
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr") or a.get("max_norm") is not None:
                return  # a computed table: a float op, the lowering names it
        target = self._add_quantizer(gm, layer, WEIGHT, self.weight_fmt, "embedding")
        with graph.inserting_before(node):
            wq = graph.call_module(target, (weight,))
            kwargs = {"padding_idx": padding_idx} if padding_idx is not None else {}
            new = graph.call_function(F.embedding, (ids, wq), kwargs)
        new.meta.update(node.meta)
        new.meta[LAYER_META] = layer
        if node.op == "call_module":
            new.meta["nn_module_stack"] = {**node.meta.get("nn_module_stack", {}),
                                           str(node.target): (str(node.target), type(module))}
        node.replace_all_uses_with(new)
        graph.erase_node(node)

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
        node, base, cut = value, None, None
        while node.op in ("call_function", "call_method", "call_module") and node_kind(gm, node) in GRID_KEEPING_KINDS:
            inputs = tensor_inputs(node, gm)
            if not inputs:
                break
            if node_kind(gm, node) in ("slice", "split"):
                base, cut = inputs[0], node
            node = inputs[0]
        if base is not None:  # x[:, 0], split pieces (then views): one quantizer on x, shared by every piece
            q = self._act_quantizer(gm, base, names, used, act_q)
            if q is not base:
                for user in list(base.users):
                    if user is not q and node_kind(gm, user) in ("slice", "split"):
                        user.replace_input_with(base, q)
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


def _is_fxq_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and getattr(type(gm.get_submodule(str(node.target))), "fxq_kind", None) is not None


def _erase_dead(graph: fx.Graph, nodes: set[fx.Node]) -> None:
    """Erase the peeled mask ops that nothing reads any more (consumers first)."""
    for node in reversed(list(graph.nodes)):
        if node in nodes and not node.users:
            graph.erase_node(node)


def fold_constant_scales(gm: fx.GraphModule) -> bool:
    """``y * c`` / ``y / c`` with a constant ``c`` that is not a power of two (attention's
    ``1/sqrt(d)``), where ``y`` comes from a linear layer through reshapes, transposes and matmuls
    of two activations (each read once), or from one piece of a ``split``/``chunk`` on the last axis
    of a linear's output (a packed ``qkv`` projection): ``c`` is folded into that linear's weight and
    bias (``(x W^T + b) c = x (c W)^T + c b``; for a piece, only its output rows), exact in reals.
    The fold is in the graph, not in the parameter: the linear reads
    :func:`scaled_parameter` ``(W, s)`` = ``W * s`` with ``s`` a buffer (``c`` on the folded rows,
    1 elsewhere), so the trained parameter keeps the user's parametrization (its gradient and
    optimizer step are the eager model's; scaling the parameter itself multiplies the effective
    learning rate of those rows by ``1/c^2``, 32x for a ViT head of 32, which made ViT training
    diverge) and ``state_dict`` keys and values stay the user's. The weight quantizer reads ``W *
    s``, so the fake-quant model and the integer graph both compute with the folded weights and
    nothing is rounded twice. A power of two stays ``mul_pow2``; a scale that cannot be folded
    stays a float multiply (the lowering names it). Returns whether anything was folded."""
    modified = False
    for node in list(gm.graph.nodes):
        factor = constant_factor(gm, node)
        if factor is None or power_of_two_exponent(factor[1]) is not None or not math.isfinite(factor[1]):
            continue
        x, c = factor
        found = _scalable_linear(gm, x)
        if found is None:
            continue
        linear, rows = found
        for index in (1, 2):
            if isinstance(linear.args[index], fx.Node):
                _scale_argument(gm, linear, index, c, rows)
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        modified = True
    return modified


def _users(x: fx.Node) -> list[fx.Node]:
    return [u for u in x.users if not is_shape_value(u)]


def _scalable_linear(gm: fx.GraphModule, x: fx.Node) -> tuple[fx.Node, slice | None] | None:
    """``(linear, output rows or None)`` whose output ``x`` is a scaled view of (module docstring)."""
    rows = None
    while isinstance(x, fx.Node) and len(_users(x)) == 1:
        kind = node_kind(gm, x)
        if kind == "linear" and x.target is _aten.linear.default:
            params = [p for p in x.args[1:3] if isinstance(p, fx.Node)]
            return (x, rows) if all(_parameter_read(p) for p in params) else None
        if kind in ("reshape", "transpose", "identity") and rows is None:
            inputs = tensor_inputs(x, gm)
            x = inputs[0] if inputs else None
        elif kind == "matmul" and rows is None:
            a = call_arguments(gm, x) or {}
            operands = [a.get("input"), a.get("other")]
            if not all(isinstance(v, fx.Node) and v.op != "get_attr" for v in operands):
                return None
            x = operands[0]
        elif kind == "slice" and rows is None and x.target is operator.getitem and \
                table_kind(x.args[0]) == "split" and isinstance(x.args[1], int):
            split = x.args[0]
            linear = split.args[0] if split.args else None
            if not (isinstance(linear, fx.Node) and linear.target is _aten.linear.default and
                    _parameter_read(linear.args[1])):
                return None
            out_features = operator.attrgetter(str(_parameter_of(linear.args[1]).target))(gm).shape[0]
            rows = _piece_rows(gm, split, x.args[1], out_features)
            if rows is None or _users(linear) != [split]:
                return None
            x = linear
        else:
            return None
    return None


def _piece_rows(gm: fx.GraphModule, split: fx.Node, i: int, n: int) -> slice | None:
    """Rows ``[start, stop)`` of piece ``i`` of ``split``/``chunk`` over the last axis of ``n`` features."""
    a = call_arguments(gm, split) or {}
    val = split.args[0].meta.get("val") if split.args and isinstance(split.args[0], fx.Node) else None
    rank = val.dim() if isinstance(val, torch.Tensor) else None  # export graphs record shapes
    if a.get("dim", 0) != -1 and (rank is None or a.get("dim") != rank - 1):
        return None  # a positive dim may not be the features axis (fx graphs hold no shapes here)
    spec = a.get("chunks", a.get("split_size_or_sections", a.get("split_size", a.get("split_sizes"))))
    if not (isinstance(spec, int) or isinstance(spec, (list, tuple)) and all(isinstance(v, int) for v in spec)):
        return None  # a size computed from shapes
    if "chunks" in a:
        size = -(-n // spec)
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        sizes = [spec] * (-(-n // spec)) if isinstance(spec, int) else list(spec)
    if not 0 <= i < len(sizes) or sum(sizes) < n:
        return None
    start = sum(sizes[:i])
    return slice(start, min(start + sizes[i], n))


def _parameter_read(node: Any) -> bool:
    """A ``get_attr`` parameter, or :func:`scaled_parameter` of one."""
    return isinstance(node, fx.Node) and (node.op == "get_attr" or (
        node.target is scaled_parameter and node.args[0].op == "get_attr"))


def _parameter_of(node: fx.Node) -> fx.Node:
    return node.args[0] if node.target is scaled_parameter else node


def _scale_argument(gm: fx.GraphModule, linear: fx.Node, index: int, c: float, rows: slice | None) -> None:
    """Make the linear's weight (``index`` 1) or bias (2) read ``scaled_parameter(p, s)`` with ``s``
    ``c`` on ``rows`` (every row if ``None``); a second fold on the same linear multiplies ``s``."""
    node = linear.args[index]
    rows = rows if rows is not None else slice(None)
    if node.target is scaled_parameter:
        with torch.no_grad():
            operator.attrgetter(str(node.args[1].target))(gm)[rows] *= c
        return
    param = operator.attrgetter(str(node.target))(gm)
    scale = torch.ones((param.shape[0],) + (1,) * (param.dim() - 1), dtype=param.dtype)
    scale[rows] *= c
    name = f"{str(node.target).replace('.', '_')}_fxq_scale"
    gm.register_buffer(name, scale)
    with gm.graph.inserting_before(linear):
        scaled = gm.graph.call_function(scaled_parameter, (node, gm.graph.get_attr(name)))
    linear.update_arg(index, scaled)


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
