"""What each fx node *is*, for graphs from ``torch.fx.symbolic_trace`` and from ``torch.export``.

One table maps nn modules, torch functions, tensor methods and aten overloads to an op kind, so
every pass reads the graph the same way whichever capture produced it:

* **quantized** kinds: their tensor inputs are quantized values.
  ``conv2d``/``linear``/``conv_transpose2d`` also carry a quantized weight (``F.conv2d``,
  ``F.linear``, ``F.conv_transpose2d``, ``torch.addmm`` count only with a parameter weight);
  ``matmul``, ``add``, ``cat``, ``avgpool2d`` (``nn.AvgPool2d``, ``nn.AdaptiveAvgPool2d``, ``F.*``,
  aten, and ``x.mean([2, 3])``: :func:`spatial_mean`); ``mul`` (a product of two activations: ``operator.mul``, ``torch.mul``, ``Tensor.mul``,
  ``aten.mul.Tensor``, in-place forms); ``mul_pow2`` (times a constant power of two, a number or a
  one-element parameter; ``x / c`` too); ``lut`` (an element-wise function of
  :data:`fxquant.elementwise.FUNCTIONS` — Sigmoid, Tanh, SiLU, Hardswish, Hardsigmoid, GELU exact
  and tanh, Mish, ELU(alpha), LeakyReLU(slope), Softplus(beta=1), exp, PReLU — as module,
  ``F.*``, ``torch.*``, tensor method, aten overload or in-place variant; :func:`elementwise_function`
  gives its name and parameters).
* transformer kinds (quantized): ``embedding`` (``nn.Embedding``, ``F.embedding``, aten: the table
  is a weight, the ids are integers), ``layernorm`` (``nn.LayerNorm``, ``F.layer_norm``, aten),
  ``softmax`` (``nn.Softmax``, ``F.softmax``, ``torch.softmax``, ``Tensor.softmax``, aten);
  transparent: ``slice`` (``x[:, 0]``, ``x[..., a:b:c]`` with int/slice indices only
  (:func:`tensor_index`), ``select``, ``narrow``, aten ``slice``/``select``, and the pieces of a
  ``split``/``chunk``, whose own kind is ``split``). :func:`masked_scores` reads the attention
  mask forms in front of a softmax.
* **transparent** kinds (``relu``, ``maxpool2d``, ``flatten``, ``reshape`` (view, reshape,
  squeeze, unsqueeze), ``transpose`` (permute, transpose, swapaxes), ``upsample_nearest``
  (``nn.Upsample``/``F.interpolate`` in mode ``nearest``, aten ``upsample_nearest2d``),
  ``identity`` (dropout of every kind, ``nn.Identity``, torchvision's ``StochasticDepth``,
  ``contiguous``/``clone``/``detach``), and ``clamp`` (``nn.ReLU6``, ``nn.Hardtanh``, ``F.relu6``,
  ``F.hardtanh``, ``torch.clamp``/``clip``/``clamp_min``/``clamp_max`` with constant bounds,
  :func:`clamp_bounds`)): they commute with the quantizer after them; all but ``clamp`` also keep
  their input's grid (:data:`GRID_KEEPING_KINDS`).
* ``batchnorm``: trained in float, folded into the conv before deployment (or, standalone, made a
  depthwise conv by :class:`~fxquant.passes.FoldBatchNorm`).
* anything else is ``None`` (a float op: allowed in training, rejected by integer exporters, which
  name it by :func:`readable_op` and :func:`source_line`).

**Normalization.** :func:`call_arguments` returns every call's arguments in full keyword form
(``torch.fx.operator_schemas.normalize_function`` / ``normalize_module`` with argument types from
the graph; the module's configuration for modules; a small table for tensor methods), so no pass
reads positional ``args`` of a call: ``F.max_pool2d(x, 3, stride=1, padding=1)`` and
``aten.max_pool2d.default(x, [3, 3], [1, 1], [1, 1])`` read the same.

**Shape arithmetic** (``x.size(0)``, ``x.shape[1]``, ``aten.sym_size``, ``dim()``, int
arithmetic on those) is recognised structurally by :func:`is_shape_value`; it is never quantized
and never lowered (the lowering evaluates it from shape propagation).
"""

from __future__ import annotations

import math
import operator
import re
import typing
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import _get_qualified_name
from torch.fx.operator_schemas import normalize_function, normalize_module

QUANTIZED_KINDS = frozenset({"conv2d", "linear", "matmul", "add", "cat", "avgpool2d", "conv_transpose2d",
                             "mul", "mul_pow2", "lut", "softmax", "layernorm", "embedding"})
WEIGHTED_KINDS = frozenset({"conv2d", "linear", "conv_transpose2d"})
TRANSPARENT_KINDS = frozenset({"relu", "maxpool2d", "flatten", "reshape", "identity", "transpose",
                               "upsample_nearest", "clamp", "slice", "split"})
GRID_KEEPING_KINDS = TRANSPARENT_KINDS - {"clamp"}
"""Transparent kinds whose output stays on its input's grid (a clamp's bounds may be off-grid)."""
LAYER_META = "fxq_layer"
"""``node.meta`` key: the layer name :class:`InsertQuantizers` gave a quantized op."""

_aten = torch.ops.aten
_MODULE_KINDS: tuple[tuple[type, str], ...] = (
    (nn.Conv2d, "conv2d"), (nn.ConvTranspose2d, "conv_transpose2d"), (nn.Linear, "linear"),
    (nn.BatchNorm2d, "batchnorm"), (nn.BatchNorm1d, "batchnorm"), (nn.ReLU, "relu"),
    (nn.Hardtanh, "clamp"),  # and its subclass nn.ReLU6
    (nn.MaxPool2d, "maxpool2d"),
    (nn.AvgPool2d, "avgpool2d"), (nn.AdaptiveAvgPool2d, "avgpool2d"), (nn.Flatten, "flatten"),
    (nn.Unflatten, "reshape"), (nn.modules.dropout._DropoutNd, "identity"), (nn.Identity, "identity"),
    (nn.Embedding, "embedding"), (nn.LayerNorm, "layernorm"), (nn.Softmax, "softmax"),
)
_FUNCTION_KINDS: dict[Any, str] = {
    _aten.conv2d.default: "conv2d", _aten.conv2d.padding: "conv2d", torch.conv2d: "conv2d",
    _aten.linear.default: "linear", F.linear: "linear", torch.addmm: "linear", _aten.addmm.default: "linear",
    torch.relu: "relu", F.relu: "relu", _aten.relu.default: "relu", _aten.relu_.default: "relu",
    operator.add: "add", torch.add: "add", _aten.add.Tensor: "add", _aten.add_.Tensor: "add", operator.iadd: "add",
    torch.cat: "cat", _aten.cat.default: "cat",
    torch.matmul: "matmul", operator.matmul: "matmul", _aten.matmul.default: "matmul",
    torch.flatten: "flatten", _aten.flatten.using_ints: "flatten",
    _aten.view.default: "reshape", _aten.reshape.default: "reshape", _aten._unsafe_view.default: "reshape",
    torch.reshape: "reshape", torch.unsqueeze: "reshape", _aten.unsqueeze.default: "reshape",
    torch.squeeze: "reshape", _aten.squeeze.dim: "reshape", _aten.squeeze.default: "reshape",
    _aten.squeeze.dims: "reshape",
    F.max_pool2d: "maxpool2d", _aten.max_pool2d.default: "maxpool2d",
    F.avg_pool2d: "avgpool2d", _aten.avg_pool2d.default: "avgpool2d",
    F.adaptive_avg_pool2d: "avgpool2d", _aten.adaptive_avg_pool2d.default: "avgpool2d",
    F.dropout: "identity", _aten.dropout.default: "identity", _aten.clone.default: "identity",
    _aten.alias.default: "identity", _aten.detach.default: "identity", _aten.contiguous.default: "identity",
    _aten._native_batch_norm_legit_no_training.default: "batchnorm",
    _aten.batch_norm.default: "batchnorm",
    F.embedding: "embedding", _aten.embedding.default: "embedding",
    F.layer_norm: "layernorm", _aten.layer_norm.default: "layernorm",
    F.softmax: "softmax", torch.softmax: "softmax", _aten.softmax.int: "softmax", _aten._softmax.default: "softmax",
    torch.split: "split", torch.chunk: "split", _aten.split.Tensor: "split", _aten.split_with_sizes.default: "split",
    _aten.chunk.default: "split", torch.select: "slice", torch.narrow: "slice", _aten.select.int: "slice",
    _aten.slice.Tensor: "slice", _aten.narrow.default: "slice",
}

def _ops(*names: str) -> list[Any]:
    """The aten overloads that exist among ``names`` (``"sigmoid_.default"``)."""
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(getattr(_aten, packet, None), overload, None)
        if op is not None:
            out.append(op)
    return out


# element-wise functions deployed as a lookup table: target -> (FUNCTIONS name, its parameters as
# (param name, argument index, argument name, default)); ``gelu``'s ``approximate`` picks the name
_LUT_FUNCTIONS: dict[Any, tuple[str, tuple[tuple[str, int, str, Any], ...]]] = {}
for _name, _targets, _params in (
        ("sigmoid", [torch.sigmoid, F.sigmoid, torch.sigmoid_, *_ops("sigmoid.default", "sigmoid_.default")], ()),
        ("tanh", [torch.tanh, F.tanh, torch.tanh_, *_ops("tanh.default", "tanh_.default")], ()),
        ("silu", [F.silu, *_ops("silu.default", "silu_.default")], ()),
        ("hardswish", [F.hardswish, *_ops("hardswish.default", "hardswish_.default")], ()),
        ("hardsigmoid", [F.hardsigmoid, *_ops("hardsigmoid.default", "hardsigmoid_.default")], ()),
        ("gelu", [F.gelu, *_ops("gelu.default", "gelu_.default")], ()),
        ("mish", [F.mish, *_ops("mish.default", "mish_.default")], ()),
        ("elu", [F.elu, F.elu_, *_ops("elu.default", "elu_.default")], (("alpha", 1, "alpha", 1.0),)),
        ("leaky_relu", [F.leaky_relu, F.leaky_relu_, *_ops("leaky_relu.default", "leaky_relu_.default")],
         (("negative_slope", 1, "negative_slope", 0.01),)),
        ("softplus", [F.softplus, *_ops("softplus.default")], ()),
        ("exp", [torch.exp, torch.exp_, *_ops("exp.default", "exp_.default")], ()),
        ("prelu", [F.prelu, torch.prelu, *_ops("prelu.default", "_prelu_kernel.default")], ()),
):
    for _t in _targets:
        _LUT_FUNCTIONS[_t] = (_name, _params)
_LUT_METHODS = {"sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh",
                "exp": "exp", "exp_": "exp"}
_LUT_MODULES: tuple[tuple[type, str], ...] = (
    (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.SiLU, "silu"), (nn.Hardswish, "hardswish"),
    (nn.Hardsigmoid, "hardsigmoid"), (nn.GELU, "gelu"), (nn.Mish, "mish"), (nn.ELU, "elu"),
    (nn.LeakyReLU, "leaky_relu"), (nn.Softplus, "softplus"), (nn.PReLU, "prelu"),
)
# clamp family: target -> (lo argument (index, name, default), hi argument) or a fixed bound
_CLAMP_FUNCTIONS: dict[Any, tuple[Any, Any]] = {}
for _targets, _lo, _hi in (
        ([F.relu6, *_ops("relu6.default", "relu6_.default")], 0.0, 6.0),
        ([F.hardtanh, F.hardtanh_, *_ops("hardtanh.default", "hardtanh_.default")],
         (1, "min_val", -1.0), (2, "max_val", 1.0)),
        ([torch.clamp, torch.clip, torch.clamp_, *_ops("clamp.default", "clamp_.default", "clip.default")],
         (1, "min", None), (2, "max", None)),
        ([torch.clamp_min, *_ops("clamp_min.default")], (1, "min", None), None),
        ([torch.clamp_max, *_ops("clamp_max.default")], None, (1, "max", None)),
):
    for _t in _targets:
        _CLAMP_FUNCTIONS[_t] = (_lo, _hi)
_CLAMP_METHODS = {"clamp": ((1, "min", None), (2, "max", None)), "clamp_": ((1, "min", None), (2, "max", None)),
                  "clip": ((1, "min", None), (2, "max", None)), "clip_": ((1, "min", None), (2, "max", None)),
                  "clamp_min": ((1, "min", None), None), "clamp_max": (None, (1, "max", None))}
_MUL_FUNCTIONS = frozenset({operator.mul, operator.imul, torch.mul,
                            *_ops("mul.Tensor", "mul_.Tensor", "mul.Scalar", "mul_.Scalar")})
_DIV_FUNCTIONS = frozenset({operator.truediv, operator.itruediv, torch.div,
                            *_ops("div.Tensor", "div_.Tensor", "div.Scalar", "div_.Scalar")})
_TRANSPOSE_FUNCTIONS = frozenset({torch.transpose, torch.permute, torch.swapaxes, torch.swapdims,
                                  *_ops("transpose.int", "permute.default")})
_UPSAMPLE_FUNCTIONS = frozenset({F.interpolate, F.upsample, F.upsample_nearest,
                                 *_ops("upsample_nearest2d.vec", "upsample_nearest2d.default")})
_CONV_TRANSPOSE_FUNCTIONS = frozenset({F.conv_transpose2d, *_ops("conv_transpose2d.input")})


def argument(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """A call's argument by keyword ``name`` or position ``index`` (``default`` if absent)."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def elementwise_function(gm: fx.GraphModule, node: fx.Node) -> tuple[str, dict[str, Any]] | None:
    """``(FUNCTIONS name, params)`` of an element-wise function with a table form, else ``None``.

    PReLU gives ``("prelu", {})``: its slope is a trained parameter, read when the table is built.
    """
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        for cls, name in _LUT_MODULES:
            if isinstance(module, cls):
                return _module_function(module, name)
        return None
    if node.op == "call_method":
        name = _LUT_METHODS.get(str(node.target))
        return (name, {}) if name else None
    if node.op != "call_function" or node.target not in _LUT_FUNCTIONS:
        return None
    name, spec = _LUT_FUNCTIONS[node.target]
    params = {p: argument(node, i, a, d) for p, i, a, d in spec}
    if not all(_number(v) for v in params.values()):
        return None
    if name == "gelu":
        approx = argument(node, 1, "approximate", "none")
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approx)
    elif name == "elu" and node.target not in (F.elu, F.elu_):
        if argument(node, 2, "scale", 1) != 1 or argument(node, 3, "input_scale", 1) != 1:
            return None
    elif name == "softplus" and argument(node, 1, "beta", 1) != 1:
        return None
    return (name, {k: float(v) for k, v in params.items()}) if name else None


def _module_function(module: nn.Module, name: str) -> tuple[str, dict[str, Any]] | None:
    if isinstance(module, nn.GELU):
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
        return (name, {}) if name else None
    if isinstance(module, nn.ELU):
        return name, {"alpha": float(module.alpha)}
    if isinstance(module, nn.LeakyReLU):
        return name, {"negative_slope": float(module.negative_slope)}
    if isinstance(module, nn.Softplus) and module.beta != 1:
        return None
    return name, {}


def clamp_bounds(gm: fx.GraphModule, node: fx.Node) -> tuple[float | None, float | None] | None:
    """``(lo, hi)`` of a clamp-family op with constant bounds (``None`` = unbounded), else ``None``."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return (float(module.min_val), float(module.max_val)) if isinstance(module, nn.Hardtanh) else None
    if node.op == "call_function":
        spec = _CLAMP_FUNCTIONS.get(node.target)
    elif node.op == "call_method":
        spec = _CLAMP_METHODS.get(str(node.target))
    else:
        return None
    if spec is None:
        return None
    bounds = []
    for b in spec:
        v = argument(node, *b) if isinstance(b, tuple) else b
        if v is not None and not _number(v):
            return None  # a tensor bound: a float op
        bounds.append(None if v is None else float(v))
    return bounds[0], bounds[1]


def _constant_number(gm: fx.GraphModule, v: Any) -> float | None:
    """A python number, or a one-element parameter/buffer, as a float; else ``None``."""
    if _number(v):
        return float(v)
    if isinstance(v, fx.Node) and v.op == "get_attr":
        t = operator.attrgetter(str(v.target))(gm)
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return float(t)
    return None


def mul_operands(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, Any] | None:
    """The two operands of a multiply (``operator.mul``, ``torch.mul``, ``Tensor.mul``, aten)."""
    if node.op == "call_function" and node.target in _MUL_FUNCTIONS or \
            node.op == "call_method" and str(node.target) in ("mul", "mul_"):
        return argument(node, 0, "input", argument(node, 0, "self")), argument(node, 1, "other")
    return None


def constant_factor(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, float] | None:
    """``(activation, c)`` of ``x * c`` / ``c * x`` / ``x / c`` with a constant ``c`` (a number
    or a one-element parameter), else ``None``."""
    ops = mul_operands(gm, node)
    if ops is not None:
        for x, c in (ops, ops[::-1]):
            value = _constant_number(gm, c)
            if value is not None and isinstance(x, fx.Node) and not is_shape_value(x) and x.op != "get_attr":
                return x, value
        return None
    if node.op == "call_function" and node.target in _DIV_FUNCTIONS or \
            node.op == "call_method" and str(node.target) in ("div", "div_"):
        x, c = argument(node, 0, "input", argument(node, 0, "self")), argument(node, 1, "other")
        if argument(node, 2, "rounding_mode", None) is not None:
            return None
        value = _constant_number(gm, c)
        if value and isinstance(x, fx.Node) and not is_shape_value(x):
            return x, 1.0 / value
    return None


def power_of_two_exponent(c: float) -> int | None:
    """``e`` with ``c == 2^e`` exactly, else ``None``."""
    mantissa, exp = math.frexp(c)
    return exp - 1 if mantissa == 0.5 else None


def spatial_mean(node: fx.Node) -> bool | None:
    """``keepdim`` of ``x.mean([2, 3])`` / ``torch.mean(x, (2, 3), keepdim)`` (a global
    average pooling of an NCHW tensor), ``None`` for any other call."""
    if not (node.op == "call_method" and node.target == "mean" or
            node.op == "call_function" and node.target in (torch.mean, _aten.mean.dim)):
        return None
    dims = argument(node, 1, "dim")
    # positive dims only: (-2, -1) of a 3-d tensor would read as pooling too
    if not isinstance(dims, (list, tuple)) or sorted(d for d in dims if isinstance(d, int)) != [2, 3] \
            or argument(node, 3, "dtype") is not None:
        return None
    keepdim = argument(node, 2, "keepdim", False)
    return bool(keepdim) if isinstance(keepdim, bool) else None


def _special_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Kinds decided by a node's operands, not only by its target."""
    if spatial_mean(node) is not None:
        return "avgpool2d"
    if elementwise_function(gm, node) is not None:
        return "lut"
    if clamp_bounds(gm, node) is not None:
        return "clamp"
    if is_shape_value(node):
        return None
    factor = constant_factor(gm, node)
    if factor is not None:
        return "mul_pow2" if power_of_two_exponent(factor[1]) is not None else None
    ops = mul_operands(gm, node)
    if ops is not None:
        ok = all(isinstance(v, fx.Node) and not is_shape_value(v) for v in ops)
        return "mul" if ok else None
    if node.op == "call_function" and node.target in _TRANSPOSE_FUNCTIONS or \
            node.op == "call_method" and str(node.target) in ("transpose", "permute", "swapaxes", "swapdims"):
        return "transpose"
    if node.op == "call_function" and node.target in _UPSAMPLE_FUNCTIONS:
        if node.target in (F.interpolate, F.upsample) and argument(node, 3, "mode", "nearest") != "nearest":
            return None
        return "upsample_nearest"
    if node.op == "call_function" and node.target in _CONV_TRANSPOSE_FUNCTIONS:
        return "conv_transpose2d"
    if tensor_index(gm, node) is not None:
        return "slice"
    return None


def _index_entry(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int) or v is Ellipsis or is_shape_value(v):
        return True
    return isinstance(v, slice) and all(b is None or isinstance(b, int) and not isinstance(b, bool)
                                        or is_shape_value(b) for b in (v.start, v.stop, v.step))


def tensor_index(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, Any] | None:
    """``(x, index)`` of ``x[index]`` on an activation with ints and slices only (``x[:, 0]``,
    ``x[:, 1:]``, ``x[..., :d]``), or of ``pieces[i]`` of a ``split``/``chunk``; else ``None``
    (``None``/tensor indices, shape arithmetic such as ``x.shape[1]``)."""
    if not (node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2):
        return None
    x, index = node.args
    if not isinstance(x, fx.Node) or is_shape_value(x) or is_shape_value(node) or x.op == "get_attr":
        return None
    if table_kind(x) == "split":
        return (x, index) if isinstance(index, int) and not isinstance(index, bool) else None
    if not isinstance(index, tuple) and not (x.op == "placeholder" or _returns_tensor(gm, x)):
        return None  # ``outputs[0]`` of a call that may return a tuple
    entries = index if isinstance(index, tuple) else (index,)
    if entries and all(_index_entry(e) for e in entries) and sum(e is Ellipsis for e in entries) <= 1:
        return x, index
    return None


def _returns_tensor(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return module_kind(module) not in (None, "split") or type(module).__name__ == "FixedPointQuantizer"
    return node.op in ("call_function", "call_method") and node_kind(gm, node) not in (None, "split")


_METHOD_KINDS = {"relu": "relu", "add": "add", "flatten": "flatten", "view": "reshape",
                 "reshape": "reshape", "unsqueeze": "reshape", "squeeze": "reshape",
                 "contiguous": "identity", "detach": "identity", "matmul": "matmul", "clone": "identity",
                 "softmax": "softmax", "split": "split", "chunk": "split", "select": "slice", "narrow": "slice"}
_METHOD_FUNCTIONS = {"relu": torch.relu, "add": torch.add, "flatten": torch.flatten, "matmul": torch.matmul,
                     "unsqueeze": torch.unsqueeze, "squeeze": torch.squeeze, "softmax": torch.softmax,
                     "split": torch.split, "chunk": torch.chunk, "select": torch.select, "narrow": torch.narrow}

# shape arithmetic: what produces an int / a size, never a tensor
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement"})
_SHAPE_FUNCTIONS = frozenset({_aten.sym_size.int, _aten.sym_numel.default, _aten.sym_size.default,
                              torch.numel})
_INT_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                             operator.mod, operator.neg, operator.pow, operator.getitem, int})


# ------------------------------------------------------------------------------------ shape values
def is_shape_value(node: Any) -> bool:
    """``True`` for a node that computes an int or a size from shapes (never a tensor)."""
    return isinstance(node, fx.Node) and _shape_value(node)


def _shape_value(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return True
    if node.op != "call_function":
        return False
    if node.target in _SHAPE_FUNCTIONS:
        return True
    if node.target is getattr and len(node.args) > 1 and node.args[1] in ("shape", "ndim"):
        return True
    if node.target in _INT_ARITHMETIC:
        nodes = _nodes_in(node.args)
        return bool(nodes) and all(is_shape_value(a) for a in nodes)
    return False


def _nodes_in(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out


# ------------------------------------------------------------------------------------ normalization
def _arg_type(value: Any) -> Any:
    """The static type ``normalize_function`` matches schemas with (tensor, int, list of int…)."""
    if isinstance(value, fx.Node):
        return int if is_shape_value(value) else torch.Tensor
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, fx.Node) and not is_shape_value(v) for v in value):
            return typing.List[torch.Tensor]
        if all(isinstance(v, int) or is_shape_value(v) for v in value):
            return typing.List[int]
        return type(value)
    return type(value)


def _module_config(module: nn.Module) -> dict[str, Any]:
    """The functional arguments a module passes on (its configuration), by module type."""
    if isinstance(module, nn.Conv2d):
        return {"weight": module.weight, "bias": module.bias, "stride": module.stride, "padding": module.padding,
                "dilation": module.dilation, "groups": module.groups, "padding_mode": module.padding_mode}
    if isinstance(module, nn.Linear):
        return {"weight": module.weight, "bias": module.bias}
    if isinstance(module, nn.MaxPool2d):
        return {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                "dilation": module.dilation, "ceil_mode": module.ceil_mode, "return_indices": module.return_indices}
    if isinstance(module, nn.AvgPool2d):
        return {"kernel_size": module.kernel_size, "stride": module.stride, "padding": module.padding,
                "ceil_mode": module.ceil_mode, "count_include_pad": module.count_include_pad,
                "divisor_override": module.divisor_override}
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return {"output_size": module.output_size}
    if isinstance(module, nn.Flatten):
        return {"start_dim": module.start_dim, "end_dim": module.end_dim}
    if isinstance(module, nn.ConvTranspose2d):
        return {"weight": module.weight, "bias": module.bias, "stride": module.stride, "padding": module.padding,
                "output_padding": module.output_padding, "groups": module.groups, "dilation": module.dilation}
    if isinstance(module, nn.Upsample):
        return {"size": module.size, "scale_factor": module.scale_factor, "mode": module.mode}
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return {"p": module.p}
    if hasattr(module, "config"):  # fxquant's fake-quant ops
        return module.config()
    return {}


def call_arguments(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any] | None:
    """Every argument of a call in keyword form (``input``, ``weight``, ``stride``…), ``None`` if unknown.

    Modules give their functional equivalent's keywords (from the module's configuration);
    functions and aten overloads are normalized against their schema; tensor methods against the
    matching ``torch`` function (``view``/``reshape`` give ``shape``).
    """
    args, kwargs = node.args, dict(node.kwargs)
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        try:
            found = normalize_module(gm, str(node.target), args, kwargs, normalize_to_only_use_kwargs=True)
        except Exception:  # noqa: BLE001 - modules whose forward has no plain signature
            found = None
        out = dict(found.kwargs) if found is not None else ({"input": args[0]} if args else {})
        if "input" not in out and args:
            out["input"] = args[0]
        out.update(_module_config(module))
        return out
    if node.op == "call_method":
        name = str(node.target)
        if name in ("view", "reshape"):
            rest = args[1:]
            shape = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
            return {"input": args[0], "shape": kwargs.get("shape", kwargs.get("size", shape))}
        if name in ("contiguous", "detach", "size", "dim"):
            return {"input": args[0], **({"dim": args[1]} if len(args) > 1 else {}), **kwargs}
        target = _METHOD_FUNCTIONS.get(name)
        return _normalize_function(target, args, kwargs) if target is not None else None
    if node.op != "call_function":
        return None
    if node.target in (operator.add, operator.iadd, operator.matmul):
        return {"input": args[0], "other": args[1], **({"alpha": 1} if node.target is not operator.matmul else {})}
    return _normalize_function(node.target, args, kwargs)


def _normalize_function(target: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    try:
        found = normalize_function(target, args, kwargs, arg_types=tuple(_arg_type(a) for a in args),
                                   kwarg_types={k: _arg_type(v) for k, v in kwargs.items()},
                                   normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 - an unknown or ambiguous signature: the caller refuses the op
        return None
    return dict(found.kwargs) if found is not None else None


# ------------------------------------------------------------------------------------ kinds
def module_kind(module: nn.Module) -> str | None:
    fxq_kind = getattr(type(module), "fxq_kind", None)  # fxquant's own fake-quant ops (lut, avgpool)
    if fxq_kind is not None:
        return fxq_kind
    for cls, kind in _MODULE_KINDS:
        if isinstance(module, cls):
            return kind
    for cls, name in _LUT_MODULES:
        if isinstance(module, cls):
            return "lut" if _module_function(module, name) is not None else None
    if isinstance(module, nn.Upsample):
        return "upsample_nearest" if module.mode == "nearest" else None
    if is_stochastic_depth(module):
        return "identity"  # eval: identity (training: torchvision's row/batch drop)
    return None


def is_stochastic_depth(module: nn.Module) -> bool:
    """``torchvision.ops.StochasticDepth`` (recognised without importing torchvision)."""
    cls = type(module)
    return cls.__name__ == "StochasticDepth" and cls.__module__.startswith("torchvision")


def table_kind(node: fx.Node) -> str | None:
    """The kind the tables give a call's target, before any check of its operands."""
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target)
    return _METHOD_KINDS.get(str(node.target)) if node.op == "call_method" else None


def scaled_parameter(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w * scale``: a parameter with a folded constant scale
    (:func:`fxquant.passes.insert_quantizers.fold_constant_scales`), a graph node of its own (no op
    kind: parameter arithmetic in front of the weight quantizer, evaluated by the lowering)."""
    return w * scale


def _is_parameter(node: Any) -> bool:
    """A ``get_attr`` parameter, or :func:`scaled_parameter` of one."""
    return isinstance(node, fx.Node) and (node.op == "get_attr" or (
        node.op == "call_function" and node.target is scaled_parameter and _is_parameter(node.args[0])))


def _is_transposed_parameter(node: Any) -> bool:
    """``W.t()`` / ``W.T`` / ``aten.t(W)`` / ``aten.permute(W, [1, 0])`` of a parameter ``W``."""
    if not isinstance(node, fx.Node):
        return False
    transposes = (_aten.t.default, torch.t, _aten.permute.default, _aten.transpose.int)
    if node.op == "call_function" and node.target in transposes or \
            node.op == "call_method" and node.target in ("t", "permute", "transpose"):
        return _is_parameter(node.args[0])
    return False


def integer_valued(node: fx.Node) -> bool:
    """Whether capture recorded ``node``'s value as an integer or boolean tensor (token ids, index
    arithmetic such as HF's last-non-padding-token search): export's ``val`` or ShapeProp's
    ``tensor_meta``. Such values are never fixed-point activations."""
    val = node.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else getattr(node.meta.get("tensor_meta"), "dtype", None)
    return isinstance(dtype, torch.dtype) and not (dtype.is_floating_point or dtype.is_complex)


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The op kind of ``node`` (see module docstring), or ``None`` for other ops (a quantized kind
    computing on integer tensors, :func:`integer_valued`, is an integer op, not a quantized one)."""
    kind = _node_kind(gm, node)
    return None if kind in QUANTIZED_KINDS and integer_valued(node) else kind


def _node_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "call_module":
        return module_kind(gm.get_submodule(str(node.target)))
    if node.op == "call_function":
        kind = _FUNCTION_KINDS.get(node.target)
    elif node.op == "call_method":
        kind = _METHOD_KINDS.get(str(node.target))
    else:
        return None
    if kind is None:
        kind = _special_kind(gm, node)
        if kind == "conv_transpose2d" and not _functional_weighted(gm, node):
            return None
        return kind
    if kind == "add":
        a = call_arguments(gm, node) or {}
        operands = [a.get("input"), a.get("other")]
        if not all(isinstance(v, fx.Node) and not is_shape_value(v) for v in operands):
            return None  # adding a constant is not a residual add
    if kind in WEIGHTED_KINDS and not _functional_weighted(gm, node):
        return None  # a conv/linear on a computed weight is a float op
    return kind


def _functional_weighted(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``F.conv2d``/``F.linear``/``addmm`` whose weight is a parameter (``addmm``: ``bias + x @ W``)."""
    a = call_arguments(gm, node)
    if a is None:
        return False
    if node.target in (torch.addmm, _aten.addmm.default):
        return (a.get("beta", 1) == 1 and a.get("alpha", 1) == 1 and _is_parameter(a.get("input"))
                and (_is_parameter(a.get("mat2")) or _is_transposed_parameter(a.get("mat2"))))
    weight, bias = a.get("weight"), a.get("bias")
    if isinstance(weight, fx.Node) and weight.op == "call_module":  # quantized: the canonical form
        return True
    return (_is_parameter(weight) or _is_transposed_parameter(weight)) and (bias is None or _is_parameter(bias))


def tensor_inputs(node: fx.Node, gm: fx.GraphModule | None = None) -> list[fx.Node]:
    """The activation inputs of a node (weights, biases and shape arithmetic excluded)."""
    if node.op == "call_function" and node.target in (_aten.conv2d.default, _aten.linear.default,
                                                        _aten.conv_transpose2d.input):
        return [node.args[0]]
    if node.op == "call_module" and gm is not None and \
            getattr(type(gm.get_submodule(str(node.target))), "fxq_kind", None) is not None:
        return [node.args[0]]  # fxquant's fake-quant ops: the other arguments are formats
    if gm is not None and node.op in ("call_function", "call_method", "call_module"):
        kind = node_kind(gm, node)
        if kind == "mul_pow2":
            return [constant_factor(gm, node)[0]]
        if kind in ("lut", "clamp", "transpose", "upsample_nearest", "conv_transpose2d") and node.args and \
                isinstance(node.args[0], fx.Node):
            return [node.args[0]]
    if node.target in (torch.cat, _aten.cat.default):
        seq = node.args[0] if node.args else node.kwargs.get("tensors", ())
        return [a for a in seq if isinstance(a, fx.Node)]
    if gm is not None and node.op in ("call_function", "call_method"):
        a = call_arguments(gm, node)
        if a is not None:
            if node.target in (torch.addmm, _aten.addmm.default):
                return [a["mat1"]]
            if node.target in (torch.conv2d, F.linear, _aten.conv2d.padding, F.conv_transpose2d):
                return [a["input"]]
    return [a for a in _nodes_in((node.args, node.kwargs)) if not is_shape_value(a)]


# ------------------------------------------------------------------------------------ names
def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that issued ``node`` ("" at top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] for v in stack.values() if isinstance(v[0], str) and not v[0].startswith("_empty_nn_module")]
    return paths[-1] if paths else ""


def short_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A short op name for layer names: ``sigmoid``, ``gelu``, ``mul``…"""
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__.lower()
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._opname.rstrip("_")
    return getattr(target, "__name__", str(node.name)).rstrip("_")


def layer_name(gm: fx.GraphModule, node: fx.Node, kind: str) -> str:
    """Stable, human-readable layer name: the module path for Conv/Linear, ``<path>.<kind>`` else.

    A conv/linear issued as a function (``F.conv2d(x, self.conv.weight)``, export's aten form) is
    named after its weight's owner (``conv``), so both capture paths give the module's name.
    """
    if LAYER_META in node.meta:
        return node.meta[LAYER_META]
    path = module_path(node)
    if node.op == "call_module":
        return path
    if kind in WEIGHTED_KINDS or kind in ("embedding", "layernorm"):
        owner = weight_owner(gm, node)
        if owner:
            return owner
        if path:
            return path
    return f"{path}.{kind}" if path else kind


def weight_owner(gm: fx.GraphModule, node: fx.Node) -> str:
    """The module path owning a weighted call's parameter weight ("" if none)."""
    a = call_arguments(gm, node) or {}
    weight = a.get("mat2") if node.target in (torch.addmm, _aten.addmm.default) else a.get("weight")
    while isinstance(weight, fx.Node) and weight.op != "get_attr" and weight.args:
        weight = weight.args[0]  # through the weight quantizer / transpose
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        return str(weight.target).rpartition(".")[0]
    return ""


def readable_op(gm: fx.GraphModule, node: fx.Node) -> str:
    """``<module path>: <qualified op>`` (``features.3: torch.nn.functional.glu``), never an object repr."""
    if node.op == "call_module":
        cls = type(gm.get_submodule(str(node.target)))
        public = getattr(nn, cls.__name__, None) is cls
        what = f"torch.nn.{cls.__name__}" if public else f"{cls.__module__}.{cls.__qualname__}"
        return f"{node.target}: {what}"
    if node.op == "call_method":
        what = f"torch.Tensor.{node.target}"
    elif isinstance(node.target, torch._ops.OpOverload):
        what = f"aten.{node.target._opname}.{node.target._overloadname}"
    else:
        try:
            what = _get_qualified_name(node.target)
        except Exception:  # noqa: BLE001
            what = getattr(node.target, "__name__", "<unknown>")
        what = what.replace("torch._C._nn.", "torch.nn.functional.").replace("torch._VariableFunctionsClass.", "torch.")
        what = what.replace("_operator.", "operator.")
    path = module_path(node)
    return f"{path}: {what}" if path else what


_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+)')


def source_line(node: fx.Node) -> str | None:
    """``file:line: code`` of the user's source line that issued ``node`` (fx/export stack trace):
    the innermost recorded frame outside torch and fxquant."""
    lines = (node.meta.get("stack_trace") or "").splitlines()
    best = None
    for i, line in enumerate(lines):
        match = _FRAME.match(line)
        if match is None:
            continue
        path = match["file"].replace("\\", "/")
        if "/torch/" in path or "/fxquant/" in path or path.startswith("<"):
            continue
        code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.match(lines[i + 1]) else ""
        best = f"{match['file']}:{match['line']}: {code}"
    return best


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """:func:`readable_op` with the user's source line where fx or export recorded it."""
    where = source_line(node)
    return f"{readable_op(gm, node)} ({where})" if where else readable_op(gm, node)


# ------------------------------------------------------------------------------------ attention masks
MASK_FILL_LIMIT = -1e4
"""A fill (``masked_fill``, ``torch.where``) or additive bias factor at or below this is a mask
(``-inf``, ``-1e9``, ``torch.finfo(float32).min``): the entry's softmax weight is 0 in float."""
_MASKED_FILL = frozenset({torch.masked_fill, *_ops("masked_fill.Scalar")})
_WHERE = frozenset({torch.where, *_ops("where.ScalarOther", "where.self")})
_SUB = frozenset({operator.sub, torch.sub, torch.rsub, *_ops("sub.Tensor", "rsub.Scalar")})


def _mask_value(gm: fx.GraphModule, v: Any) -> bool:
    value = _constant_number(gm, v)
    return value is not None and value <= MASK_FILL_LIMIT


def _one_minus(node: Any) -> fx.Node | None:
    """``m`` of ``1 - m`` (``operator.sub(1, m)``, ``torch.rsub(m, 1)``, ``Tensor.rsub``), else ``None``."""
    if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    is_sub = node.target in _SUB if node.op == "call_function" else node.target in ("rsub", "__rsub__")
    if not is_sub or len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    reverse = node.target in (torch.rsub, "rsub", "__rsub__") or getattr(node.target, "_opname", "") == "rsub"
    one, m = (node.args[1], node.args[0]) if reverse else node.args[:2]
    return m if isinstance(m, fx.Node) and _number(one) and one == 1 else None


def mask_bias(gm: fx.GraphModule, node: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """``(m, nodes)`` of an additive mask ``(1 - m) * C`` with ``C <= MASK_FILL_LIMIT`` (Hugging
    Face's extended attention mask: ``m`` is 1 = keep, 0 = masked), else ``None``."""
    if not isinstance(node, fx.Node):
        return None
    ops = mul_operands(gm, node)
    if ops is None:
        return None
    for x, c in (ops, ops[::-1]):
        m = _one_minus(x)
        if m is not None and _mask_value(gm, c):
            return m, [node, x]
    return None


def masked_scores(gm: fx.GraphModule, value: fx.Node) -> tuple[fx.Node, list[tuple[str, fx.Node]], list[fx.Node]]:
    """The input of a softmax split into ``(scores, keep terms, mask nodes)``, peeling
    ``masked_fill(cond, fill)`` (keep = ``not cond``), ``torch.where(cond, x, fill)`` (keep =
    ``cond``) with a fill ``<= MASK_FILL_LIMIT``, and ``x + (1 - m) * C`` (keep = ``m != 0``).
    Terms are ``("not", cond)``, ``("keep", cond)`` or ``("nonzero", m)``; ``mask nodes`` are the
    peeled ops (they are replaced by the softmax's mask input)."""
    terms: list[tuple[str, fx.Node]] = []
    nodes: list[fx.Node] = []
    x = value
    while isinstance(x, fx.Node) and x.op in ("call_function", "call_method"):
        if (x.op == "call_method" and x.target in ("masked_fill", "masked_fill_") or x.target in _MASKED_FILL) \
                and len(x.args) >= 3 and isinstance(x.args[1], fx.Node) and _mask_value(gm, x.args[2]):
            terms.append(("not", x.args[1]))
            nodes.append(x)
            x = x.args[0]
            continue
        if x.op == "call_function" and x.target in _WHERE and len(x.args) == 3 and \
                isinstance(x.args[0], fx.Node) and _mask_value(gm, x.args[2]):
            terms.append(("keep", x.args[0]))
            nodes.append(x)
            x = x.args[1]
            continue
        if table_kind(x) == "add" and len(x.args) >= 2 and x.kwargs.get("alpha", 1) == 1:
            for a, b in (x.args[:2], x.args[1::-1]):
                found = mask_bias(gm, b)
                if found is not None and isinstance(a, fx.Node):
                    terms.append(("nonzero", found[0]))
                    nodes += [x, *found[1]]
                    x = a
                    break
            else:
                break
            continue
        break
    return x, terms, nodes
