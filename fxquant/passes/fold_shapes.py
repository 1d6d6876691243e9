"""Fold shape arithmetic to constants, keeping only the batch (and sequence) sizes symbolic.

Runs at the end of :func:`~fxquant.passes.capture`, when example inputs are known. The graph is
run (eval mode, no grad, buffers restored) at the example inputs and at **other sizes**: the batch
grown by one, and — for integer inputs of two or more dimensions (token ids, masks) — the
sequence (dim 1) one shorter too (shorter: a sequence at the model's maximum length cannot
grow), when the model accepts it. Every node whose result is not a
tensor (``x.size(1)``, ``x.shape``, ``h == 32``, ``d ** -0.5``, a dtype) and is the same in every
run is a constant: its uses read the constant and the node goes. What stays depends on the batch
or sequence length and is written one way, ``aten.sym_size.int(x, d)`` (from ``x.size(d)``,
``x.shape[d]``, ``x.size()[d]``), followed by int arithmetic::

    getattr(x, "shape")[0]  ·  x.shape[1] * x.shape[2]  ·  torch._assert(h == 32, …)
        →  sym_size.int(x, 0)  ·  64  ·  (removed: the condition is the constant True)

``torch._assert`` / ``aten._assert_scalar`` calls whose condition folds to ``True`` are removed;
one that folds to ``False`` would have failed in the runs above already.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from fxquant.passes.eval_probe import eval_probe

_aten = torch.ops.aten
_ASSERTS = frozenset({torch._assert, _aten._assert_scalar.default, _aten._assert_async.msg})
_CONSTANT_TYPES = (bool, int, float, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


def _constant(value: Any) -> bool:
    if isinstance(value, _CONSTANT_TYPES):
        return True
    if isinstance(value, (tuple, list)):  # torch.Size is a tuple
        return all(_constant(v) for v in value)
    return False


def _as_literal(value: Any) -> Any:
    """A value fx can print as a literal (``torch.Size`` → ``tuple``)."""
    if isinstance(value, torch.Size):
        return tuple(int(v) for v in value)
    if isinstance(value, (tuple, list)):
        return type(value)(_as_literal(v) for v in value)
    return value


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op in ("call_function", "call_method") and not isinstance(out, torch.Tensor):
            self.values[n] = out
        return out


def _grow(x: Any, dim: int) -> Any:
    """``x`` one longer along ``dim`` (its first slice repeated)."""
    if not isinstance(x, torch.Tensor) or x.dim() <= dim:
        return x
    return torch.cat([x, x.narrow(dim, 0, 1)], dim=dim)


def _token_like(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() >= 2 and not x.is_floating_point() and x.shape[1] > 2


def variants(example_inputs: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Other input sizes the graph must run at: batch + 1, and batch + 1 with sequence - 1 for
    integer (token) inputs."""
    out = [tuple(_grow(x, 0) for x in example_inputs)]
    if any(_token_like(x) for x in example_inputs):
        out.append(tuple(_grow(x.narrow(1, 0, x.shape[1] - 1), 0) if _token_like(x) else _grow(x, 0)
                         for x in example_inputs))
    return out


def _record(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> dict[fx.Node, Any] | None:
    rec = _Recorder(gm)
    with eval_probe(gm), torch.no_grad():
        try:
            rec.run(*inputs)
        except Exception:  # noqa: BLE001 - the model does not run at these sizes: they stay static
            return None
    return rec.values


_SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "get_device"})
_SHAPE_ATTRS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda"})
_SHAPE_FUNCTIONS = frozenset({_aten.sym_size.int, _aten.sym_size.default, _aten.sym_numel.default,
                              _aten.sym_stride.int, torch.numel})


def _shape_derived(gm: fx.GraphModule, values: dict[fx.Node, Any]) -> set[fx.Node]:
    """Non-tensor nodes computed from tensor metadata only (size, dim, dtype…, and arithmetic on
    those): never a value read from a tensor's contents (``x.max().item()`` may repeat across runs)."""
    derived: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node not in values:
            continue
        if node.op == "call_method" and node.target in _SHAPE_METHODS or \
                node.op == "call_function" and (node.target in _SHAPE_FUNCTIONS or
                                                node.target is getattr and node.args[1] in _SHAPE_ATTRS):
            derived.add(node)
        elif all(n in derived for n in node.all_input_nodes):
            derived.add(node)
    return derived


def _sym_size_form(node: fx.Node, value: Any) -> tuple[fx.Node, int] | None:
    """``(x, d)`` for ``x.shape[d]`` / ``x.size()[d]`` / ``x.size(d)`` with a constant ``d``."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and isinstance(node.args[1], int):
        return node.args[0], node.args[1]
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int):
        src = node.args[0]
        if isinstance(src, fx.Node) and (
                src.op == "call_function" and src.target is getattr and src.args[1:] == ("shape",) or
                src.op == "call_method" and src.target == "size" and len(src.args) == 1):
            return src.args[0], node.args[1]
    return None


def fold_shapes(gm: fx.GraphModule, example_inputs: tuple[Any, ...]) -> bool:
    """Fold ``gm``'s constant shape arithmetic (module docstring); returns whether it changed.

    Raises whatever the graph raises at the example inputs (the caller reports it).
    """
    if not any(n.op == "call_method" and n.target in _SHAPE_METHODS or n.op == "call_function" and (
            n.target in _SHAPE_FUNCTIONS or n.target is getattr and n.args[1] in _SHAPE_ATTRS) for n in gm.graph.nodes):
        return False  # nothing reads a shape
    base = _record(gm, tuple(example_inputs))
    if base is None:
        return False
    runs = [base] + [r for r in (_record(gm, v) for v in variants(tuple(example_inputs))) if r is not None]
    graph = gm.graph
    derived = _shape_derived(gm, base)
    changed = False
    for node in list(graph.nodes):
        if node not in derived or node.target in _ASSERTS:
            continue
        values = [r.get(node) for r in runs]
        if _constant(values[0]) and all(type(v) is type(values[0]) and v == values[0] for v in values[1:]):
            literal = _as_literal(values[0])
            for user in list(node.users):
                _replace_input(user, node, literal)
            changed = True
            continue
        form = _sym_size_form(node, values[0])
        if form is not None and isinstance(values[0], int):
            x, d = form
            with graph.inserting_before(node):
                sym = graph.call_function(_aten.sym_size.int, (x, d))
            sym.meta.update(node.meta)
            node.replace_all_uses_with(sym)
            changed = True
    for node in list(graph.nodes):  # asserts on conditions that are now constants
        if node.op == "call_function" and node.target in _ASSERTS and node.args and not isinstance(node.args[0], fx.Node):
            graph.erase_node(node)
            changed = True
    if changed:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return changed


def _replace_input(user: fx.Node, old: fx.Node, literal: Any) -> None:
    """``user``'s arguments with ``old`` replaced by a literal value (fx's own helper takes nodes only)."""
    user.args = fx.node.map_arg(user.args, lambda n: literal if n is old else n)
    user.kwargs = fx.node.map_arg(user.kwargs, lambda n: literal if n is old else n)


__all__ = ["fold_shapes", "variants"]
