"""AdaPT's push-down: the coarsest ``<BW,FL>`` whose histogram KL divergence to the float weights is 0.

For a weight tensor ``W`` and a candidate format ``f``, ``P`` is the histogram of ``W`` with ``r``
equal bins over ``[min W, max W]`` (the paper's "resolution" ``r``) and ``Q`` the histogram of the
quantized copy ``q_f(W)`` over the same bins (values rounded past the ends are counted in the end
bins). Then ::

    KL(P || Q) = sum_{i: P_i > 0} P_i log(P_i / Q_i)        (+inf if some Q_i = 0 < P_i)

a true discrete KL divergence (not a proxy); it is exactly ``0.0`` iff every bin keeps its count,
i.e. quantization moved no mass between bins at resolution ``r``.

**Push-down** (true bisection, two stages, ``O(log)`` KL evaluations):

1. ``FL``: with a width that never saturates (16 bits at ``FL <= fit(max|W|, 16)``), bisect the
   integer ``FL`` in ``[fit(max|W|, 2), fit(max|W|, 16)]`` for the smallest ``FL`` with KL = 0,
   keeping the invariant *KL(lo) > 0, KL(hi) = 0*. If KL is already 0 at the coarse end that end
   is returned; if it is still > 0 at the fine end (a weight sits on a bin edge), the fine end.
2. ``BW``: at that ``FL``, bisect ``BW`` in ``[2, min_signed_bits(q(W))]`` for the smallest width
   whose saturation still leaves the histogram unchanged (clipping inside the end bins is free).

Paper-reading choices: the quantized copy uses round-to-nearest-even (deterministic, the deployed
rounding) rather than a stochastic draw, so the same weights always give the same answer; ``P`` is
the float weights and ``Q`` the quantized ones, the direction in which KL is finite whenever the
histograms agree; the paper's Eq. (3.1) normalisation ``1/(r+1)`` is read as the plain empirical
frequency per bin. KL = 0 need not be monotone in ``FL``; bisection returns a boundary ``FL``
with KL = 0 whose coarser neighbour (the last ``lo``) has KL > 0.
"""

from __future__ import annotations

import math

import numpy as np

from fxquant.fixed_point import MAX_BITS, MIN_BITS, FixedPoint, dequantize, fit_frac_bits, min_signed_bits, quantize_int


class Histogram:
    """The ``bins``-bin histogram ``P`` of ``w`` over its range, kept for repeated KL probes."""

    def __init__(self, w: np.ndarray, bins: int) -> None:
        self.w, self.bins = w, bins
        self.lo, self.hi = float(w.min()), float(w.max())
        self.p = self._frequencies(w)

    def _frequencies(self, x: np.ndarray) -> np.ndarray:
        """Bin ``i`` holds ``lo + i*width <= x < lo + (i+1)*width``; the last bin also ``x = hi``."""
        scale = self.bins / (self.hi - self.lo) if self.hi > self.lo else 0.0
        index = np.minimum(((np.clip(x, self.lo, self.hi) - self.lo) * scale).astype(np.int64), self.bins - 1)
        counts = np.bincount(index, minlength=self.bins)
        return counts.astype(np.float64) / counts.sum()

    def kl_to(self, w_hat: np.ndarray) -> float:
        """``KL(P || Q)`` with ``Q`` the histogram of ``w_hat`` over the same bins."""
        if self.hi <= self.lo:  # a constant tensor: one bin
            return 0.0 if np.all(w_hat == self.w) else math.inf
        q = self._frequencies(w_hat)
        support = self.p > 0
        if np.any(q[support] == 0):
            return math.inf
        return float(np.sum(self.p[support] * np.log(self.p[support] / q[support])))

    def lossless(self, fmt: FixedPoint) -> bool:
        return self.kl_to(quantized_copy(self.w, fmt)) == 0.0


def histogram_kl(w: np.ndarray, w_hat: np.ndarray, bins: int) -> float:
    """``KL(P || Q)`` of the ``bins``-bin histograms of ``w`` (P) and ``w_hat`` (Q) over ``w``'s range."""
    return Histogram(w, bins).kl_to(w_hat)


def quantized_copy(w: np.ndarray, fmt: FixedPoint) -> np.ndarray:
    """``q_fmt(w)`` as reals (round half even, saturate): :func:`fixed_point.quantize_int`."""
    return dequantize(quantize_int(w, fmt), fmt.frac_bits)


def fewest_bits(w: np.ndarray, frac_bits: int) -> int:
    """Fewest signed bits (>= 2, <= 16) holding every integer of ``w`` at ``frac_bits`` (no saturation)."""
    return max(MIN_BITS, min(MAX_BITS, min_signed_bits(quantize_int(w, FixedPoint(MAX_BITS, frac_bits)))))


def push_down(w: np.ndarray, bins: int) -> FixedPoint:
    """The coarsest ``<BW,FL>`` with ``KL(P||Q) = 0`` at ``bins`` bins (module docstring)."""
    amax = float(np.max(np.abs(w))) if w.size else 0.0
    hist = Histogram(w, bins)
    lo, hi = fit_frac_bits(amax, MIN_BITS), fit_frac_bits(amax, MAX_BITS)
    if hist.lossless(FixedPoint(MAX_BITS, lo)):
        hi = lo
    elif hist.lossless(FixedPoint(MAX_BITS, hi)):
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if hist.lossless(FixedPoint(MAX_BITS, mid)) else (mid, hi)
    frac_bits = hi
    bits_hi = fewest_bits(w, frac_bits)
    bits_lo = MIN_BITS - 1  # sentinel: "lossy"
    while bits_hi - bits_lo > 1:
        mid = (bits_lo + bits_hi) // 2
        bits_lo, bits_hi = (bits_lo, mid) if hist.lossless(FixedPoint(mid, frac_bits)) else (mid, bits_hi)
    return FixedPoint(bits_hi, frac_bits)
