"""The reference semantics of the vision-zoo op kinds against torch (float64), property-tested.

Ops that do not round (``maxpool2d`` with dilation / ceil mode, ``transpose``, ``upsample_nearest``)
must equal torch exactly on the integers; ``conv_transpose2d`` and ``mul`` equal torch on the
accumulator (the integers times ``2^-FL``) before the one requantize; ``avgpool2d`` is within
the reciprocal's error of torch's division (half an output LSB plus ``|x| * 2^-RECIPROCAL_BITS``);
``clamp`` and ``lut`` equal their definitions (``requantize`` then clip; the stored table).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F_
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.elementwise import FUNCTIONS, evaluate, lut_attrs
from fxquant.fixed_point import RECIPROCAL_BITS, FixedPoint, quantize_int, reciprocal, requantize
from fxquant.integer_graph import IntegerGraph, Op, Value, pool_output_size

F = FixedPoint


def _run(kind: str, x: np.ndarray, in_fmt: FixedPoint, out_shape: tuple[int, ...], out_fmt: FixedPoint,
         *, extra: tuple[np.ndarray, FixedPoint] | None = None, **kw) -> np.ndarray:
    inputs = [Value("x", x.shape[1:], in_fmt)]
    if extra is not None:
        inputs.append(Value("y", extra[0].shape[1:], extra[1]))
    op = Op("op", kind, tuple(v.name for v in inputs), "out", out_fmt, **kw)
    values = {v.name: v for v in inputs} | {"out": Value("out", out_shape, out_fmt)}
    g = IntegerGraph(inputs, [op], ["out"], values, {})
    args = [x] + ([extra[0]] if extra is not None else [])
    return g.run(*args)["out"]


def _ints(rng: np.random.Generator, fmt: FixedPoint, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(fmt.qmin, fmt.qmax + 1, size=shape, dtype=np.int64)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), h=st.integers(2, 9), w=st.integers(2, 9), k=st.integers(1, 3),
       s=st.integers(1, 3), p=st.integers(0, 1), d=st.integers(1, 2), ceil=st.booleans())
def test_maxpool_dilation_and_ceil_mode_equal_torch(seed, h, w, k, s, p, d, ceil) -> None:
    if 2 * p > k or d * (k - 1) + 1 > min(h, w) + 2 * p:
        return
    fmt = F(6, 2)
    x = _ints(np.random.default_rng(seed), fmt, (2, 3, h, w))
    ref = F_.max_pool2d(torch.from_numpy(x).double(), k, s, p, d, ceil_mode=ceil).long().numpy()
    oh, ow = pool_output_size(h, k, s, p, d, ceil), pool_output_size(w, k, s, p, d, ceil)
    assert ref.shape[2:] == (oh, ow)
    out = _run("maxpool2d", x, fmt, (3, oh, ow), fmt, attrs={"kernel": (k, k), "stride": (s, s), "padding": (p, p),
                                                          "dilation": (d, d), "ceil_mode": ceil})
    np.testing.assert_array_equal(out, ref)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), h=st.integers(1, 8), w=st.integers(1, 8), kh=st.integers(1, 4),
       kw=st.integers(1, 4), s=st.integers(1, 3), p=st.integers(0, 1), ceil=st.booleans())
def test_avgpool_any_window_is_torch_within_the_reciprocal_error(seed, h, w, kh, kw, s, p, ceil) -> None:
    if 2 * p > min(kh, kw) or kh > h + 2 * p or kw > w + 2 * p:
        return
    in_fmt, out_fmt = F(8, 3), F(10, 5)
    x = _ints(np.random.default_rng(seed), in_fmt, (2, 2, h, w))
    ref = F_.avg_pool2d(torch.from_numpy(x).double() / 8, (kh, kw), s, p, ceil_mode=ceil).numpy()
    out = _run("avgpool2d", x, in_fmt, (2, *ref.shape[2:]), out_fmt,
               attrs={"kernel": (kh, kw), "stride": (s, s), "padding": (p, p), "ceil_mode": ceil})
    assert out.shape == ref.shape
    ref_q = np.clip(ref * 32, out_fmt.qmin, out_fmt.qmax)
    tol = 0.5 + 2.0 ** (5 - RECIPROCAL_BITS) * 128 / 8 + 1e-9  # half an LSB + the reciprocal's relative error
    assert np.abs(out - ref_q).max() <= tol + 0.5


def test_reciprocal_is_exact_for_powers_of_two_and_rounded_otherwise() -> None:
    assert [reciprocal(d) for d in (1, 2, 4, 64)] == [(1, 0), (1, 1), (1, 2), (1, 6)]
    for d in (3, 5, 7, 9, 49, 196, 255):
        m, s = reciprocal(d)
        assert 2 ** (RECIPROCAL_BITS - 1) < m <= 2 ** RECIPROCAL_BITS
        assert abs(m / 2**s - 1 / d) <= 2.0 ** -(s + 1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), h=st.integers(1, 4), w=st.integers(1, 4), k=st.integers(1, 3),
       s=st.integers(1, 3), d=st.integers(1, 2), g=st.sampled_from([1, 2]), bias=st.booleans(), data=st.data())
def test_conv_transpose2d_equals_torch_on_the_accumulator(seed, h, w, k, s, d, g, bias, data) -> None:
    p = data.draw(st.integers(0, (k - 1) // 2 * d))
    op_ = data.draw(st.integers(0, max(s, d) - 1))
    rng = np.random.default_rng(seed)
    in_fmt, w_fmt, out_fmt = F(6, 2), F(5, 3), F(16, 5)
    x = _ints(rng, in_fmt, (2, 2 * g, h, w))
    wt = _ints(rng, w_fmt, (2 * g, 2, k, k))
    b = rng.integers(-100, 100, size=2 * g) if bias else None
    acc = F_.conv_transpose2d(torch.from_numpy(x).double(), torch.from_numpy(wt).double(),
                              None if b is None else torch.from_numpy(b).double(), s, p, op_, g, d)
    ref = requantize(acc.long().numpy(), in_fmt.frac_bits + w_fmt.frac_bits, out_fmt)
    out = _run("conv_transpose2d", x, in_fmt, tuple(acc.shape[1:]), out_fmt, weight=wt, weight_fmt=w_fmt, bias=b,
               attrs={"stride": (s, s), "padding": (p, p), "output_padding": (op_, op_), "dilation": (d, d),
                      "groups": g})
    np.testing.assert_array_equal(out, ref)


def test_mul_broadcasts_a_gate_and_requantizes_once() -> None:
    rng = np.random.default_rng(3)
    a_fmt, b_fmt, out_fmt = F(8, 4), F(8, 7), F(8, 4)
    a, b = _ints(rng, a_fmt, (2, 3, 4, 4)), _ints(rng, b_fmt, (2, 3, 1, 1))
    out = _run("mul", a, a_fmt, (3, 4, 4), out_fmt, extra=(b, b_fmt))
    np.testing.assert_array_equal(out, requantize(a * b, 11, out_fmt))
    assert quantize_int(np.array([(a[0, 0, 0, 0] / 16) * (b[0, 0, 0, 0] / 128)]), out_fmt)[0] == out[0, 0, 0, 0]


def test_clamp_is_requantize_then_clip_and_equals_clipping_first() -> None:
    x = np.arange(-128, 128, dtype=np.int64).reshape(1, 256)
    out = _run("clamp", x, F(8, 4), (256,), F(6, 2), attrs={"lo": 0, "hi": 24})
    np.testing.assert_array_equal(out, np.clip(requantize(x, 4, F(6, 2)), 0, 24))
    real = np.clip(x / 16, 0.0, 6.0)  # q(clamp(x)) == clamp(q(x)): rounding is monotone
    np.testing.assert_array_equal(out, quantize_int(real, F(6, 2)))


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_lut_is_the_float64_function_rounded_once(name: str) -> None:
    in_fmt, out_fmt = F(7, 4), F(8, 4)
    params = {"elu": {"alpha": 0.5}}.get(name)
    attrs = lut_attrs(name, in_fmt, out_fmt, params)
    x = np.arange(in_fmt.qmin, in_fmt.qmax + 1, dtype=np.int64).reshape(1, -1)
    out = _run("lut", x, in_fmt, (x.shape[1],), out_fmt, attrs=attrs)
    want = quantize_int(evaluate(name, x / 16.0, params), out_fmt)
    np.testing.assert_array_equal(out, want)
    torch_fn = {"gelu_tanh": lambda t: F_.gelu(t, approximate="tanh"), "exp": torch.exp,
                "elu": lambda t: F_.elu(t, 0.5)}.get(name) or getattr(F_, name, None) or getattr(torch, name)
    np.testing.assert_array_equal(quantize_int(torch_fn(torch.from_numpy(x / 16.0)).numpy(), out_fmt), want)


def test_upsample_and_transpose_equal_torch() -> None:
    x = _ints(np.random.default_rng(5), F(6, 2), (2, 3, 2, 4))
    up = _run("upsample_nearest", x, F(6, 2), (3, 4, 12), F(6, 2), attrs={"scale": (2, 3)})
    np.testing.assert_array_equal(up, F_.interpolate(torch.from_numpy(x).double(), scale_factor=(2, 3)).long().numpy())
    tr = _run("transpose", x, F(6, 2), (4, 3, 2), F(6, 2), attrs={"perm": (2, 0, 1)})
    np.testing.assert_array_equal(tr, torch.from_numpy(x).permute(0, 3, 1, 2).numpy())
    assert math.prod(tr.shape) == x.size
