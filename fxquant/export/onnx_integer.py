"""Exact integer subgraphs in standard ONNX (int64 tensors): the transformer kinds of the QDQ export.

The QDQ exporter (:mod:`fxquant.export.onnx_qdq`) writes ``softmax``, ``layernorm`` and the
integer path of an activation ``matmul`` as int64 arithmetic that onnxruntime's CPU provider runs
exactly (Add, Sub, Mul, Div, Mod, Min, Max, Clip, Where, Equal, Greater, Less, ReduceMax,
ReduceSum, Gather, MatMul on int64; one float64 ``Sqrt``). Each function here emits the steps of
the reference's algorithm (:mod:`fxquant.fixed_point`: :func:`~fxquant.fixed_point.softmax_rows`,
:func:`~fxquant.fixed_point.layernorm_rows`, :func:`~fxquant.fixed_point.shift_round_half_even`,
:func:`~fxquant.fixed_point.isqrt64`, :func:`~fxquant.fixed_point.bit_length64`,
:func:`~fxquant.fixed_point.row_reciprocal`) with the same integers; the constants (exponential
table, ``K``, ``Y``, ``FL_h``) are read from that module, never restated.

ONNX integer semantics used (opset 13+): ``Div`` truncates toward zero, so it is only applied to
non-negative operands or to exact multiples (where it equals floor division); ``Mod`` with
``fmod=0`` takes the sign of the divisor, i.e. ``Mod(k, 2^s)`` is the floor remainder in
``[0, 2^s)``. ``BitShift`` is unsigned-only, so shifts are multiplications and divisions by
powers of two.

* :meth:`IntegerOps.shift_round_half_even`: ``round_half_even(k 2^shift)``. Right shift by
  ``s = -shift`` (``1 <= s <= 62``): ``r = Mod(k, 2^s)``, ``q = (k - r) / 2^s`` (exact), plus one
  when ``r > 2^(s-1)`` or ``r == 2^(s-1)`` and ``q`` is odd (``Mod(q, 2) == 1``, also for negative
  ``q``); ``s >= 63`` gives 0 (every caller has ``|k| < 2^62``, so ``|k 2^-s| < 1/2``). Left shift:
  ``Clip(k, -2^(62-shift), 2^(62-shift)) 2^shift`` (``sign(k) 2^62`` from 62 on), the
  reference's int64 saturation.
* :meth:`IntegerOps.bit_length`: ``sum_j [x >= 2^j]`` over ``j = 0..62`` (one broadcast
  ``GreaterOrEqual`` against the 63 powers and a ``ReduceSum``): exact for ``0 <= x < 2^63``.
* :meth:`IntegerOps.isqrt`: ``s = floor(Sqrt(double(x)))``, then ``s -= [s^2 > x]`` and
  ``s += [(s+1)^2 <= x]``. Equal to ``math.isqrt`` for ``0 <= x <= 2^62``: ``double(x) =
  x (1 + d1)`` and the correctly rounded ``Sqrt`` adds ``(1 + d2)``, ``|d1|, |d2| <= 2^-53``, so
  ``|f - sqrt(x)| <= 2^31 (2^-53 + 2^-53 + 2^-106) < 2^-21 < 1``; with ``m = isqrt(x)``,
  ``sqrt(x)`` lies in ``[m, m+1)``, so ``floor(f)`` is ``m - 1``, ``m`` or ``m + 1`` and one
  correction each way gives ``m`` (``(s+1)^2 <= (2^31 + 2)^2 < 2^63``: no overflow). The
  argument holds for any ``Sqrt`` within one unit, not only a correctly rounded one.
* :meth:`IntegerOps.softmax` and :meth:`IntegerOps.layernorm`: the row algorithms, step for step
  (their docstrings). Two reference ``where`` guards need no node: a softmax row sum ``s = 0``
  means every ``e = 0``, a layernorm ``sigma = 0`` means ``D = 0`` and every ``c = 0``, so the
  product with the (then arbitrary, finite) reciprocal is 0 either way.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from fxquant.export.onnx_builder import GraphBuilder
from fxquant.fixed_point import (LAYERNORM_FRAC_BITS, LAYERNORM_NORM_BITS, LAYERNORM_RECIP_BITS, FixedPoint,
                                 softmax_exp_table, softmax_recip_bits)

FLOAT64_EXACT_BOUND = 1 << 53
"""float64 holds every integer of magnitude below 2^53 (and its power-of-two multiples) exactly."""
INT64_SAFE_SHIFT = 62
"""Right shifts of at most 62 use the power ``2^s`` as an int64 constant; larger ones give 0."""
REDUCE_AXES_INPUT_OPSET = 18
"""ReduceMax (and every Reduce* but ReduceSum) takes ``axes`` as an input from opset 18."""


class IntegerOps:
    """Emits int64 subgraphs into a :class:`~fxquant.export.onnx_builder.GraphBuilder` (module doc)."""

    def __init__(self, b: GraphBuilder, opset: int) -> None:
        self.b, self.opset = b, opset

    # ------------------------------------------------------------------ elementary
    def const(self, base: str, value) -> str:
        return self.b.const(base, np.asarray(value, np.int64))

    def op(self, op_type: str, inputs: list[str], base: str, **attrs) -> str:
        return self.b.node(op_type, inputs, base, **attrs)

    def cast(self, x: str, to: int, base: str) -> str:
        return self.b.node("Cast", [x], base, to=to)

    def reduce(self, op_type: str, x: str, base: str, keepdims: int = 1) -> str:
        """``op_type`` over the last axis (``axes`` an input from opset 13 for ReduceSum, 18 for the rest)."""
        axes_input = op_type == "ReduceSum" or self.opset >= REDUCE_AXES_INPUT_OPSET
        if axes_input:
            return self.b.node(op_type, [x, self.const("last_axis", np.array([-1]))], base, keepdims=keepdims)
        return self.b.node(op_type, [x], base, axes=[-1], keepdims=keepdims)

    def clip(self, x: str, lo: int, hi: int, base: str) -> str:
        return self.b.node("Clip", [x, self.const("clip_lo_i64", lo), self.const("clip_hi_i64", hi)], base)

    def flag(self, condition: str, base: str) -> str:
        """A boolean tensor as int64 0/1."""
        return self.cast(condition, TensorProto.INT64, base)

    # ------------------------------------------------------------------ fixed-point steps
    def shift_round_half_even(self, k: str, shift: int, base: str) -> str:
        """``round_half_even(k 2^shift)`` (module doc; ``|k| < 2^62`` for right shifts of 63 or more)."""
        if shift == 0:
            return k
        if shift > 0:
            if shift >= INT64_SAFE_SHIFT:
                return self.op("Mul", [self.op("Sign", [k], f"{base}_sign"), self.const("pow2_62", 1 << 62)], base)
            limit = 1 << (INT64_SAFE_SHIFT - shift)
            return self.op("Mul", [self.clip(k, -limit, limit, f"{base}_clip"), self.const("pow2", 1 << shift)], base)
        s = -shift
        if s > INT64_SAFE_SHIFT:
            return self.op("Mul", [k, self.const("zero_i64", 0)], base)
        p = self.const("pow2", 1 << s)
        r = self.op("Mod", [k, p], f"{base}_rem")
        q = self.op("Div", [self.op("Sub", [k, r], f"{base}_floor_mul"), p], f"{base}_floor")
        half = self.const("half", 1 << (s - 1))
        odd = self.op("Equal", [self.op("Mod", [q, self.const("two", 2)], f"{base}_parity"), self.const("one", 1)],
                      f"{base}_odd")
        tie_up = self.op("And", [self.op("Equal", [r, half], f"{base}_tie"), odd], f"{base}_tie_up")
        up = self.op("Or", [self.op("Greater", [r, half], f"{base}_above"), tie_up], f"{base}_up")
        return self.op("Add", [q, self.flag(up, f"{base}_carry")], base)

    def requantize(self, k: str, shift: int, fmt: FixedPoint, base: str, *, relu: bool = False,
                   bound: int | None = None) -> str:
        """:func:`fxquant.fixed_point.requantize` (then ``relu``): shift, round half even, saturate.

        With a ``bound`` on ``|k|`` below ``2^53``, in float64 (fewer nodes): ``Cast(double) →
        Mul(2^shift) → Round → Clip → Cast(int64)``, exact because ``k`` and ``k 2^shift`` are
        doubles exactly (a power-of-two scaling) and ONNX ``Round`` rounds half to even; else the
        int64 :meth:`shift_round_half_even` and an int64 ``Clip``."""
        lo = 0 if relu else fmt.qmin
        if bound is not None and bound < FLOAT64_EXACT_BOUND:
            f = self.op("Mul", [self.cast(k, TensorProto.DOUBLE, f"{base}_f64"),
                                self.b.const("shift_f64", np.ldexp(np.float64(1.0), shift))], f"{base}_scaled_f64")
            f = self.b.node("Clip", [self.op("Round", [f], f"{base}_rounded_f64"),
                                     self.b.const("clip_lo_f64", np.float64(lo)),
                                     self.b.const("clip_hi_f64", np.float64(fmt.qmax))], f"{base}_clip_f64")
            return self.cast(f, TensorProto.INT64, base)
        return self.clip(self.shift_round_half_even(k, shift, f"{base}_shifted"), lo, fmt.qmax, base)

    def bit_length(self, x: str, base: str) -> str:
        """``int.bit_length`` of every ``0 <= x < 2^63`` (same shape; module doc)."""
        pows = self.const("pow2_0_to_62", np.int64(1) << np.arange(63, dtype=np.int64))
        expanded = self.op("Unsqueeze", [x, self.const("last_axis", np.array([-1]))], f"{base}_expanded")
        ge = self.op("GreaterOrEqual", [expanded, pows], f"{base}_ge")
        return self.reduce("ReduceSum", self.flag(ge, f"{base}_ge_i64"), base, keepdims=0)

    def isqrt(self, x: str, base: str) -> str:
        """``floor(sqrt(x))`` of every int64 ``0 <= x <= 2^62`` (module doc: float64 ``Sqrt`` and an
        integer correction each way; equal to :func:`fxquant.fixed_point.isqrt64`)."""
        f = self.op("Sqrt", [self.cast(x, TensorProto.DOUBLE, f"{base}_f64")], f"{base}_sqrt_f64")
        s = self.cast(self.op("Floor", [f], f"{base}_floor_f64"), TensorProto.INT64, f"{base}_guess")
        over = self.op("Greater", [self.op("Mul", [s, s], f"{base}_guess_sq"), x], f"{base}_over")
        s = self.op("Sub", [s, self.flag(over, f"{base}_over_i64")], f"{base}_down")
        s1 = self.op("Add", [s, self.const("one", 1)], f"{base}_next")
        under = self.op("LessOrEqual", [self.op("Mul", [s1, s1], f"{base}_next_sq"), x], f"{base}_under")
        return self.op("Add", [s, self.flag(under, f"{base}_under_i64")], base)

    def row_reciprocal(self, s: str, k: int, base: str) -> str:
        """``(2^(k+1) + s) // (2 max(s, 1))`` (:func:`fxquant.fixed_point.row_reciprocal` where ``s > 0``;
        the callers multiply it by zeros where ``s == 0``, module doc)."""
        den = self.op("Mul", [self.op("Max", [s, self.const("one", 1)], f"{base}_safe"), self.const("two", 2)],
                      f"{base}_den")
        num = self.op("Add", [s, self.const("recip_num", 1 << (k + 1))], f"{base}_num")
        return self.op("Div", [num, den], base)  # both positive: truncation is floor

    # ------------------------------------------------------------------ the row algorithms
    def softmax(self, k: str, keep: str | None, in_fmt: FixedPoint, out_fmt: FixedPoint, exp_bits: int,
                base: str) -> str:
        """:func:`fxquant.fixed_point.softmax_rows` on int64 scores ``k`` (last axis); ``keep`` a
        boolean tensor broadcastable to ``k`` or ``None`` (keep all). Output integers at ``out_fmt``::

            m = ReduceMax(Where(keep, k, qmin_in))
            e = Where(keep, Gather(TABLE, Min(Where(keep, m - k, 0), T - 1)), 0)
            s = ReduceSum(e);  r = (2^(K+1) + s) // (2 s)
            y = Clip(round_half_even(e r 2^(FL_out - K)), qmin_out, qmax_out)
        """
        table = softmax_exp_table(in_fmt, exp_bits)
        big_k = softmax_recip_bits(out_fmt, exp_bits)
        kept = k if keep is None else self.op("Where", [keep, k, self.const("qmin", in_fmt.qmin)], f"{base}_kept")
        m = self.reduce("ReduceMax", kept, f"{base}_max")
        d = self.op("Sub", [m, k], f"{base}_dist")
        if keep is not None:
            d = self.op("Where", [keep, d, self.const("zero_i64", 0)], f"{base}_dist_kept")
        idx = self.op("Min", [d, self.const("table_last", table.size - 1)], f"{base}_index")
        e = self.op("Gather", [self.const(f"{base}.exp_table", table), idx], f"{base}_exp", axis=0)
        if keep is not None:
            e = self.op("Where", [keep, e, self.const("zero_i64", 0)], f"{base}_exp_kept")
        s = self.reduce("ReduceSum", e, f"{base}_sum")
        r = self.row_reciprocal(s, big_k, f"{base}_recip")
        return self.requantize(self.op("Mul", [e, r], f"{base}_scaled"), int(out_fmt.frac_bits) - big_k, out_fmt,
                               base, bound=1 << big_k)  # e r <= 2^K (fixed_point.softmax_rows)

    def layernorm(self, k: str, n: int, eps_d: int, gamma: np.ndarray, beta: np.ndarray | None, w_frac_bits: int,
                  out_fmt: FixedPoint, relu: bool, base: str, acc_bound: int | None = None) -> str:
        """:func:`fxquant.fixed_point.layernorm_rows` on int64 ``k`` (last axis of ``n``), then
        ``acc = gamma h + beta`` requantized from ``FL_w + FL_h`` to ``out_fmt`` (``relu``; in float64
        when ``acc_bound``, :meth:`~fxquant.integer_graph.IntegerGraph.accumulator_bound`, allows)::

            c = n k - ReduceSum(k);  D = ReduceSum(c c) + eps_D
            t = (62 - bit_length(D)) // 2
            sigma = isqrt((D 4^t) // n);  r = (2^(Y+1) + sigma) // (2 sigma)
            h = round_half_even((c 2^t) r 2^(FL_h - Y))
        """
        total = self.reduce("ReduceSum", k, f"{base}_sum")
        c = self.op("Sub", [self.op("Mul", [k, self.const("row_len", n)], f"{base}_nk"), total], f"{base}_centered")
        d = self.op("Add", [self.reduce("ReduceSum", self.op("Mul", [c, c], f"{base}_sq"), f"{base}_sq_sum"),
                            self.const(f"{base}.eps", eps_d)], f"{base}_d")
        headroom = self.op("Sub", [self.const("norm_bits", LAYERNORM_NORM_BITS), self.bit_length(d, f"{base}_bits")],
                           f"{base}_headroom")
        t = self.op("Div", [headroom, self.const("two", 2)], f"{base}_t")  # non-negative: D < 2^62
        pow4 = self.op("Gather", [self.const("pow4_0_to_31", np.int64(1) << (2 * np.arange(32, dtype=np.int64))), t],
                       f"{base}_pow4", axis=0)
        pow2 = self.op("Gather", [self.const("pow2_0_to_31", np.int64(1) << np.arange(32, dtype=np.int64)), t],
                       f"{base}_pow2t", axis=0)
        scaled = self.op("Div", [self.op("Mul", [d, pow4], f"{base}_d_norm"), self.const("row_len", n)],
                         f"{base}_var")  # non-negative: floor
        sigma = self.isqrt(scaled, f"{base}_sigma")
        r = self.row_reciprocal(sigma, LAYERNORM_RECIP_BITS, f"{base}_recip")
        prod = self.op("Mul", [self.op("Mul", [c, pow2], f"{base}_c_norm"), r], f"{base}_c_scaled")
        h = self.shift_round_half_even(prod, LAYERNORM_FRAC_BITS - LAYERNORM_RECIP_BITS, f"{base}_h")
        acc = self.op("Mul", [h, self.const(f"{base}.gamma", gamma.astype(np.int64))], f"{base}_gamma")
        if beta is not None:
            acc = self.op("Add", [acc, self.const(f"{base}.beta", beta.astype(np.int64))], f"{base}_acc")
        return self.requantize(acc, int(out_fmt.frac_bits) - (w_frac_bits + LAYERNORM_FRAC_BITS), out_fmt, base,
                               relu=relu, bound=acc_bound)


__all__ = ["IntegerOps"]
