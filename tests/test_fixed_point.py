"""Properties of the number format (numpy reference) and of the fused torch op."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant)
from fxquant.errors import PrecisionError
from fxquant.fixed_point import (FixedPoint, accumulator_bits, fit_frac_bits, min_signed_bits, quantize_int,
                                 requantize, shift_round_half_even)

bits_st = st.integers(2, 16)
fl_st = st.integers(-8, 24)
floats = st.floats(-1e4, 1e4, allow_nan=False, width=64)


def torch_q(x: torch.Tensor, bits: int, fl: int, stochastic: bool = False, seed: int = 0,
            grad_bits: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    t = lambda v, dt=torch.int32: torch.tensor(v, dtype=dt)  # noqa: E731
    return torch.ops.fxquant.quantize(x, t(bits), t(fl), t(grad_bits), torch.tensor(stochastic),
                                      t(seed, torch.int64))


@given(st.lists(floats, min_size=1, max_size=50), bits_st, fl_st)
def test_range_idempotence_and_error_bound(xs, bits, fl):
    fmt = FixedPoint(bits, fl)
    x = np.array(xs)
    k = quantize_int(x, fmt)
    assert k.min() >= fmt.qmin and k.max() <= fmt.qmax
    q = np.ldexp(k.astype(np.float64), -fl)
    assert np.array_equal(quantize_int(q, fmt), k)  # idempotent
    inside = (x * 2.0**fl >= fmt.qmin) & (x * 2.0**fl <= fmt.qmax)
    assert np.all(np.abs(q - x)[inside] <= 2.0 ** (-fl - 1))


def test_ties_round_to_even():
    fmt = FixedPoint(8, 1)
    x = np.array([0.25, 0.75, -0.25, -0.75, 1.25])  # x*2 = 0.5, 1.5, -0.5, -1.5, 2.5
    assert quantize_int(x, fmt).tolist() == [0, 2, 0, -2, 2]


@given(st.lists(floats, min_size=1, max_size=64), bits_st, fl_st, st.sampled_from([torch.float32, torch.float64]))
@settings(max_examples=60)
def test_fused_op_matches_numpy_reference(xs, bits, fl, dtype):
    x = torch.tensor(xs, dtype=dtype)
    if dtype == torch.float32:
        x = x.double().float()
    y, amax = torch_q(x, bits, fl)
    expected = np.ldexp(quantize_int(x.double().numpy(), FixedPoint(bits, fl)).astype(np.float64), -fl)
    assert np.array_equal(y.double().numpy(), expected)
    assert float(amax) == float(x.abs().max())


def test_torch_ops_path_matches_c_kernel(monkeypatch):
    x = torch.randn(1000, dtype=torch.float64) * 7
    c_y, _ = torch_q(x, 5, 2)
    monkeypatch.setenv("FXQUANT_KERNELS", "torch")
    t_y, _ = torch_q(x, 5, 2)
    assert torch.equal(c_y, t_y)


def test_off_is_identity():
    x = torch.randn(100)
    y, _ = torch_q(x, 0, 3)
    assert torch.equal(x, y)


def test_stochastic_rounding_is_unbiased_and_seeded():
    x = torch.full((200_000,), 0.3, dtype=torch.float64)  # x*2^2 = 1.2: floor 1, p(2) = 0.2
    y, _ = torch_q(x, 8, 2, stochastic=True, seed=7)
    assert set(torch.unique(y).tolist()) == {0.25, 0.5}
    mean = float(y.mean())
    sigma = math.sqrt(0.2 * 0.8 / x.numel()) * 0.25
    assert abs(mean - 0.3) < 5 * sigma
    y2, _ = torch_q(x, 8, 2, stochastic=True, seed=7)
    y3, _ = torch_q(x, 8, 2, stochastic=True, seed=8)
    assert torch.equal(y, y2) and not torch.equal(y, y3)


def test_straight_through_gradient_zero_outside_range():
    x = torch.tensor([-10.0, -1.0, 0.3, 0.9, 10.0], requires_grad=True)
    y, _ = torch_q(x, 4, 3)  # integer range [-8, 7] -> real [-1, 0.875]
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]


def test_gradient_quantization_dynamic_frac_bits():
    x = torch.randn(1000, requires_grad=True)
    g = torch.randn(1000) * 1e-3
    y, _ = torch_q(x, 0, 0, grad_bits=4)
    y.backward(g)
    # by the kernel's rule, written out: FL = grad_bits - 2 - floor(log2 max|g|), then round half to
    # even on the 2^-FL grid and saturate to the signed 4-bit range [-8, 7]
    m = float(g.abs().max())
    floor_log2 = math.frexp(m)[1] - 1  # m = f * 2^e with 0.5 <= f < 1: floor(log2 m) = e - 1
    fl = 4 - 2 - floor_log2
    k = np.clip(np.rint(g.double().numpy() * 2.0**fl), -8, 7)  # np.rint rounds halves to even
    expected = k * 2.0**-fl
    assert np.array_equal(x.grad.double().numpy(), expected)  # bit-exact, not close
    assert len(torch.unique(x.grad)) <= 16


@given(st.integers(-(2**63), 2**63 - 1), st.integers(-70, 0))
def test_shift_round_half_even_is_exact_rounding(k, shift):
    got = int(shift_round_half_even(np.array([k]), shift)[0])
    assert got == round(Fraction(k) * Fraction(2) ** shift)  # Python rounds halves to even


@given(st.integers(-(2**40), 2**40), st.integers(0, 70))
def test_left_shift_saturates_instead_of_wrapping(k, shift):
    got = int(shift_round_half_even(np.array([k]), shift)[0])
    exact = k * 2**shift
    assert got == exact if abs(exact) <= 2**62 else (got > 0) == (exact > 0) and abs(got) >= 2**31


@given(st.integers(-(2**30), 2**30), st.integers(-10, 20), bits_st, fl_st)
def test_requantize_equals_quantize_of_value(k, fl_from, bits, fl_to):
    fmt = FixedPoint(bits, fl_to)
    assert requantize(np.array([k]), fl_from, fmt)[0] == quantize_int(np.array([math.ldexp(k, -fl_from)]), fmt)[0]


@given(st.floats(1e-6, 1e6), bits_st)
def test_fit_frac_bits_covers_range(m, bits):
    fl = fit_frac_bits(m, bits)
    assert m < 2.0 ** (bits - 1 - fl)  # |qmin| * 2^-FL covers the magnitude
    assert m >= 2.0 ** (bits - 2 - fl)  # FL + 1 would not: no leading bit is wasted


@given(bits_st, bits_st, st.integers(1, 5000))
def test_accumulator_bits_holds_extremes(a_bits, w_bits, n):
    worst = n * (1 << (a_bits - 1)) * (1 << (w_bits - 1))
    acc = accumulator_bits(a_bits, w_bits, n)
    assert worst < (1 << (acc - 1))  # fits the signed range, even for the (-2^(a-1))(-2^(w-1)) corner


def test_min_signed_bits():
    assert min_signed_bits(np.array([0])) == 1
    assert min_signed_bits(np.array([-1, 0])) == 1
    assert min_signed_bits(np.array([1])) == 2
    assert min_signed_bits(np.array([-128, 127])) == 8
    assert min_signed_bits(np.array([128])) == 9


@pytest.mark.parametrize("bits,fl", [(1, 0), (17, 0), (33, 0), (8, 65), (8, 1.5)])
def test_invalid_formats_raise(bits, fl):
    with pytest.raises(PrecisionError):
        FixedPoint(bits, fl)
