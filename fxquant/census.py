"""Which compute a quantized graph leaves in float: the census training states and ``show`` prints.

Runs after :class:`~fxquant.passes.InsertQuantizers` (on the graph the trainer trains). Input: the
GraphModule and example inputs; output: a :class:`Census` listing every **compute op left in
float**, with its parameter count and multiply-accumulates per sample, and its share of the
model's parameters and MACs.

What counts as what, per graph node:

* **quantized compute**: a Conv2d/Linear/matmul node whose operands (input and weight, or both
  matmul inputs) all come out of a :class:`~fxquant.quantizers.FixedPointQuantizer`; an embedding
  whose table does (its token ids are integers); fxquant's integer softmax and LayerNorm ops
  (:class:`~fxquant.ops.fake_quant.FixedPointSoftmax`, ``FixedPointLayerNorm``, gamma and beta
  counted as their parameters). These are the layers ``mean bits`` averages over. A parameter
  used as an activation behind an activation quantizer (a ViT's class token, ``expand``-ed, and
  positional embedding) counts as quantized too, under that quantizer's layer: it deploys as a
  stored ``constant``.
* **float compute**: any other node that does multiply-accumulates (``MACs > 0``:
  ``F.scaled_dot_product_attention``, ``torch.bmm``, a Conv1d, the GEMMs inside an
  ``nn.MultiheadAttention`` or ``nn.LSTM``…) or that owns parameters (a leaf module such as
  ``nn.Embedding`` or ``nn.LayerNorm``, or a function reading a parameter directly). BatchNorm is
  not listed: it is folded into its conv before deployment (:class:`~fxquant.passes.FoldBatchNorm`).
* everything else (quantizers, adds, pooling, reshapes, activations) is neither.

The census is structural: a quantizer set to 32 bits (off) still makes its layer "quantized" here;
its width shows in the precision map and in ``mean bits``.

**MACs** are ``FLOPs / 2`` from :class:`torch.utils.flop_counter.FlopCounterMode`, measured **per
graph node** rather than per module: after ``InsertQuantizers`` a Conv2d/Linear is a functional
``aten`` call on the GraphModule (no submodule left to attribute to), and a ``torch.export`` graph
has no submodules at all; a node's module path comes from its ``nn_module_stack`` instead. The
example inputs are cut to one sample (MACs per sample). Two settings make the counter see every
GEMM: autograd stays enabled (``nn.MultiheadAttention``'s inference fast path, taken under
``no_grad``, is one fused op the counter has no formula for) and oneDNN is off for the run
(``nn.LSTM`` on CPU otherwise runs as one oneDNN kernel the counter does not see). Buffers the
forward touches (quantizer ``amax``, BN statistics) are restored afterwards.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxquant.errors import ModelFileError
from fxquant.passes.eval_probe import eval_probe
from fxquant.passes.op_kinds import LAYER_META, module_kind, module_path, node_kind, scaled_parameter
from fxquant.quantizers import WEIGHT, BiasQuantizer, FixedPointQuantizer

QUANTIZED_COMPUTE_KINDS = frozenset({"conv2d", "linear", "matmul", "conv_transpose2d"})
"""Node kinds that are quantized compute when every operand comes out of a quantizer."""


@dataclass(frozen=True)
class ComputeOp:
    """One compute op (or a group of nodes with the same module path and op)."""

    name: str  # "<module path>: <op>", e.g. "encoder.self_attn: nn.MultiheadAttention"
    params: int
    macs: int  # per sample


@dataclass
class Census:
    quantized: list[ComputeOp] = field(default_factory=list)
    float_ops: list[ComputeOp] = field(default_factory=list)
    total_params: int = 0
    total_macs: int = 0

    @property
    def float_macs(self) -> int:
        return sum(op.macs for op in self.float_ops)

    @property
    def float_params(self) -> int:
        return sum(op.params for op in self.float_ops)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (``run.json``'s ``census``); :func:`census_lines` reads it back."""
        def share(part: int, whole: int) -> float:
            return part / whole if whole else 0.0

        return {"quantized_layers": len(self.quantized),
                "quantized_macs": sum(op.macs for op in self.quantized),
                "quantized_params": sum(op.params for op in self.quantized),
                "total_macs": self.total_macs, "total_params": self.total_params,
                "float": [{**asdict(op), "params_share": share(op.params, self.total_params),
                           "macs_share": share(op.macs, self.total_macs)} for op in self.float_ops]}


def _op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        cls = type(gm.get_submodule(str(node.target)))
        return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else f"{cls.__module__}.{cls.__name__}"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # aten.bmm.default
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    if getattr(torch.nn.functional, name, None) is target:  # builtins report torch._C._nn as their module
        return f"F.{name}"
    if getattr(torch, name, None) is target:
        return f"torch.{name}"
    return f"{module}.{name}" if module else name


def _display_name(gm: fx.GraphModule, node: fx.Node) -> str:
    path = module_path(node)
    return f"{path}: {_op_name(gm, node)}" if path else _op_name(gm, node)


def _is_quantizer(gm: fx.GraphModule, node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_module" and \
        isinstance(gm.get_submodule(str(node.target)), (FixedPointQuantizer, BiasQuantizer))


def _node_params(gm: fx.GraphModule, node: fx.Node, params: dict[str, nn.Parameter]) -> dict[str, int]:
    """Parameters a node computes with: a leaf module's own, or get_attr parameters (through a quantizer)."""
    if node.op == "call_module" and not hasattr(type(gm.get_submodule(str(node.target))), "fxq_kind"):
        return {f"{node.target}.{n}": p.numel() for n, p in gm.get_submodule(str(node.target)).named_parameters()}
    found: dict[str, int] = {}
    for arg in node.all_input_nodes:
        sources = [arg]
        if _is_quantizer(gm, arg):
            sources = [a for a in arg.all_input_nodes]
        sources = [src.args[0] if _is_transposed_parameter(src) else src for src in sources]
        for src in sources:
            if src.op == "get_attr" and str(src.target) in params:
                found[str(src.target)] = params[str(src.target)].numel()
    return found


_TRANSPOSES = frozenset({torch.ops.aten.t.default, torch.t, torch.ops.aten.permute.default,
                         torch.ops.aten.transpose.int})


def _is_transposed_parameter(node: fx.Node) -> bool:
    """``aten.t(W)`` of a parameter (how a Hugging Face ``Conv1D`` weight, stored ``(in, out)``,
    reaches its linear's weight quantizer) or ``scaled_parameter(W, s)`` (a folded attention scale):
    its parameter belongs to the linear that reads it."""
    return node.op == "call_function" and (node.target in _TRANSPOSES or node.target is scaled_parameter) and \
        bool(node.args) and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"


def _quantized_layer(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The layer name of a quantized compute node (module docstring), else ``None``."""
    kind = node_kind(gm, node)
    if kind in ("softmax", "layernorm") and node.op == "call_module":  # fxquant's integer fake-quant ops
        module = gm.get_submodule(str(node.target))
        return module.layer if hasattr(type(module), "fxq_kind") else None
    if kind == "embedding":  # F.embedding(ids, q_w(table)): the ids are integers
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        quantized = _is_quantizer(gm, weight) and isinstance(gm.get_submodule(str(weight.target)), FixedPointQuantizer)
        return gm.get_submodule(str(weight.target)).layer if quantized else None
    if not _is_quantized_compute(gm, node):
        return None
    from fxquant.passes.insert_quantizers import grid_quantizer

    q = gm.get_submodule(str((grid_quantizer(gm, node.args[1]) or node.args[1]).target))
    if kind == "matmul" and q.role != WEIGHT and LAYER_META in node.meta:
        return node.meta[LAYER_META]  # activation x activation: the matmul's own layer, not its operand's
    return q.layer


def _activation_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not _is_quantizer(gm, node):
        return False
    q = gm.get_submodule(str(node.target))
    return isinstance(q, FixedPointQuantizer) and q.role != WEIGHT


def _is_quantized_compute(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node_kind(gm, node) not in QUANTIZED_COMPUTE_KINDS or len(node.args) < 2:
        return False
    from fxquant.passes.insert_quantizers import grid_quantizer

    args = [grid_quantizer(gm, a) or a if isinstance(a, fx.Node) else a for a in node.args[:2]]
    return all(isinstance(a, fx.Node) and _is_quantizer(gm, a) and
               isinstance(gm.get_submodule(str(a.target)), FixedPointQuantizer) for a in args)


class _MacCounter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: Any) -> None:
        super().__init__(gm)
        self.counter = counter
        self.macs: dict[fx.Node, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        try:
            out = super().run_node(n)
        except Exception as exc:  # noqa: BLE001 - the model's own forward failed: name the node, keep the cause
            raise ModelFileError(f"the model failed on its example inputs at node {n.name!r} "
                                 f"({_display_name(self.module, n)}): {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}",
                                 "check example_inputs() (shapes, dtypes) against model()") from exc
        self.macs[n] = (self.counter.get_total_flops() - before) // 2
        return out


def node_macs(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> dict[fx.Node, int]:
    """MACs per sample of every node of ``gm`` (eval mode; buffers restored; see module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    one = tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in example_inputs)
    mkldnn = torch.backends.mkldnn.enabled
    try:
        torch.backends.mkldnn.enabled = False
        with eval_probe(gm), torch.enable_grad(), FlopCounterMode(display=False) as counter:
            interp = _MacCounter(gm, counter)
            interp.run(*one)
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    return interp.macs


def take_census(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> Census:
    """The :class:`Census` of ``gm`` (quantizers already inserted) on ``example_inputs``."""
    macs = node_macs(gm, example_inputs)
    params = dict(gm.named_parameters())
    quantized: dict[str, list[int]] = {}
    floating: dict[str, list[int]] = {}
    counted: set[str] = set()
    for node in gm.graph.nodes:  # parameters an activation quantizer reads: constants the graph stores
        if node.op == "get_attr" and str(node.target) in params and node.users and \
                all(_activation_quantizer(gm, u) for u in node.users):
            entry = quantized.setdefault(gm.get_submodule(str(next(iter(node.users)).target)).layer, [0, 0])
            entry[0] += params[str(node.target)].numel()
            counted.add(str(node.target))
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or _is_quantizer(gm, node):
            continue
        if node.op == "call_module" and module_kind(gm.get_submodule(str(node.target))) == "batchnorm":
            continue  # folded into its conv at deployment
        if node.op == "call_function" and node_kind(gm, node) == "batchnorm":
            continue
        if _is_transposed_parameter(node) and node.users and all(_is_quantizer(gm, u) for u in node.users):
            continue  # a weight on its way to its quantizer: counted with the layer that reads it
        node_params = {k: v for k, v in _node_params(gm, node, params).items() if k not in counted}
        m = macs.get(node, 0)
        layer = _quantized_layer(gm, node)
        if layer is None and node_params and m == 0 and node.users and \
                all(_activation_quantizer(gm, u) for u in node.users):  # token.expand(N, -1, -1) -> q_act
            layer = gm.get_submodule(str(next(iter(node.users)).target)).layer
        if layer is not None:
            bucket, name = quantized, layer
        elif m > 0 or node_params:
            bucket, name = floating, _display_name(gm, node)
        else:
            continue
        counted.update(node_params)
        entry = bucket.setdefault(name, [0, 0])
        entry[0] += sum(node_params.values())
        entry[1] += m
    return Census(quantized=[ComputeOp(n, p, m) for n, (p, m) in quantized.items()],
                  float_ops=[ComputeOp(n, p, m) for n, (p, m) in floating.items()],
                  total_params=sum(p.numel() for p in params.values()),
                  total_macs=sum(macs.values()))


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return str(n)


def _layers(n: int) -> str:
    return f"{n} quantized layer" + ("" if n == 1 else "s")


def census_lines(census: dict[str, Any]) -> list[str]:
    """Human lines for a census dict (:meth:`Census.to_dict`): one per float op, or "all quantized"."""
    q = census["quantized_layers"]
    total_macs, total_params = census["total_macs"], census["total_params"]
    q_share = 100.0 * census["quantized_macs"] / total_macs if total_macs else 0.0
    if not census["float"]:
        return [f"census: all compute is quantized ({_layers(q)}, {_count(total_macs)} MACs/sample)"]
    lines = [f"census: {_layers(q)} ({q_share:.1f} % of MACs); left in float (no quantizer):"]
    for op in census["float"]:
        lines.append(f"  float {op['name']}: {_count(op['params'])} params ({100 * op['params_share']:.1f} % of "
                     f"{_count(total_params)}), {_count(op['macs'])} MACs/sample ({100 * op['macs_share']:.1f} % of "
                     f"{_count(total_macs)})")
    return lines


def mean_bits_line(weight_bits: float, act_bits: float, census: dict[str, Any] | None) -> str:
    """``mean bits W…/A… over N quantized layers (x % of MACs); float: …`` (what the mean covers)."""
    text = f"mean bits W{weight_bits:.2f}/A{act_bits:.2f}"
    if census is None:
        return text + " (quantized layers only; no census recorded)"
    total = census["total_macs"]
    share = 100.0 * census["quantized_macs"] / total if total else 0.0
    text += f" over {_layers(census['quantized_layers'])} ({share:.1f} % of MACs)"
    if census["float"]:
        text += "; float: " + ", ".join(f"{op['name']} ({100 * op['macs_share']:.1f} % of MACs)"
                                       for op in census["float"])
    return text


__all__ = ["Census", "ComputeOp", "census_lines", "mean_bits_line", "node_macs", "take_census"]
