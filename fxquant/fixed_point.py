"""Signed fixed point ``<BW,FL>``: the one place the number format is defined.

    q(x) = clamp(round(x * 2^FL), -2^(BW-1), 2^(BW-1) - 1) * 2^(-FL)

* ``BW`` (``bits``) is 2..16 for weights and activations, ``32`` means *off* (identity).
  Accumulators and biases use wider integers (see :func:`accumulator_bits`).
* ``FL`` (``frac_bits``) is any integer in ``[-64, 64]``: negative FL gives steps > 1, FL >= BW
  gives values below one in magnitude. ``None`` means *dynamic*: chosen per tensor from its range
  (used for gradient quantizers).
* Rounding is to nearest with **ties to even** (``torch.round``, ONNX QuantizeLinear and HLS
  ``AP_RND_CONV`` all agree on it). Saturation clamps (``AP_SAT``), it never wraps.

This module holds the spec type, the numpy integer reference of the rounding, saturation,
requantization (shift) and accumulator-width math, and the range-fit rule. The torch training op
(:mod:`fxquant.ops`) implements the same formula on tensors; ``docs/number_format.md`` is the
contract every backend reproduces.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from fxquant.errors import PrecisionError

OFF_BITS = 32
"""``bits == 32`` switches a quantizer off (identity)."""
MIN_BITS, MAX_BITS = 2, 16
FRAC_BITS_LIMIT = 64
BIAS_BITS = 32
"""Biases are stored as int32 on the accumulator grid ``FL_w + FL_in``."""


def check_bits(bits: int, what: str = "bits") -> int:
    """Return ``bits`` if it is a legal weight/activation/gradient width, else raise."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise PrecisionError(f"{what}={bits!r} is not an integer", "use 2..16, or 32 for off")
    if not (MIN_BITS <= bits <= MAX_BITS or bits == OFF_BITS):
        raise PrecisionError(f"{what}={bits} is out of range", "use 2..16, or 32 for off")
    return int(bits)


def check_frac_bits(frac_bits: int | None, what: str = "frac_bits") -> int | None:
    """Return ``frac_bits`` if it is ``None`` (dynamic) or an integer in [-64, 64], else raise."""
    if frac_bits is None:
        return None
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, (int, np.integer)):
        raise PrecisionError(f"{what}={frac_bits!r} is not an integer", "use an integer or null")
    if abs(int(frac_bits)) > FRAC_BITS_LIMIT:
        raise PrecisionError(f"{what}={frac_bits} is out of range", f"use -{FRAC_BITS_LIMIT}..{FRAC_BITS_LIMIT}")
    return int(frac_bits)


@dataclass(frozen=True)
class FixedPoint:
    """A signed fixed-point format ``<bits, frac_bits>`` (the paper's ``<BW,FL>``)."""

    bits: int
    frac_bits: int | None = 0

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_frac_bits(self.frac_bits)

    @property
    def is_off(self) -> bool:
        return self.bits == OFF_BITS

    @property
    def is_dynamic(self) -> bool:
        return self.frac_bits is None

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def scale(self) -> float:
        """The value of one least significant bit, ``2^-FL``."""
        if self.frac_bits is None:
            raise PrecisionError(f"{self} has a dynamic FL and no fixed scale")
        return math.ldexp(1.0, -self.frac_bits)

    def __str__(self) -> str:
        fl = "dyn" if self.frac_bits is None else self.frac_bits
        return "off" if self.is_off else f"<{self.bits},{fl}>"

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "frac_bits": self.frac_bits}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FixedPoint":
        return cls(d["bits"], d.get("frac_bits"))


def fit_frac_bits(max_abs: float, bits: int) -> int:
    """The FL that covers ``[-max_abs, max_abs]`` with ``bits`` bits.

    ``FL = bits - 2 - floor(log2 max_abs)``, so ``max_abs < 2^(bits-1-FL)``; for a range that is
    not a power of two this equals the common ``bits - 1 - ceil(log2 max_abs)``, and a power of
    two does not saturate. ``max_abs == 0`` (or not finite) gives ``bits - 1``. Clamped to
    ``[-64, 64]``.
    """
    if not math.isfinite(max_abs) or max_abs <= 0.0:
        return bits - 1
    _, exponent = math.frexp(max_abs)  # max_abs = m * 2^exponent, 0.5 <= m < 1
    floor_log2 = exponent - 1
    return max(-FRAC_BITS_LIMIT, min(FRAC_BITS_LIMIT, bits - 2 - floor_log2))


def saturate(k: np.ndarray, bits: int) -> np.ndarray:
    """Clamp integers to the signed ``bits``-bit range."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.clip(k, lo, hi)


def quantize_int(x: np.ndarray, fmt: FixedPoint) -> np.ndarray:
    """Integers ``clamp(round_half_even(x * 2^FL))`` (int64) of a real array ``x``."""
    if fmt.is_off or fmt.frac_bits is None:
        raise PrecisionError(f"quantize_int needs a fixed format, got {fmt}")
    scaled = np.ldexp(np.asarray(x, dtype=np.float64), fmt.frac_bits)
    return saturate(np.rint(scaled), fmt.bits).astype(np.int64)


def quantize_bias(b: np.ndarray, frac_bits: int) -> np.ndarray:
    """Bias integers on the accumulator grid: ``clamp(round_half_even(b * 2^FL), int32)`` (int64)."""
    return saturate(np.rint(np.ldexp(np.asarray(b, dtype=np.float64), frac_bits)), BIAS_BITS).astype(np.int64)


def dequantize(k: np.ndarray, frac_bits: int) -> np.ndarray:
    """Real values ``k * 2^-FL`` (float64, exact)."""
    return np.ldexp(np.asarray(k, dtype=np.float64), -frac_bits)


def shift_round_half_even(k: np.ndarray, shift: int) -> np.ndarray:
    """``round_half_even(k * 2^shift)`` for int64 ``k``, without int64 overflow.

    Right shift by ``s = -shift``: ``q = k >> s`` (floor), remainder ``r = k - q*2^s`` in
    ``[0, 2^s)``; add one when ``r > 2^(s-1)``, or ``r == 2^(s-1)`` and ``q`` is odd (ties to even).
    ``s >= 64`` gives 0 (``|k| <= 2^63``). A left shift whose result leaves int64 saturates to the
    int64 range (every caller saturates to at most 32 bits afterwards).
    """
    k = np.asarray(k, dtype=np.int64)
    if shift == 0:
        return k.copy()
    if shift > 0:
        if shift >= 62:
            return np.sign(k) * np.int64(2**62)
        limit = np.int64(1) << np.int64(62 - shift)
        return np.clip(k, -limit, limit) << np.int64(shift)
    s = -shift
    if s >= 64:
        return np.zeros_like(k)
    q = k >> np.int64(s)
    r = k - (q << np.int64(s)) if s < 63 else np.where(q < 0, k + np.int64(2**62) + np.int64(2**62), k)
    half = np.int64(1) << np.int64(s - 1)
    return q + ((r > half) | ((r == half) & ((q & 1) == 1))).astype(np.int64)


def requantize(k: np.ndarray, frac_bits_from: int, fmt_to: FixedPoint) -> np.ndarray:
    """Integers at FL ``frac_bits_from`` re-expressed at ``fmt_to``: shift, round half even, saturate."""
    if fmt_to.frac_bits is None:
        raise PrecisionError(f"requantize needs a fixed format, got {fmt_to}")
    return saturate(shift_round_half_even(k, fmt_to.frac_bits - frac_bits_from), fmt_to.bits)


def accumulator_bits(in_bits: int, weight_bits: int, fan_in: int, bias_bits: int | None = None) -> int:
    """Signed width that holds ``sum_{i<fan_in} a_i * w_i (+ b)`` exactly.

    A product of an ``in_bits``- and a ``weight_bits``-bit signed integer needs
    ``in_bits + weight_bits`` bits (``(-2^(n-1)) * (-2^(m-1)) = 2^(n+m-2)``); a sum of ``fan_in``
    products adds ``ceil(log2 fan_in)`` bits. Adding a ``bias_bits``-bit bias gives
    ``max(sum_bits, bias_bits) + 1``.
    """
    if fan_in < 1:
        raise PrecisionError(f"fan_in={fan_in} must be >= 1")
    sum_bits = in_bits + weight_bits + math.ceil(math.log2(fan_in))
    return sum_bits if bias_bits is None else max(sum_bits, bias_bits) + 1


def min_signed_bits(k: np.ndarray) -> int:
    """Fewest signed bits that hold every integer in ``k`` (at least 1)."""
    k = np.asarray(k, dtype=np.int64)
    if k.size == 0:
        return 1
    hi, lo = int(k.max()), int(k.min())
    return max(1, (max(hi, -lo - 1)).bit_length() + 1)


# ------------------------------------------------------------------------------------ lookup tables
MAX_LUT_BITS = 12
"""Widest input of an element-wise table (``2^12`` entries); 8 bits or fewer is the cheap case."""


def lut_table(fn, in_fmt: FixedPoint, out_fmt: FixedPoint) -> np.ndarray:
    """The exact table of an element-wise function: entry ``k - qmin_in`` is
    ``quantize_int(fn(k * 2^-FL_in), out_fmt)`` for every input integer ``k``, ``fn`` evaluated in
    float64 (one table per (input format, function, output format); every backend reads it)."""
    if in_fmt.frac_bits is None or out_fmt.frac_bits is None:
        raise PrecisionError("a lookup table needs fixed input and output formats")
    if in_fmt.bits > MAX_LUT_BITS:
        raise PrecisionError(f"a {in_fmt.bits}-bit input needs a 2^{in_fmt.bits}-entry table",
                             f"quantize the function's input to at most {MAX_LUT_BITS} bits")
    ks = np.arange(in_fmt.qmin, in_fmt.qmax + 1, dtype=np.int64)
    with np.errstate(over="ignore", invalid="ignore"):
        ys = np.asarray(fn(dequantize(ks, in_fmt.frac_bits)), dtype=np.float64)
    ys = np.nan_to_num(ys, nan=0.0, posinf=np.inf, neginf=-np.inf)
    return quantize_int(np.clip(ys, -2.0**80, 2.0**80), out_fmt)


# ------------------------------------------------------------------------------------ reciprocals
RECIPROCAL_BITS = 14
"""A non-power-of-two divisor ``d`` is a multiply by ``M = round_half_even(2^s / d)``,
``s = RECIPROCAL_BITS + floor(log2 d)`` (so ``2^(RECIPROCAL_BITS-1) < M <= 2^RECIPROCAL_BITS``), then a
requantize from ``FL + s``; a power of two ``d = 2^p`` is ``M = 1, s = p`` (exact)."""


def reciprocal(divisor: int) -> tuple[int, int]:
    """``(M, s)`` with ``x / divisor ~= x * M * 2^-s`` (:data:`RECIPROCAL_BITS`; exact for powers of two)."""
    d = int(divisor)
    if d < 1:
        raise PrecisionError(f"divisor {d} must be >= 1")
    p = d.bit_length() - 1
    if 1 << p == d:
        return 1, p
    s = RECIPROCAL_BITS + p  # 2^p < d < 2^(p+1): 2^(RECIPROCAL_BITS-1) < M < 2^RECIPROCAL_BITS
    q, r = divmod(1 << s, d)  # round half even of 2^s / d
    m = q + (1 if 2 * r > d or (2 * r == d and q % 2 == 1) else 0)
    return int(m), int(s)


# ------------------------------------------------------------------------------------ bounded integer helpers
def bit_length64(x: np.ndarray) -> np.ndarray:
    """``int.bit_length`` of every non-negative int64 (0 for 0), in a fixed 6-step binary search
    (what a backend without a count-leading-zeros instruction unrolls; ``64 - clz(x)`` otherwise)."""
    y = np.asarray(x, dtype=np.int64).copy()
    n = np.zeros_like(y)
    for s in (32, 16, 8, 4, 2, 1):
        big = (y >> np.int64(s)) > 0
        n += np.where(big, s, 0)
        y = np.where(big, y >> np.int64(s), y)
    return n + (y > 0)


def isqrt64(x: np.ndarray) -> np.ndarray:
    """``floor(sqrt(x))`` of every int64 in ``[0, 2^62]``: the bitwise restoring square root, 32 fixed
    steps of compare / subtract / shift (no multiply, no division; equal to :func:`math.isqrt`)."""
    num = np.asarray(x, dtype=np.int64).copy()
    if num.size and (num.min() < 0 or num.max() > 1 << 62):
        raise PrecisionError("isqrt64 takes integers in [0, 2^62]")
    res = np.zeros_like(num)
    bit = np.int64(1) << np.int64(62)
    for _ in range(32):
        trial = res + bit
        ge = num >= trial
        num = np.where(ge, num - trial, num)
        res = np.where(ge, (res >> np.int64(1)) + bit, res >> np.int64(1))
        bit >>= np.int64(2)
    return res


def row_reciprocal(s: np.ndarray, k: int) -> np.ndarray:
    """``floor(2^k / s + 1/2) = (2^(k+1) + s) // (2 s)`` for every ``s >= 1`` (round half up: one
    integer division, no remainder test), ``0`` where ``s == 0``. ``k <= 60`` and ``s < 2^61`` keep
    the numerator within int64. A tie needs ``2^(k+1) = s (2r + 1)``, i.e. ``s = 2^(k+1)``, ``r = 0``
    -> 1: half up and half even differ only there."""
    s = np.asarray(s, dtype=np.int64)
    if not 0 <= k <= 60:
        raise PrecisionError(f"row reciprocal of 2^{k}: use 0 <= k <= 60")
    safe = np.maximum(s, 1)
    return np.where(s > 0, ((np.int64(1) << np.int64(k + 1)) + safe) // (2 * safe), 0)


# ------------------------------------------------------------------------------------ softmax
SOFTMAX_EXP_BITS = 15
"""``E``: the exponential table holds ``exp(-i 2^-FL_in)`` at ``E`` fractional bits (entry 0 is
``2^E``), so a row of ``L`` entries sums to at most ``L 2^E`` (int32 for ``L < 2^16``)."""
SOFTMAX_GUARD_BITS = 4
"""``G``: the row reciprocal is ``r = round(2^K / s)`` at ``K = E + FL_out + G``; its error is at most
``2^-(G+1)`` of an output LSB."""


def _ln2(prec: int = 60):
    import decimal

    with decimal.localcontext() as ctx:
        ctx.prec = prec
        return decimal.Decimal(2).ln()


def exp_table_size(in_fmt: FixedPoint, exp_bits: int = SOFTMAX_EXP_BITS) -> int:
    """``T``: entries of the softmax exponential table of ``in_fmt``: ``min(2^BW_in, i0 + 1)`` where
    ``i0 = floor((E + 1) ln2 2^FL_in) + 1`` is the first index whose entry rounds to 0
    (``exp(-i 2^-FL) 2^E < 1/2``; equality is impossible, ``ln 2`` being irrational)."""
    import decimal

    if in_fmt.frac_bits is None:
        raise PrecisionError("a softmax table needs a fixed input format")
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        i0 = int(((exp_bits + 1) * _ln2() * decimal.Decimal(2) ** in_fmt.frac_bits).to_integral_value(
            decimal.ROUND_FLOOR)) + 1
    return min(1 << in_fmt.bits, i0 + 1)


@functools.lru_cache(maxsize=64)
def _exp_table(bits: int, frac_bits: int, exp_bits: int) -> bytes:
    import decimal

    size = exp_table_size(FixedPoint(bits, frac_bits), exp_bits)
    out = np.empty(size, dtype=np.int64)
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        step = decimal.Decimal(2) ** -frac_bits
        top = decimal.Decimal(2) ** exp_bits
        for i in range(size):  # Decimal.exp is correctly rounded: the same table on every machine
            v = (-(i * step)).exp() * top
            out[i] = int(v.to_integral_value(decimal.ROUND_HALF_EVEN))
    return out.tobytes()


def softmax_exp_table(in_fmt: FixedPoint, exp_bits: int = SOFTMAX_EXP_BITS) -> np.ndarray:
    """The softmax exponential table: entry ``i`` is ``round_half_even(exp(-i 2^-FL_in) 2^E)`` for
    ``i < T = exp_table_size(in_fmt, E)`` (unsigned, ``<= 2^E``; the last entry is 0 when ``T < 2^BW_in``),
    computed in exact decimal arithmetic (deterministic on every machine; every backend reads it)."""
    if in_fmt.frac_bits is None:
        raise PrecisionError("a softmax table needs a fixed input format")
    return np.frombuffer(_exp_table(in_fmt.bits, in_fmt.frac_bits, int(exp_bits)), dtype=np.int64).copy()


def softmax_recip_bits(out_fmt: FixedPoint, exp_bits: int = SOFTMAX_EXP_BITS) -> int:
    """``K = E + FL_out + G``: the row reciprocal's scale (:data:`SOFTMAX_GUARD_BITS`)."""
    return int(exp_bits) + int(out_fmt.frac_bits) + SOFTMAX_GUARD_BITS


def softmax_rows(k: np.ndarray, keep: np.ndarray, in_fmt: FixedPoint, out_fmt: FixedPoint,
                 exp_bits: int = SOFTMAX_EXP_BITS) -> np.ndarray:
    """Integer softmax over the last axis of ``k`` (integers at ``in_fmt``); ``keep`` (bool,
    broadcastable) is False where an entry is masked. Per row (``L`` entries, ``T`` the table size):

        m = max(k over kept entries)                 (qmin when none is kept)
        e = keep ? TABLE[min(m - k, T - 1)] : 0      (0 <= e <= 2^E; masked entries exactly 0)
        s = sum(e)                                   (0 or 2^E <= s <= L 2^E)
        r = (2^(K+1) + s) // (2 s), 0 when s == 0    (K = E + FL_out + G; r <= 2^(K-E))
        y = saturate(round_half_even(e r 2^(FL_out - K)), out_fmt)   (e r <= 2^K)

    so an all-masked row gives 0. Error against float softmax of the (dequantized) input:
    ``|y 2^-FL_out - p| <= 2^-FL_out + (L + 1) 2^-(E+1) + 2^-(FL_out+G+1)`` (see docs/number_format.md).
    """
    k = np.asarray(k, dtype=np.int64)
    keep = np.broadcast_to(np.asarray(keep, dtype=bool), k.shape)
    table = softmax_exp_table(in_fmt, exp_bits)
    m = np.where(keep, k, in_fmt.qmin).max(axis=-1, keepdims=True) if k.shape[-1] else k
    idx = np.minimum(np.where(keep, m - k, 0), table.size - 1)
    e = np.where(keep, table[idx], 0)
    s = e.sum(axis=-1, keepdims=True)
    big_k = softmax_recip_bits(out_fmt, exp_bits)
    r = row_reciprocal(s, big_k)
    return saturate(shift_round_half_even(e * r, int(out_fmt.frac_bits) - big_k), out_fmt.bits)


# ------------------------------------------------------------------------------------ layernorm
LAYERNORM_FRAC_BITS = 16
"""``FL_h``: the normalized value ``x_hat`` is an integer at 16 fractional bits before ``gamma``."""
LAYERNORM_RECIP_BITS = 50
"""``Y``: the row reciprocal of the normalized standard deviation is ``round(2^Y / sigma)``."""
LAYERNORM_NORM_BITS = 62
"""Each row's ``D`` is scaled by ``4^t`` into ``[2^60, 2^62)`` before the square root."""


def layernorm_eps(eps: float, n: int, in_fmt: FixedPoint) -> int:
    """The integer ``eps_D = round_half_even(eps n^3 2^(2 FL_in))``: ``eps`` on the grid of ``D``
    (exact rational arithmetic; the op honours ``eps_D / (n^3 2^(2 FL_in))``)."""
    from fractions import Fraction

    if in_fmt.frac_bits is None or eps < 0 or not math.isfinite(eps):
        raise PrecisionError(f"layernorm eps {eps!r} on {in_fmt}: needs eps >= 0 and a fixed input format")
    return int(round(Fraction(eps) * n ** 3 * Fraction(2) ** (2 * in_fmt.frac_bits)))


def layernorm_rows(k: np.ndarray, eps_d: int) -> np.ndarray:
    """``h = round(x_hat 2^FL_h)`` over the last axis of ``k`` (``n`` entries, any input FL):

        c = n k - sum(k)                       (exact: n (x - mean) 2^FL_in; |c| < n 2^BW)
        D = sum(c^2) + eps_D                   (exact: n^3 (var + eps) 2^(2 FL_in); < 2^62 by legality)
        t = (62 - bit_length(D)) // 2          (D 4^t in [2^60, 2^62); t = 31 for D = 0)
        sigma = isqrt((D << 2t) // n)          (= floor(2^t sqrt(D / n)) exactly; >= floor(2^30 / sqrt(n)))
        r = (2^(Y+1) + sigma) // (2 sigma)     (0 when sigma == 0)
        h = round_half_even((c << t) r 2^(FL_h - Y))   (|c| 2^t < 2^31, r < 2^(Y-29) sqrt(n))

    ``x_hat = c / sqrt(D / n)``; ``|h 2^-FL_h - x_hat| <= 2^-(FL_h+1) + sqrt(n) |x_hat| 2^-29 + |x_hat| 2^(30-Y)``.
    """
    k = np.asarray(k, dtype=np.int64)
    n = k.shape[-1]
    c = n * k - k.sum(axis=-1, keepdims=True)
    d = (c * c).sum(axis=-1, keepdims=True) + np.int64(eps_d)
    t = (LAYERNORM_NORM_BITS - bit_length64(d)) // 2
    sigma = isqrt64((d << (2 * t)) // n)
    r = row_reciprocal(sigma, LAYERNORM_RECIP_BITS)
    return shift_round_half_even((c << t) * r, LAYERNORM_FRAC_BITS - LAYERNORM_RECIP_BITS)
