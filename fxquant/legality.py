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
* **average windows** — an average pool divides its window sum by ``d`` cells as a multiply by
  ``M`` and a requantize from ``FL_in + s``, ``(M, s) = fixed_point.reciprocal(d)`` (``M = 1,
  s = p`` for ``d = 2^p``). A target without the multiply takes power-of-two windows only,
  unpadded and without ceil-mode edge windows (:func:`avg_window_problems`).
* **tables** — a ``lut`` input has at most :data:`~fxquant.fixed_point.MAX_LUT_BITS` bits and its
  table ``2^BW_in`` entries, each within the output format (:func:`lut_problems`).
* **shifts** — a requantize shift ``FL_out - FL_acc`` within a target's ``[lo, hi]``.
* **windows** — max pooling pads at most half its window (``2 pad <= kernel``: a window never
  lies wholly in the padding); dilation and a ``ceil_mode`` that adds an edge window only where a
  target implements them (:func:`window_problems`).
* **transformer kinds** — the bounds of ``embedding``, ``softmax``, ``layernorm``, ``slice`` and ``constant``
  (:func:`transformer_problems`; every target that builds one of them applies it): ids at ``<BW,0>``
  addressing every row, the softmax table at most ``2^MAX_LUT_BITS`` entries and its row sum within
  int32, the layernorm ``D`` within ``2^62`` and rows of at most :data:`LAYERNORM_MAX_ROW`, resolved
  slices and last-axis normalizations.
* **shapes** — kernels a target lacks: grouped convolution, ``linear`` on an input of rank other
  than 1 (batch excluded), value formats with no integer form (``BW = 32`` is *off*), more graph
  inputs or outputs than a target's runner takes.

Kernel-level bounds (a packed kernel's offsets change its worst case) are computed with
:func:`dot_bound` / :func:`add_bound` and checked with :func:`fits` by the backend that chose the
kernel, at ``check`` time and again (as a guard, :func:`require_fits`) where the kernel is built.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import numpy as np

    from fxquant.backends.base import Problem
    from fxquant.integer_graph import IntegerGraph, Op


def _problem(op: "Op", reason: str) -> "Problem":
    from fxquant.backends.base import Problem

    return Problem(op.name, op.kind, reason)


def int_max(bits: int) -> int:
    """Largest signed ``bits``-bit integer, ``2^(bits-1) - 1``."""
    return (1 << (bits - 1)) - 1


def fits(bound: int, acc_bits: int = 32) -> bool:
    """The accumulator rule: a worst case ``|acc| <= bound`` fits a signed ``acc_bits`` register."""
    return bound <= int_max(acc_bits)


def require_fits(bound: int, what: str, acc_bits: int = 32) -> None:
    """:func:`fits` as a build-time guard: :class:`~fxquant.errors.UnsupportedOpError` naming ``what``."""
    if not fits(bound, acc_bits):
        from fxquant.errors import UnsupportedOpError

        raise UnsupportedOpError(f"{what}: the accumulator can reach {bound}, beyond int{acc_bits}",
                                 "use fewer weight/activation bits or a smaller fan-in")


def dot_bound(weight: "np.ndarray", bias: "np.ndarray | None", act_max: int, weight_offset: int = 0) -> int:
    """Worst case ``max_o (act_max * sum_k (|w[o,k]| + weight_offset) + |b[o]|)`` of a dot product.

    ``act_max`` is the largest activation magnitude the kernel multiplies (``2^(BW_in-1)``, or 256
    for an offset ``x + 128``); ``weight_offset`` a constant a packed kernel adds to ``|w|``.
    """
    import numpy as np

    w = np.abs(np.asarray(weight, dtype=np.int64)).reshape(np.shape(weight)[0], -1) + weight_offset
    b = np.zeros(w.shape[0], np.int64) if bias is None else np.abs(np.asarray(bias, dtype=np.int64))
    return int((w.sum(axis=1) * act_max + b).max())


def add_bound(lefts: Iterable[int], bits: Iterable[int]) -> int:
    """Worst case ``sum_i 2^(BW_i-1) << left_i`` of an add aligning its inputs by left shifts."""
    return sum((1 << (b - 1)) << left for left, b in zip(lefts, bits))


def avg_window_shift(kernel: Iterable[int]) -> int | None:
    """``p`` with ``prod(kernel) == 2^p``, or ``None`` when the window is not a power of two."""
    size = math.prod(int(k) for k in kernel)
    p = size.bit_length() - 1
    return p if size >= 1 and (1 << p) == size else None


def require_avg_window(kernel: Iterable[int], padding: Iterable[int], what: str) -> int:
    """The average-window rule as a guard: ``p`` of a ``2^p`` window without padding, else
    :class:`~fxquant.errors.UnsupportedOpError` naming ``what``."""
    kernel, padding = tuple(int(k) for k in kernel), tuple(int(q) for q in padding)
    p = avg_window_shift(kernel)
    if p is None or any(padding):
        from fxquant.errors import UnsupportedOpError

        raise UnsupportedOpError(f"{what}: average pooling over {kernel} with padding {padding} is not "
                                 "integer-exact", "use a power-of-two window without padding")
    return p


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


def fit_problems(graph: "IntegerGraph") -> list["Problem"]:
    """Weights whose integers need more bits than their format, biases wider than ``BIAS_BITS``:
    a backend storing them at the declared width would wrap them."""
    from fxquant.fixed_point import BIAS_BITS, min_signed_bits

    problems = []
    for op in graph.ops:
        if op.weight is not None and op.weight_fmt is not None and op.weight.size:
            need = min_signed_bits(op.weight)
            if need > op.weight_fmt.bits:
                problems.append(_problem(op, f"weights need {need} bits, more than their {op.weight_fmt.bits}-bit "
                                             "format"))
        if op.bias is not None and op.bias.size and min_signed_bits(op.bias) > BIAS_BITS:
            problems.append(_problem(op, f"biases need {min_signed_bits(op.bias)} bits, more than {BIAS_BITS}"))
    return problems


def accumulator_problems(graph: "IntegerGraph", acc_bits: int = 32,
                         kinds: Iterable[str] = ("conv2d", "linear", "matmul", "add", "avgpool2d", "mul",
                                                  "conv_transpose2d")) -> list["Problem"]:
    """Ops of ``kinds`` whose worst-case accumulator does not fit a signed ``acc_bits`` register."""
    kinds = set(kinds)
    return [_problem(op, f"worst-case accumulator {bound} exceeds int{acc_bits}")
            for op in graph.ops if op.kind in kinds
            for bound in [graph.accumulator_bound(op)] if not fits(bound, acc_bits)]


def ceil_adds_window(graph: "IntegerGraph", op: "Op") -> bool:
    """Whether ``op``'s ``ceil_mode`` gives it more windows than floor mode (a partial edge window)."""
    from fxquant.integer_graph import pool_output_size

    if not op.attrs.get("ceil_mode"):
        return False
    dims = graph.values[op.inputs[0]].shape[1:]
    args = zip(dims, op.attrs["kernel"], op.attrs.get("stride", op.attrs["kernel"]), op.attrs.get("padding", (0, 0)),
               op.attrs.get("dilation", (1, 1)))
    return any(pool_output_size(n, k, s, p, d, True) != pool_output_size(n, k, s, p, d, False)
               for n, k, s, p, d in args)


def avg_window_problems(graph: "IntegerGraph", *, reciprocal: bool = False) -> list["Problem"]:
    """Average pools a target cannot build. ``reciprocal``: the target implements the rounded
    reciprocal multiply (any window, padding, ceil mode: :func:`fxquant.integer_graph.avg_divisors`);
    without it, a window that is not a power of two, padding, or a ceil-mode edge window."""
    problems = []
    for op in graph.ops:
        if op.kind != "avgpool2d" or reciprocal:
            continue
        if avg_window_shift(op.attrs["kernel"]) is None:
            problems.append(_problem(op, f"average window {tuple(op.attrs['kernel'])} is not a power of two"))
        if tuple(op.attrs.get("padding", (0, 0))) != (0, 0):
            problems.append(_problem(op, f"average pooling with padding {tuple(op.attrs['padding'])}"))
        if ceil_adds_window(graph, op):
            problems.append(_problem(op, "average pooling with a ceil_mode edge window"))
    return problems


def lut_problems(graph: "IntegerGraph", max_bits: int | None = None) -> list["Problem"]:
    """Tables on inputs wider than ``max_bits`` (default :data:`~fxquant.fixed_point.MAX_LUT_BITS`),
    of the wrong size, or with entries outside the output format."""
    import numpy as np

    from fxquant.fixed_point import MAX_LUT_BITS

    max_bits = MAX_LUT_BITS if max_bits is None else max_bits
    problems = []
    for op in graph.ops:
        if op.kind != "lut":
            continue
        bits = graph.values[op.inputs[0]].fmt.bits
        table = np.asarray(op.attrs.get("table", ()), dtype=np.int64)
        if bits > max_bits:
            problems.append(_problem(op, f"table on a {bits}-bit input; this target takes at most {max_bits} bits"))
        elif table.size != 1 << bits:
            problems.append(_problem(op, f"table of {table.size} entries for a {bits}-bit input"))
        elif op.out_fmt is not None and table.size and (table.min() < op.out_fmt.qmin or table.max() > op.out_fmt.qmax):
            problems.append(_problem(op, f"table entries outside the output format {op.out_fmt}"))
    return problems


def window_problems(graph: "IntegerGraph", *, dilation: bool = False, ceil_mode: bool = False) -> list["Problem"]:
    """Max pools padding more than half their window; dilated ones (unless ``dilation``) and ones
    whose ``ceil_mode`` adds an edge window (unless ``ceil_mode``)."""
    problems = []
    for op in graph.ops:
        if op.kind == "maxpool2d":
            kernel, padding = tuple(op.attrs["kernel"]), tuple(op.attrs.get("padding", (0, 0)))
            if any(2 * p > k for p, k in zip(padding, kernel)):
                problems.append(_problem(op, f"max pooling padding {padding} exceeds half the window {kernel}"))
            if not dilation and tuple(op.attrs.get("dilation", (1, 1))) != (1, 1):
                problems.append(_problem(op, f"max pooling with dilation {tuple(op.attrs['dilation'])}"))
            if not ceil_mode and ceil_adds_window(graph, op):
                problems.append(_problem(op, "max pooling with a ceil_mode edge window"))
    return problems


def format_problems(graph: "IntegerGraph") -> list["Problem"]:
    """Values and weights whose format has no integer form (``BW = 32`` is off, or no ``FL``)."""
    from fxquant.backends.base import Problem

    producer = {op.output: op for op in graph.ops}
    problems = []
    for v in graph.values.values():
        if v.fmt.is_off or v.fmt.frac_bits is None:
            op = producer.get(v.name)
            problems.append(Problem(op.name if op else v.name, op.kind if op else "input",
                                    f"value {v.name!r} has format {v.fmt}, which has no integer form"))
    for op in graph.ops:
        if op.weight_fmt is not None and (op.weight_fmt.is_off or op.weight_fmt.frac_bits is None):
            problems.append(_problem(op, f"weight format {op.weight_fmt} has no integer form"))
    return problems


def shape_problems(graph: "IntegerGraph", *, groups: bool = False, max_inputs: int | None = None,
                   max_outputs: int | None = None, add_arity: int | None = None,
                   linear_any_rank: bool = False) -> list["Problem"]:
    """Grouped convolutions (unless ``groups``), ``linear`` on an input that is not a vector (unless
    ``linear_any_rank``: the target folds the leading dims into rows, ``a @ W^T`` on the last), adds
    of inputs of different shapes (no kernel broadcasts) or of other than ``add_arity`` inputs, and
    more graph inputs / outputs than a runner takes."""
    from fxquant.backends.base import Problem

    problems = []
    for op in graph.ops:
        if op.kind == "conv2d" and op.attrs.get("groups", 1) != 1 and not groups:
            problems.append(_problem(op, f"grouped convolution (groups={op.attrs['groups']}); this target "
                                         "has groups=1 kernels only"))
        if op.kind == "linear" and not linear_any_rank:
            shape = graph.values[op.inputs[0]].shape
            if len(shape) != 1:
                problems.append(_problem(op, f"linear on an input of shape {list(shape)} (rank {len(shape) + 1} "
                                             "with the batch); this target's kernel takes [batch, features]"))
        if op.kind == "add":
            shapes = [tuple(graph.values[i].shape) for i in op.inputs]
            if len(set(shapes)) > 1:
                problems.append(_problem(op, f"add of shapes {[list(s) for s in shapes]}; no kernel broadcasts"))
            if add_arity is not None and len(op.inputs) != add_arity:
                problems.append(_problem(op, f"add of {len(op.inputs)} inputs; this target adds {add_arity}"))
    if max_inputs is not None and len(graph.inputs) > max_inputs:
        problems.append(Problem("graph", "inputs", f"{len(graph.inputs)} graph inputs; this target takes "
                                                   f"{max_inputs}"))
    if max_outputs is not None and len(graph.outputs) > max_outputs:
        problems.append(Problem("graph", "outputs", f"{len(graph.outputs)} graph outputs; this target takes "
                                                    f"{max_outputs}"))
    return problems


def requantize_shift(graph: "IntegerGraph", op: "Op") -> int | None:
    """``FL_out - FL_acc`` of a requantizing op (``None`` for ops that do not requantize)."""
    ins = [graph.values[i].fmt.frac_bits for i in op.inputs]
    if op.out_fmt is None or not ins:
        return None
    if op.kind in ("conv2d", "linear", "conv_transpose2d"):
        acc = ins[0] + op.weight_fmt.frac_bits
    elif op.kind in ("matmul", "mul"):
        acc = ins[0] + ins[1]
    elif op.kind == "add":
        acc = max(ins)
    elif op.kind == "avgpool2d":
        from fxquant.fixed_point import reciprocal

        acc = ins[0] + reciprocal(math.prod(op.attrs["kernel"]))[1]
    elif op.kind in ("requantize", "clamp"):
        acc = ins[0]
    elif op.kind == "embedding":
        acc = op.weight_fmt.frac_bits
    elif op.kind == "softmax":  # e * r at K = E + FL_out + G, shifted down by E + G
        from fxquant.fixed_point import SOFTMAX_EXP_BITS, SOFTMAX_GUARD_BITS as SOFTMAX_GUARD

        return -(int(op.attrs.get("exp_bits", SOFTMAX_EXP_BITS)) + SOFTMAX_GUARD)
    elif op.kind == "layernorm":
        from fxquant.fixed_point import LAYERNORM_FRAC_BITS

        acc = op.weight_fmt.frac_bits + LAYERNORM_FRAC_BITS
    else:
        return None
    return op.out_fmt.frac_bits - acc


def shift_problems(graph: "IntegerGraph", lo: int, hi: int) -> list["Problem"]:
    """Requantizing ops whose shift ``FL_out - FL_acc`` is outside ``[lo, hi]``."""
    return [_problem(op, f"requantize shift {s} outside this target's range [{lo}, {hi}]")
            for op in graph.ops for s in [requantize_shift(graph, op)] if s is not None and not lo <= s <= hi]


# ------------------------------------------------------------------------------------ transformer kinds
LAYERNORM_MAX_ROW = 1 << 16
"""Longest layernorm row: keeps ``sigma >= 2^30 / sqrt(n) >= 2^22`` and ``(c << t) r < 2^60``."""
SOFTMAX_SUM_BITS = 32
"""The softmax row sum ``s <= L 2^E`` is held in a signed int32."""
INT64_BITS = 64


def layernorm_d_bound(n: int, bits: int, eps_d: int) -> int:
    """Worst ``D = sum(c^2) + eps_D`` of a layernorm row of ``n`` ``bits``-bit integers:
    ``sum(c^2) = n^3 var(k) <= n^3 (2^BW - 1)^2 / 4`` (the variance of values in an interval of
    width ``w`` is at most ``w^2 / 4``), taken as ``floor`` of it plus ``eps_D``."""
    return (n ** 3 * ((1 << bits) - 1) ** 2) // 4 + int(eps_d)


def transformer_problems(graph: "IntegerGraph") -> list["Problem"]:
    """The bounds of the transformer kinds (module docstring), one problem per offending op and rule."""
    import numpy as np

    from fxquant.errors import UnsupportedOpError
    from fxquant.fixed_point import (LAYERNORM_NORM_BITS, MAX_LUT_BITS, SOFTMAX_EXP_BITS, exp_table_size,
                                     softmax_recip_bits)
    from fxquant.integer_ops_transformer import slice_shape

    problems = []
    for op in graph.ops:
        vs = [graph.values[i] for i in op.inputs]
        if op.kind == "embedding":
            (v,) = vs
            if op.weight is None or op.weight.ndim != 2 or op.weight_fmt is None:
                problems.append(_problem(op, "embedding without a (V, D) table and its weight format"))
                continue
            rows = op.weight.shape[0]
            if v.fmt.frac_bits != 0:
                problems.append(_problem(op, f"token ids at {v.fmt}; ids are integers <BW,0>"))
            elif rows - 1 > v.fmt.qmax:
                problems.append(_problem(op, f"ids at {v.fmt} reach {v.fmt.qmax}; the table has {rows} rows "
                                             f"(ids need {(rows - 1).bit_length() + 1} bits)"))
        elif op.kind == "softmax":
            v, e_bits = vs[0], int(op.attrs.get("exp_bits", SOFTMAX_EXP_BITS))
            if op.attrs.get("dim", len(v.shape)) != len(v.shape) or not v.shape:
                problems.append(_problem(op, f"softmax over axis {op.attrs.get('dim')!r}, not the last "
                                             f"({len(v.shape)})"))
            if not 1 <= e_bits <= 24:
                problems.append(_problem(op, f"exp_bits {e_bits} outside 1..24"))
                continue
            if v.fmt.frac_bits is None or op.out_fmt.frac_bits is None:
                continue  # format_problems names it
            size = exp_table_size(v.fmt, e_bits)
            if size > 1 << MAX_LUT_BITS:
                problems.append(_problem(op, f"exponential table of {size} entries for scores at {v.fmt}; "
                                             f"at most 2^{MAX_LUT_BITS} (fewer score frac bits)"))
            if v.shape and not fits(v.shape[-1] << e_bits, SOFTMAX_SUM_BITS):
                problems.append(_problem(op, f"row sum {v.shape[-1]} * 2^{e_bits} exceeds int{SOFTMAX_SUM_BITS}"))
            if not 0 <= softmax_recip_bits(op.out_fmt, e_bits) <= 60:
                problems.append(_problem(op, f"output {op.out_fmt}: reciprocal scale 2^"
                                             f"{softmax_recip_bits(op.out_fmt, e_bits)} outside 2^0..2^60"))
            if op.attrs.get("causal") and len(v.shape) < 2:
                problems.append(_problem(op, "causal mask on scores without (query, key) axes"))
            if len(vs) > 1:
                m = vs[1]
                if m.fmt.frac_bits != 0 or len(m.shape) != len(v.shape) or any(
                        a not in (1, b) for a, b in zip(m.shape, v.shape)):
                    problems.append(_problem(op, f"mask {list(m.shape)} at {m.fmt} does not broadcast to scores "
                                                 f"{list(v.shape)} (integer <BW,0>, same rank, dims equal or 1)"))
        elif op.kind == "layernorm":
            v = vs[0]
            if op.attrs.get("dim", len(v.shape)) != len(v.shape) or not v.shape:
                problems.append(_problem(op, f"layernorm over axis {op.attrs.get('dim')!r}, not the last "
                                             f"({len(v.shape)})"))
                continue
            n, eps = v.shape[-1], op.attrs.get("eps")
            if op.weight is None or op.weight.shape != (n,) or op.weight_fmt is None:
                problems.append(_problem(op, f"layernorm without gamma of shape ({n},) and its format"))
            if isinstance(eps, bool) or not isinstance(eps, (int, np.integer)) or eps < 0:
                problems.append(_problem(op, f"eps {eps!r} is not a non-negative integer (fixed_point.layernorm_eps)"))
                continue
            if n > LAYERNORM_MAX_ROW:
                problems.append(_problem(op, f"row of {n} entries; at most {LAYERNORM_MAX_ROW}"))
            d = layernorm_d_bound(n, v.fmt.bits, eps)
            if d >= 1 << LAYERNORM_NORM_BITS:
                problems.append(_problem(op, f"variance sum can reach {d}, beyond 2^{LAYERNORM_NORM_BITS} "
                                             f"(rows of {n} at {v.fmt.bits} bits)"))
        elif op.kind == "constant":
            out = graph.values[op.output]
            if op.weight is None or tuple(op.weight.shape) != tuple(out.shape) or op.weight_fmt != op.out_fmt:
                problems.append(_problem(op, f"constant without integers of its value's shape {list(out.shape)} "
                                             "at its output format"))
            elif op.weight.size and (op.weight.min() < op.out_fmt.qmin or op.weight.max() > op.out_fmt.qmax):
                problems.append(_problem(op, f"constant integers outside {op.out_fmt}"))
        elif op.kind == "slice":
            try:
                slice_shape(op, vs[0].shape)
            except UnsupportedOpError as err:
                problems.append(_problem(op, err.message))
    return problems


__all__ = ["accumulator_problems", "add_bound", "avg_window_problems", "avg_window_shift", "ceil_adds_window",
           "dot_bound", "fit_problems", "fits", "format_problems", "int_max", "lut_problems", "require_avg_window",
           "require_fits", "requantize_shift", "shape_problems", "shift_problems", "transformer_problems",
           "width_problems", "window_problems"]
