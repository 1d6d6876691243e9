"""The requantize epilogue as shifts, in TensorIR on int32 values (shared by the TVM CPU and CUDA kernels).

For an accumulator ``acc`` at ``FL_acc`` and an output spec ``<BW,FL_out>`` with
``shift = FL_out - FL_acc`` (:func:`fxquant.fixed_point.requantize` is the numpy reference):

* ``shift >= 0``: exact left shift with saturation. ``acc`` is first clamped to the output range
  (a value outside it saturates anyway, since ``|acc << t| >= |acc|``) and the shift is capped at
  ``BW`` (any non-zero value shifted by ``>= BW`` saturates), so the int32 shift cannot overflow.
* ``shift = -s < 0``: round half to even, without the ``acc + 2^(s-1)`` overflow of the textbook
  form: ``q = acc >> s`` (floor), ``r = acc & (2^s - 1)``, result ``q + [r + (q & 1) > 2^(s-1)]``
  (``r > half``, or ``r == half`` with ``q`` odd). ``s = 31`` is ``-1`` below ``-2^30``, ``1`` above ``2^30``
  and ``0`` between (ties included); ``s >= 32`` is ``0`` for every int32.
* then saturate to ``[-2^(BW-1), 2^(BW-1)-1]`` and apply ReLU as a lower bound of 0.

A residual add aligns its two int32 inputs to ``FL = max(FL_a, FL_b)`` by left shifts, adds and
requantizes the sum the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tvm import tirx


def _tir():  # noqa: ANN202  (TVMScript's T, imported on first use: planning needs no TVM)
    from tvm.script import tirx as T

    return T


@dataclass(frozen=True)
class Requant:
    """``shift = FL_out - FL_in`` into ``bits``-bit integers, then ReLU when ``relu``."""

    shift: int
    bits: int
    relu: bool = False

    @property
    def low(self) -> int:
        return 0 if self.relu else -(1 << (self.bits - 1))

    @property
    def high(self) -> int:
        return (1 << (self.bits - 1)) - 1


def _const(value: int, lanes: int) -> tirx.PrimExpr:
    T = _tir()
    return T.broadcast(T.int32(value), lanes) if lanes > 1 else T.int32(value)


def _clamp(v: tirx.PrimExpr, lo: int, hi: int, lanes: int) -> tirx.PrimExpr:
    T = _tir()
    return T.max(T.min(v, _const(hi, lanes)), _const(lo, lanes))


def requantize(v: tirx.PrimExpr, rq: Requant, lanes: int) -> tirx.PrimExpr:
    """``clamp(round_half_even(v * 2^shift))`` (+ ReLU) of an int32 (vector) expression."""
    T = _tir()
    if rq.shift == 0:
        return _clamp(v, rq.low, rq.high, lanes)
    if rq.shift > 0:
        clamped = _clamp(v, -(1 << (rq.bits - 1)), rq.high, lanes)
        return _clamp(clamped << _const(min(rq.shift, rq.bits), lanes), rq.low, rq.high, lanes)
    s = -rq.shift
    if s >= 32:
        return _const(0, lanes)
    if s == 31:
        rounded = T.Select(v < _const(-(1 << 30), lanes), _const(-1, lanes),
                           T.Select(v > _const(1 << 30, lanes), _const(1, lanes), _const(0, lanes)))
    else:
        q = v >> _const(s, lanes)
        r = v & _const((1 << s) - 1, lanes)
        up = T.Select(r + (q & _const(1, lanes)) > _const(1 << (s - 1), lanes), _const(1, lanes), _const(0, lanes))
        rounded = q + up
    return _clamp(rounded, rq.low, rq.high, lanes)


@dataclass(frozen=True)
class Residual:
    """A fused residual add: ``requantize((y << left_y) + (r << left_r))`` with ``out``."""

    left_y: int
    left_r: int
    out: Requant


def residual_add(y: tirx.PrimExpr, r: tirx.PrimExpr, res: Residual, lanes: int) -> tirx.PrimExpr:
    total = (y << _const(res.left_y, lanes)) + (r << _const(res.left_r, lanes))
    return requantize(total, res.out, lanes)
