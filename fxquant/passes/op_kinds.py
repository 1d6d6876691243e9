"""What each fx node *is*, for graphs from ``torch.fx.symbolic_trace`` and from ``torch.export``.

One table maps nn modules, torch functions, tensor methods and aten overloads to an op kind, so
every pass reads the graph the same way whichever capture produced it:

* **quantized** kinds (``conv2d``, ``linear``, ``matmul``, ``add``, ``cat``, ``avgpool2d``): their
  tensor inputs are quantized values; ``conv2d``/``linear`` also carry a quantized weight.
* **transparent** kinds (``relu``, ``maxpool2d``, ``flatten``, ``identity``): commute with the
  quantizer, values keep their grid.
* ``batchnorm``: trained in float, folded into the conv before deployment.
* anything else is ``None`` (a float op: allowed in training, rejected by integer exporters).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

QUANTIZED_KINDS = frozenset({"conv2d", "linear", "matmul", "add", "cat", "avgpool2d"})
WEIGHTED_KINDS = frozenset({"conv2d", "linear"})
TRANSPARENT_KINDS = frozenset({"relu", "maxpool2d", "flatten", "identity"})

_aten = torch.ops.aten
_MODULE_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Conv2d, "conv2d"), (nn.Linear, "linear"), (nn.BatchNorm2d, "batchnorm"),
    (nn.BatchNorm1d, "batchnorm"), (nn.ReLU, "relu"), (nn.MaxPool2d, "maxpool2d"),
    (nn.AvgPool2d, "avgpool2d"), (nn.AdaptiveAvgPool2d, "avgpool2d"), (nn.Flatten, "flatten"),
    (nn.Dropout, "identity"), (nn.Identity, "identity"),
)
_FUNCTION_KINDS: dict[Any, str] = {
    _aten.conv2d.default: "conv2d", _aten.linear.default: "linear",
    torch.relu: "relu", F.relu: "relu", _aten.relu.default: "relu", _aten.relu_.default: "relu",
    operator.add: "add", torch.add: "add", _aten.add.Tensor: "add", operator.iadd: "add",
    torch.cat: "cat", _aten.cat.default: "cat",
    torch.matmul: "matmul", operator.matmul: "matmul", _aten.matmul.default: "matmul",
    torch.flatten: "flatten", _aten.flatten.using_ints: "flatten", _aten.view.default: "flatten",
    _aten.reshape.default: "flatten",
    F.max_pool2d: "maxpool2d", _aten.max_pool2d.default: "maxpool2d",
    F.avg_pool2d: "avgpool2d", _aten.avg_pool2d.default: "avgpool2d",
    F.adaptive_avg_pool2d: "avgpool2d", _aten.adaptive_avg_pool2d.default: "avgpool2d",
    F.dropout: "identity", _aten.dropout.default: "identity", _aten.clone.default: "identity",
    _aten._native_batch_norm_legit_no_training.default: "batchnorm",
    _aten.batch_norm.default: "batchnorm",
}
_METHOD_KINDS = {"relu": "relu", "add": "add", "flatten": "flatten", "view": "flatten",
                 "reshape": "flatten", "contiguous": "identity", "matmul": "matmul"}


def module_kind(module: nn.Module) -> str | None:
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    return None


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The op kind of ``node`` (see module docstring), or ``None`` for other ops."""
    if node.op == "call_module":
        return module_kind(gm.get_submodule(str(node.target)))
    if node.op == "call_function":
        kind = _FUNCTION_KINDS.get(node.target)
    elif node.op == "call_method":
        kind = _METHOD_KINDS.get(str(node.target))
    else:
        return None
    if kind == "add" and sum(isinstance(a, fx.Node) for a in node.args[:2]) < 2:
        return None  # adding a constant is not a residual add
    return kind


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The activation inputs of a node (weights and biases of conv/linear excluded)."""
    if node.op == "call_function" and node.target in (_aten.conv2d.default, _aten.linear.default):
        return [node.args[0]]
    if node.target in (torch.cat, _aten.cat.default):
        return [a for a in node.args[0] if isinstance(a, fx.Node)]
    return [a for a in node.args if isinstance(a, fx.Node)]


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that issued ``node`` ("" at top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def layer_name(gm: fx.GraphModule, node: fx.Node, kind: str) -> str:
    """Stable, human-readable layer name: the module path for Conv/Linear, ``<path>.<kind>`` else."""
    path = module_path(node)
    if node.op == "call_module" or (kind in WEIGHTED_KINDS and path):
        return path
    return f"{path}.{kind}" if path else kind
