"""AdaPT push-down: a real histogram KL, and bisection on known distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest

import fxquant.policies.kl as kl
from fxquant.fixed_point import FixedPoint
from fxquant.policies.kl import histogram_kl, push_down


def test_identical_histograms_give_exact_zero() -> None:
    w = np.random.default_rng(0).normal(size=1000)
    assert histogram_kl(w, w.copy(), 50) == 0.0


def test_kl_of_known_two_bin_distributions() -> None:
    # range [0, 1], 2 bins: P = (1/2, 1/2); Q = (1/4, 3/4)
    w = np.array([0.0, 0.1, 0.9, 1.0])
    w_hat = np.array([0.0, 0.9, 0.9, 1.0])
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert histogram_kl(w, w_hat, 2) == pytest.approx(expected, rel=1e-12)


def test_empty_bin_of_q_gives_infinity() -> None:
    w = np.array([0.0, 0.1, 0.9, 1.0])
    assert histogram_kl(w, np.array([0.9, 0.9, 0.9, 1.0]), 2) == math.inf


def test_values_rounded_past_the_range_count_in_the_end_bins() -> None:
    w = np.array([0.0, 0.49, 0.51, 0.97])
    assert histogram_kl(w, np.array([0.0, 0.49, 0.51, 1.0]), 2) == 0.0


@pytest.mark.parametrize("scale, expected", [(8, FixedPoint(4, 3)), (64, FixedPoint(4, 6)), (1, FixedPoint(5, 0))])
def test_push_down_on_a_grid_finds_the_grid(scale: int, expected: FixedPoint) -> None:
    # values k / scale, k = -8..7 (k = -16..15 for scale 1 so the 16 bins hold 2 values each)
    k = np.arange(-8, 8) if scale != 1 else np.arange(-16, 16)
    w = k / scale
    assert push_down(w, bins=len(np.unique(w)) - 1) == expected


def test_push_down_is_a_true_bisection(monkeypatch) -> None:
    calls = []
    real = kl.Histogram.lossless

    def counting(self, fmt):
        calls.append(fmt)
        return real(self, fmt)

    monkeypatch.setattr(kl.Histogram, "lossless", counting)
    w = np.random.default_rng(3).normal(0, 0.05, 100)
    fmt = push_down(w, bins=20)
    # 2 end probes + ceil(log2(14)) FL probes + ceil(log2(16)) BW probes
    assert len(calls) <= 2 + 4 + 4
    hist = kl.Histogram(w, 20)
    assert real(hist, fmt) and not real(hist, FixedPoint(16, fmt.frac_bits - 1))
    assert not real(hist, FixedPoint(fmt.bits - 1, fmt.frac_bits))


def test_coarse_histograms_allow_coarse_formats() -> None:
    w = np.random.default_rng(4).uniform(-1, 1, 200)
    fine, coarse = push_down(w, bins=150), push_down(w, bins=4)
    assert coarse.frac_bits <= fine.frac_bits
