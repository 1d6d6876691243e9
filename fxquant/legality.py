"""Legality rules shared by every backend: the one place each rule is written.

:mod:`fxquant.fixed_point` holds the arithmetic of ``<BW,FL>``; this module holds the rules a
target applies to decide whether it can build an :class:`~fxquant.integer_graph.IntegerGraph`.
Every rule returns :class:`~fxquant.backends.base.Problem` records (one per offending layer, all
at once) and never raises; a target's ``check_graph`` combines the rules it needs with its
declared limits, so a width a kernel cannot hold is refused by ``check``, never cast.

Rules:

* **widths** — weight and activation ``BW`` within a target's ``[lo, hi]``.
* **accumulator** — worst-case ``|acc|`` (:meth:`IntegerGraph.accumulator_bound`) fits a signed
  ``acc_bits`` register: ``bound <= 2^(acc_bits-1) - 1``.
* **average windows** — an average pool divides by a power of two only:
  ``window = kh*kw = 2^p``, the window sum is requantized from ``FL_in + p``
  (:func:`avg_window_shift`).
* **shifts** — a requantize shift ``FL_out - FL_acc`` within a target's ``[lo, hi]``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from fxquant.backends.base import Problem
    from fxquant.integer_graph import IntegerGraph, Op


def _problem(op: "Op", reason: str) -> "Problem":
    from fxquant.backends.base import Problem

    return Problem(op.name, op.kind, reason)


def int_max(bits: int) -> int:
    """Largest signed ``bits``-bit integer, ``2^(bits-1) - 1``."""
    return (1 << (bits - 1)) - 1


def avg_window_shift(kernel: Iterable[int]) -> int | None:
    """``p`` with ``prod(kernel) == 2^p``, or ``None`` when the window is not a power of two."""
    size = math.prod(int(k) for k in kernel)
    p = size.bit_length() - 1
    return p if size >= 1 and (1 << p) == size else None


def width_problems(graph: "IntegerGraph", *, weight_bits: tuple[int, int] | None = None,
                   act_bits: tuple[int, int] | None = None) -> list["Problem"]:
    """Layers whose weight or output (activation) width is outside the given inclusive ranges."""
    problems = []
    for op in graph.ops:
        if weight_bits and op.weight_fmt is not None and not weight_bits[0] <= op.weight_fmt.bits <= weight_bits[1]:
            problems.append(_problem(op, f"{op.weight_fmt.bits}-bit weights; this target holds "
                                         f"{weight_bits[0]}-{weight_bits[1]} bits"))
        if act_bits and op.out_fmt is not None and not act_bits[0] <= op.out_fmt.bits <= act_bits[1]:
            problems.append(_problem(op, f"{op.out_fmt.bits}-bit output; this target holds "
                                         f"{act_bits[0]}-{act_bits[1]}-bit activations"))
    if act_bits:
        from fxquant.backends.base import Problem

        for v in graph.inputs:
            if not act_bits[0] <= v.fmt.bits <= act_bits[1]:
                problems.append(Problem(v.name, "input", f"{v.fmt.bits}-bit input; this target holds "
                                                         f"{act_bits[0]}-{act_bits[1]}-bit activations"))
    return problems


def accumulator_problems(graph: "IntegerGraph", acc_bits: int = 32,
                         kinds: Iterable[str] = ("conv2d", "linear", "matmul", "add", "avgpool2d")) -> list["Problem"]:
    """Ops of ``kinds`` whose worst-case accumulator does not fit a signed ``acc_bits`` register."""
    kinds = set(kinds)
    return [_problem(op, f"worst-case accumulator {bound} exceeds int{acc_bits}")
            for op in graph.ops if op.kind in kinds
            for bound in [graph.accumulator_bound(op)] if bound > int_max(acc_bits)]


def avg_window_problems(graph: "IntegerGraph") -> list["Problem"]:
    """Average pools whose window is not a power of two, or that pad."""
    problems = []
    for op in graph.ops:
        if op.kind != "avgpool2d":
            continue
        if avg_window_shift(op.attrs["kernel"]) is None:
            problems.append(_problem(op, f"average window {op.attrs['kernel']} is not a power of two"))
        if tuple(op.attrs.get("padding", (0, 0))) != (0, 0):
            problems.append(_problem(op, f"average pooling with padding {op.attrs['padding']}"))
    return problems


def requantize_shift(graph: "IntegerGraph", op: "Op") -> int | None:
    """``FL_out - FL_acc`` of a requantizing op (``None`` for ops that do not requantize)."""
    ins = [graph.values[i].fmt.frac_bits for i in op.inputs]
    if op.out_fmt is None or not ins:
        return None
    if op.kind in ("conv2d", "linear"):
        acc = ins[0] + op.weight_fmt.frac_bits
    elif op.kind == "matmul":
        acc = ins[0] + ins[1]
    elif op.kind == "add":
        acc = max(ins)
    elif op.kind == "avgpool2d":
        acc = ins[0] + (avg_window_shift(op.attrs["kernel"]) or 0)
    elif op.kind == "requantize":
        acc = ins[0]
    else:
        return None
    return op.out_fmt.frac_bits - acc


def shift_problems(graph: "IntegerGraph", lo: int, hi: int) -> list["Problem"]:
    """Requantizing ops whose shift ``FL_out - FL_acc`` is outside ``[lo, hi]``."""
    return [_problem(op, f"requantize shift {s} outside this target's range [{lo}, {hi}]")
            for op in graph.ops for s in [requantize_shift(graph, op)] if s is not None and not lo <= s <= hi]


__all__ = ["accumulator_problems", "avg_window_problems", "avg_window_shift", "int_max", "requantize_shift",
           "shift_problems", "width_problems"]
