"""The reference semantics of the vision-zoo op kinds against torch (float64), property-tested.

Ops that do not round (``maxpool2d`` with dilation / ceil mode, ``transpose``, ``upsample_nearest``)
must equal torch exactly on the integers; ``conv_transpose2d`` and ``mul`` equal torch on the
accumulator (the integers times ``2^-FL``) before the one requantize; ``avgpool2d`` is within
the reciprocal's error of torch's division (half an output LSB plus ``|x| * 2^-RECIPROCAL_BITS``);
``clamp`` and ``lut`` equal their definitions (``requantize`` then clip; the stored table).

Transformer kinds (issue 14): ``embedding`` equals torch's gather exactly (or quantized once when
requantized), ``slice`` equals torch indexing, batched ``matmul`` equals ``torch.matmul`` on the
accumulator and reaches its bound; ``softmax`` and ``layernorm`` are within their stated error
bounds of torch's float64 ``softmax`` / ``layer_norm`` on the dequantized inputs (the bounds of
``docs/number_format.md``), with the edge rows (all masked, constant, tiny variance) pinned.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F_
from hypothesis import given, settings
from hypothesis import strategies as st

from fxquant.elementwise import FUNCTIONS, evaluate, lut_attrs
from fxquant.errors import InputRangeError, UnsupportedOpError
from fxquant.fixed_point import (LAYERNORM_FRAC_BITS, RECIPROCAL_BITS, SOFTMAX_EXP_BITS, SOFTMAX_GUARD_BITS,
                                 FixedPoint, bit_length64, exp_table_size, isqrt64, layernorm_eps, quantize_int,
                                 reciprocal, requantize, row_reciprocal, softmax_exp_table)
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


# =========================================================================== transformer kinds (issue 14)


def _graph(ops_inputs: list[Value], op: Op, out_shape: tuple[int, ...]) -> IntegerGraph:
    values = {v.name: v for v in ops_inputs} | {op.output: Value(op.output, out_shape, op.out_fmt)}
    return IntegerGraph(ops_inputs, [op], [op.output], values, {})


@settings(max_examples=200, deadline=None)
@given(xs=st.lists(st.integers(0, 2**62), min_size=1, max_size=20))
def test_isqrt64_and_bit_length64_equal_python(xs) -> None:
    a = np.array(xs, dtype=np.int64)
    assert isqrt64(a).tolist() == [math.isqrt(x) for x in xs]
    assert bit_length64(a).tolist() == [x.bit_length() for x in xs]


def test_isqrt64_edges() -> None:
    edges = [0, 1, 2, 3, 4, 2**62, 2**62 - 1, (2**31 - 1) ** 2, (2**31 - 1) ** 2 - 1, 2**60]
    assert isqrt64(np.array(edges)).tolist() == [math.isqrt(x) for x in edges]


@settings(max_examples=200, deadline=None)
@given(s=st.integers(0, 2**40), k=st.integers(0, 60))
def test_row_reciprocal_rounds_half_up(s, k) -> None:
    r = int(row_reciprocal(np.array([s]), k)[0])
    if s == 0:
        assert r == 0
    else:
        exact = Fraction(2**k, s)
        assert abs(r - exact) <= Fraction(1, 2) and (r - exact != Fraction(-1, 2))


# ------------------------------------------------------------------------------- embedding
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), vocab=st.integers(1, 30), dim=st.integers(1, 6), seq=st.integers(1, 5),
       w_bits=st.integers(2, 16), w_fl=st.integers(-3, 18), requant=st.booleans(), data=st.data())
def test_embedding_is_torch_gather_exact_or_requantized(seed, vocab, dim, seq, w_bits, w_fl, requant, data) -> None:
    rng = np.random.default_rng(seed)
    w_fmt = F(w_bits, w_fl)
    out_fmt = F(data.draw(st.integers(2, 16)), data.draw(st.integers(-3, 18))) if requant else w_fmt
    table = _ints(rng, w_fmt, (vocab, dim))
    id_fmt = F(max(2, vocab.bit_length() + 1), 0)
    ids = rng.integers(0, vocab, size=(3, seq))
    op = Op("emb", "embedding", ("ids",), "out", out_fmt, weight=table, weight_fmt=w_fmt)
    out = _graph([Value("ids", (seq,), id_fmt)], op, (seq, dim)).run(ids)["out"]
    ref = F_.embedding(torch.from_numpy(ids), torch.from_numpy(table)).numpy()
    if not requant:
        np.testing.assert_array_equal(out, ref)
    else:  # the gathered real values, quantized once to out_fmt (round half even, saturate)
        np.testing.assert_array_equal(out, quantize_int(np.ldexp(ref.astype(np.float64), -w_fl), out_fmt))


@pytest.mark.parametrize("bad", [-1, 7, 100])
def test_embedding_refuses_out_of_range_ids_naming_the_op(bad) -> None:
    op = Op("encoder.tok", "embedding", ("ids",), "out", F(8, 6), weight=np.zeros((7, 2), np.int64),
            weight_fmt=F(8, 6))
    g = _graph([Value("ids", (3,), F(8, 0))], op, (3, 2))
    with pytest.raises(InputRangeError, match=rf"op 'encoder.tok' \(embedding\): token id {bad} outside \[0, 7\)"):
        g.run(np.array([[0, bad, 1]]))
    with pytest.raises(ValueError):  # an InputRangeError is a ValueError too
        g.run(np.array([[bad, 0, 0]]))


def test_quantize_inputs_refuses_ids_it_would_round_or_clip() -> None:
    """Token ids from the host are integers in [0, V): 300 would saturate to a valid id 127 and 2.5
    would round; both are refused naming the op (other inputs still saturate as usual)."""
    op = Op("tok", "embedding", ("ids",), "out", F(8, 6), weight=np.zeros((128, 2), np.int64), weight_fmt=F(8, 6))
    g = _graph([Value("ids", (2,), F(8, 0))], op, (2, 2))
    np.testing.assert_array_equal(g.quantize_inputs(np.array([[0.0, 127.0]]))[0], [[0, 127]])
    for bad in (300.0, 2.5, -1.0):
        with pytest.raises(InputRangeError, match=r"op 'tok' \(embedding\): input 'ids' holds"):
            g.quantize_inputs(np.array([[0.0, bad]]))


# ------------------------------------------------------------------------------- softmax
def _softmax_bound(out_fmt: FixedPoint, length: int, exp_bits: int = SOFTMAX_EXP_BITS) -> float:
    """Half an output LSB + the table error (L+1) 2^-(E+1) + the reciprocal's 2^-(FL_out+G+1)."""
    return (2.0 ** -(out_fmt.frac_bits + 1) + (length + 1) * 2.0 ** -(exp_bits + 1)
            + 2.0 ** -(out_fmt.frac_bits + SOFTMAX_GUARD_BITS + 1))


def _float_softmax(x: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """torch softmax (float64) with masked entries at -inf; an all-masked row is 0 (the op's definition)."""
    t = torch.from_numpy(x).masked_fill(torch.from_numpy(~keep), float("-inf"))
    p = torch.softmax(t, dim=-1).numpy()
    return np.nan_to_num(p, nan=0.0)


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**16), bits=st.integers(2, 16), fl=st.integers(-2, 8), heads=st.integers(1, 3),
       q=st.integers(1, 5), length=st.integers(1, 40), out=st.sampled_from([F(8, 7), F(9, 8), F(8, 6), F(16, 15),
                                                                            F(6, 4), F(4, 5), F(12, 11)]),
       masked=st.booleans(), causal=st.booleans(), exp_bits=st.sampled_from([SOFTMAX_EXP_BITS, 8, 20]))
def test_softmax_is_float_softmax_within_the_stated_bound(seed, bits, fl, heads, q, length, out, masked,
                                                          causal, exp_bits) -> None:
    rng = np.random.default_rng(seed)
    in_fmt = F(bits, fl)
    if exp_table_size(in_fmt, exp_bits) > 4096:
        return
    x = _ints(rng, in_fmt, (2, heads, q, length))
    inputs = [Value("x", x.shape[1:], in_fmt)]
    args = [x]
    keep = np.ones(x.shape, bool)
    if masked:  # a padding mask (N, 1, 1, L), nonzero = keep; some rows lose everything
        mask = rng.integers(0, 2, size=(2, 1, 1, length)) * rng.integers(-2, 2, size=(2, 1, 1, length))
        inputs.append(Value("mask", (1, 1, length), F(2, 0)))
        args.append(mask)
        keep &= mask != 0
    if causal:
        keep &= np.tril(np.ones((q, length), bool))
    op = Op("sm", "softmax", tuple(v.name for v in inputs), "out", out,
            attrs={"dim": 3, "causal": causal, "exp_bits": exp_bits})
    y = _graph(inputs, op, x.shape[1:]).run(*args)["out"]
    p = _float_softmax(np.ldexp(x.astype(np.float64), -fl), keep)
    top = out.qmax * 2.0 ** -out.frac_bits
    err = np.abs(y * 2.0 ** -out.frac_bits - np.minimum(p, top))  # saturation of 1.0 is exact clipping
    bound = _softmax_bound(out, length, exp_bits)
    assert err.max() <= bound + 1e-12, (err.max(), bound)
    assert (y[~keep] == 0).all() and (y >= 0).all()


def test_softmax_edge_rows() -> None:
    """An all-masked row is 0; a constant row is uniform; one saturated winner takes qmax; ties of
    masked large scores do not move the max (masked entries are -inf, not qmin)."""
    in_fmt, out = F(8, 4), F(8, 7)
    x = np.array([[[5, 5, 5, 5], [127, -128, -128, -128], [-128, 127, 3, -128], [-128, -128, -128, -128]]])
    mask = np.array([[[1], [1], [1], [0]]])  # (N, 4, 1) broadcast over keys: row 3 masked
    op = Op("sm", "softmax", ("x", "m"), "out", out, attrs={"dim": 2})
    g = _graph([Value("x", (4, 4), in_fmt), Value("m", (4, 1), F(2, 0))], op, (4, 4))
    y = g.run(x, mask)["out"][0]
    assert y[0].tolist() == [32, 32, 32, 32]  # 1/4 at <8,7>
    assert y[1].tolist() == [127, 0, 0, 0]  # exp(-16) * 2^15 rounds to 0; 1.0 saturates to 127/128
    assert y[3].tolist() == [0, 0, 0, 0]
    # masked large scores: the kept entries' softmax is unchanged by them
    m2 = np.array([[[1, 0, 1, 1]]])
    op2 = Op("sm", "softmax", ("x", "m"), "out", out, attrs={"dim": 2})
    g2 = _graph([Value("x", (1, 4), in_fmt), Value("m", (1, 4), F(2, 0))], op2, (1, 4))
    a = g2.run(np.array([[[0, 127, 0, 0]]]), m2)["out"]
    b = g2.run(np.array([[[0, -128, 0, 0]]]), m2)["out"]
    np.testing.assert_array_equal(a, b)
    assert a[0, 0].tolist() == [43, 0, 43, 43]


def test_causal_softmax_equals_torch_sdpa_mask() -> None:
    """``causal`` keeps key j <= query i (torch's is_causal, top-left aligned), also for S_q != S_k."""
    rng = np.random.default_rng(7)
    x = _ints(rng, F(8, 4), (2, 3, 5))
    op = Op("sm", "softmax", ("x",), "out", F(16, 14), attrs={"dim": 2, "causal": True})
    y = _graph([Value("x", (3, 5), F(8, 4))], op, (3, 5)).run(x)["out"]
    bias = torch.zeros(3, 5, dtype=torch.float64).masked_fill(~torch.ones(3, 5, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(torch.from_numpy(x / 16.0) + bias, dim=-1).numpy()
    assert np.abs(y * 2.0 ** -14 - p).max() <= _softmax_bound(F(16, 14), 5)
    assert (y[:, 0, 1:] == 0).all() and (y[:, 0, 0] == 1 << 14).all()


def test_softmax_table_is_exp_rounded_and_truncated_at_zero() -> None:
    for fmt in (F(8, 4), F(6, -1), F(12, 8), F(3, 0)):
        t = softmax_exp_table(fmt)
        assert t.size == exp_table_size(fmt) <= 1 << fmt.bits and t[0] == 1 << SOFTMAX_EXP_BITS
        want = np.rint(np.exp(-np.arange(t.size) * 2.0 ** -fmt.frac_bits) * 2.0 ** SOFTMAX_EXP_BITS)
        np.testing.assert_array_equal(t, want)
        if t.size < 1 << fmt.bits:  # truncated: the last entry and every later index are 0
            assert t[-1] == 0 and t[-2] > 0


# ------------------------------------------------------------------------------- layernorm
def _layernorm_bound(out_fmt: FixedPoint, n: int, gamma_max: float) -> float:
    """Half an output LSB + |gamma| (half an LSB of h + sqrt(n-1) (sqrt(n) 2^-29 + 2^-20))."""
    h_err = 2.0 ** -(LAYERNORM_FRAC_BITS + 1) + math.sqrt(max(n - 1, 0)) * (math.sqrt(n) * 2.0 ** -29 + 2.0 ** -20)
    return 2.0 ** -(out_fmt.frac_bits + 1) + gamma_max * h_err


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 64), rows=st.integers(1, 3), bits=st.integers(2, 16),
       fl=st.integers(-3, 12), w_bits=st.integers(2, 16), w_fl=st.integers(-2, 14), out_bits=st.integers(4, 16),
       eps=st.sampled_from([0.0, 1e-12, 1e-5, 1e-2, 1.0]), bias=st.booleans(), tiny=st.booleans())
def test_layernorm_is_torch_layer_norm_within_the_stated_bound(seed, n, rows, bits, fl, w_bits, w_fl, out_bits, eps,
                                                               bias, tiny) -> None:
    rng = np.random.default_rng(seed)
    in_fmt, w_fmt = F(bits, fl), F(w_bits, w_fl)
    out_fmt = F(out_bits, out_bits - 4)
    x = _ints(rng, in_fmt, (2, rows, n))
    if tiny:  # rows varying by one LSB around a large offset: the variance is tiny and eps matters
        x = np.clip(in_fmt.qmax // 2 + rng.integers(0, 2, size=x.shape), in_fmt.qmin, in_fmt.qmax)
    gamma = _ints(rng, w_fmt, (n,))
    fl_acc = w_fl + LAYERNORM_FRAC_BITS
    beta = rng.integers(-(2 ** (fl_acc + 1)), 2 ** (fl_acc + 1), size=n) if bias else None
    if beta is not None:
        beta = np.clip(beta, -(2**31), 2**31 - 1)
    eps_d = layernorm_eps(eps, n, in_fmt)
    op = Op("ln", "layernorm", ("x",), "out", out_fmt, weight=gamma, weight_fmt=w_fmt, bias=beta,
            attrs={"dim": 2, "eps": eps_d})
    y = _graph([Value("x", (rows, n), in_fmt)], op, (rows, n)).run(x)["out"]
    eps_honoured = eps_d / (n**3 * 2.0 ** (2 * fl))  # the op's eps exactly (layernorm_eps rounds it once)
    ref = F_.layer_norm(torch.from_numpy(np.ldexp(x.astype(np.float64), -fl)), (n,),
                        torch.from_numpy(np.ldexp(gamma.astype(np.float64), -w_fl)),
                        None if beta is None else torch.from_numpy(np.ldexp(beta.astype(np.float64), -fl_acc)),
                        eps=eps_honoured).numpy()
    beta_real = np.zeros(n) if beta is None else np.ldexp(beta.astype(np.float64), -fl_acc)
    ref = np.where(np.isnan(ref), beta_real, ref)  # 0/0 (constant row, eps 0): the op defines x_hat = 0
    lsb = 2.0 ** -out_fmt.frac_bits
    err = np.abs(y * lsb - np.clip(ref, out_fmt.qmin * lsb, out_fmt.qmax * lsb))
    bound = _layernorm_bound(out_fmt, n, float(np.abs(gamma).max()) * 2.0 ** -w_fl)
    assert err.max() <= bound * (1 + 1e-9) + 1e-12, (err.max(), bound)


def test_layernorm_constant_rows_give_beta_and_eps_matters() -> None:
    in_fmt, w_fmt, out_fmt = F(8, 4), F(8, 6), F(12, 6)
    gamma = np.full(4, 64)  # 1.0
    beta = np.array([0, 1, -1, 3]) << (6 + LAYERNORM_FRAC_BITS)  # 0, 1, -1, 3
    for eps in (0.0, 1e-5):
        op = Op("ln", "layernorm", ("x",), "out", out_fmt, weight=gamma, weight_fmt=w_fmt, bias=beta,
                attrs={"dim": 2, "eps": layernorm_eps(eps, 4, in_fmt)})
        g = _graph([Value("x", (2, 4), in_fmt)], op, (2, 4))
        y = g.run(np.array([[[7, 7, 7, 7], [-128, -128, -128, -128]]]))["out"]
        np.testing.assert_array_equal(y[0], np.tile([0, 64, -64, 192], (2, 1)))  # x_hat = 0: beta exactly
    # a row (0, 1) at <8,4> has variance 1/1024: eps = 1/1024 halves x_hat^2 (x_hat = +-1/sqrt(2))
    op = Op("ln", "layernorm", ("x",), "out", F(16, 14), weight=np.array([64, 64]), weight_fmt=w_fmt,
            attrs={"dim": 1, "eps": layernorm_eps(1 / 1024, 2, in_fmt)})
    y = _graph([Value("x", (2,), in_fmt)], op, (2,)).run(np.array([[0, 1]]))["out"]
    assert np.abs(y[0] * 2.0 ** -14 - np.array([-1, 1]) / math.sqrt(2)).max() <= 2.0 ** -14
    assert layernorm_eps(1e-5, 64, F(8, 4)) == round(Fraction(1e-5) * 64**3 * 256)


@pytest.mark.parametrize(("n", "bits"), [(1625, 16), (1 << 16, 8)])
def test_layernorm_rows_at_the_legality_limits(n: int, bits: int) -> None:
    """The widest rows legality admits (D just under 2^62): random, one spike over a constant row,
    and one-LSB variations near qmax (tiny variance), each within the stated x_hat error of torch."""
    from fxquant.fixed_point import layernorm_rows
    from fxquant.legality import layernorm_d_bound

    fmt = F(bits, 4)
    assert layernorm_d_bound(n, bits, layernorm_eps(1e-5, n, fmt)) < 2**62
    rng = np.random.default_rng(n)
    spike = np.full((1, n), fmt.qmin)
    spike[0, 0] = fmt.qmax
    rows = np.concatenate([_ints(rng, fmt, (1, n)), spike, fmt.qmax - rng.integers(0, 2, size=(1, n))])
    for eps in (0.0, 1e-5):
        eps_d = layernorm_eps(eps, n, fmt)
        h = layernorm_rows(rows, eps_d) * 2.0 ** -LAYERNORM_FRAC_BITS
        ref = F_.layer_norm(torch.from_numpy(rows / 16.0), (n,), eps=eps_d / (n**3 * 256.0)).numpy()
        bound = 2.0 ** -(LAYERNORM_FRAC_BITS + 1) + math.sqrt(n - 1) * (math.sqrt(n) * 2.0 ** -29 + 2.0 ** -20)
        assert np.abs(h - ref).max() <= bound


def test_layernorm_h_bound_holds_at_the_extreme_row() -> None:
    """One entry far from the rest reaches |x_hat| = sqrt(n - 1): the accumulator bound covers it."""
    from fxquant.fixed_point import layernorm_rows
    from fxquant.integer_graph import layernorm_h_bound

    for n in (2, 3, 64, 1000):
        row = np.zeros((1, n), np.int64)
        row[0, 0] = 32767
        h = layernorm_rows(row, 0)
        assert abs(int(h[0, 0])) <= layernorm_h_bound(n)
        assert abs(h[0, 0] * 2.0 ** -LAYERNORM_FRAC_BITS - math.sqrt(n - 1)) <= 2.0 ** -15 * math.sqrt(n)


# ------------------------------------------------------------------------------- slice
@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_slice_and_select_equal_torch_indexing(seed, shape, data) -> None:
    shape = tuple(shape)
    x = _ints(np.random.default_rng(seed), F(6, 2), (2, *shape))
    dim = data.draw(st.integers(1, len(shape)))
    size = shape[dim - 1]
    t = torch.from_numpy(x)
    if data.draw(st.booleans()):
        index = data.draw(st.integers(0, size - 1))
        attrs = {"dim": dim, "index": index}
        ref = t.select(dim, index).numpy()
    else:
        start = data.draw(st.integers(0, size - 1))
        stop = data.draw(st.integers(start + 1, size))
        step = data.draw(st.integers(1, 3))
        attrs = {"dim": dim, "start": start, "stop": stop, "step": step}
        ref = t.narrow(dim, start, stop - start)[(slice(None),) * dim + (slice(None, None, step),)].numpy()
    op = Op("sl", "slice", ("x",), "out", F(6, 2), attrs=attrs)
    out = _graph([Value("x", shape, F(6, 2))], op, ref.shape[1:]).run(x)["out"]
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("attrs", [{"dim": 0, "index": 0}, {"dim": 1, "index": -1}, {"dim": 1, "start": -2, "stop": 3},
                                   {"dim": 1, "start": 0, "stop": None}, {"dim": 3, "start": 0, "stop": 1},
                                   {"dim": 1, "start": 2, "stop": 1}, {"dim": 1, "start": 2, "stop": 2},
                                   {"dim": 1, "start": 0, "stop": 2, "step": 0}])
def test_slice_refuses_unresolved_attributes(attrs) -> None:
    op = Op("blocks.0.cls", "slice", ("x",), "out", F(6, 2), attrs=attrs)
    with pytest.raises(UnsupportedOpError, match=r"op 'blocks.0.cls' \(slice\)"):
        _graph([Value("x", (4, 3), F(6, 2))], op, (3,)).run(np.zeros((1, 4, 3), np.int64))


# ------------------------------------------------------------------------------- batched matmul
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), heads=st.integers(1, 3), s=st.integers(1, 4), d=st.integers(1, 5),
       bcast=st.booleans(), bits=st.integers(2, 16))
def test_batched_matmul_broadcasts_and_its_bound_is_reached(seed, heads, s, d, bcast, bits) -> None:
    rng = np.random.default_rng(seed)
    fa, fb, out = F(bits, 3), F(8, 5), F(16, 0)
    a = _ints(rng, fa, (2, heads, s, d))
    b = _ints(rng, fb, (2, 1 if bcast else heads, d, s))
    a[0], b[0] = fa.qmin, fb.qmin  # sample 0: every product at its worst case
    op = Op("mm", "matmul", ("a", "b"), "out", out)
    g = _graph([Value("a", a.shape[1:], fa), Value("b", b.shape[1:], fb)], op, (heads, s, s))
    y = g.run(a, b)["out"]
    acc = torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(y, requantize(acc, 8, out))
    assert int(np.abs(acc).max()) == g.accumulator_bound(op) == (1 << (bits - 1)) * 128 * d


# ------------------------------------------------------------------------------- measured error (docs)
def measured_errors(rows: int = 20000, seed: int = 0) -> dict[str, float]:
    """Max error in output LSBs over ``rows`` seeded random rows: softmax <8,4> scores of L = 64 into
    <8,7> (half with a padding mask), layernorm <8,3> rows of n = 64, gamma <8,6> ~ 1, into <8,4>.
    ``python -m tests.test_integer_graph_ops`` prints them (docs/number_format.md quotes them)."""
    rng = np.random.default_rng(seed)
    in_fmt, out = F(8, 4), F(8, 7)
    x = np.clip(np.rint(rng.standard_normal((1, rows, 64)) * 40), -128, 127).astype(np.int64)
    mask = (rng.random((1, rows, 64)) > 0.25) | (np.arange(rows) % 2 == 0)[None, :, None]
    op = Op("sm", "softmax", ("x", "m"), "out", out, attrs={"dim": 2})
    y = _graph([Value("x", (rows, 64), in_fmt), Value("m", (rows, 64), F(2, 0))], op, (rows, 64)).run(
        x, mask.astype(np.int64))["out"]
    p = np.minimum(_float_softmax(x / 16.0, mask), 127 / 128)
    sm = float(np.abs(y / 128 - p).max() * 128)
    gamma = np.clip(64 + rng.integers(-8, 9, 64), -128, 127)
    op = Op("ln", "layernorm", ("x",), "out", F(8, 4), weight=gamma, weight_fmt=F(8, 6),
            attrs={"dim": 2, "eps": layernorm_eps(1e-5, 64, F(8, 3))})
    xl = np.clip(np.rint(rng.standard_normal((1, rows, 64)) * 30 + rng.standard_normal((1, rows, 1)) * 20),
                 -128, 127).astype(np.int64)
    yl = _graph([Value("x", (rows, 64), F(8, 3))], op, (rows, 64)).run(xl)["out"]
    ref = F_.layer_norm(torch.from_numpy(xl / 8.0), (64,), torch.from_numpy(gamma / 64.0), None,
                        eps=layernorm_eps(1e-5, 64, F(8, 3)) / (64**3 * 64)).numpy()
    ln = float(np.abs(yl / 16 - np.clip(ref, -8, 127 / 16)).max() * 16)
    return {"softmax_lsb": sm, "softmax_bound_lsb": _softmax_bound(out, 64) * 128,
            "layernorm_lsb": ln, "layernorm_bound_lsb": _layernorm_bound(F(8, 4), 64, 72 / 64) * 16}


def test_measured_errors_are_within_the_bounds() -> None:
    e = measured_errors(rows=2000)
    assert e["softmax_lsb"] <= e["softmax_bound_lsb"] and e["layernorm_lsb"] <= e["layernorm_bound_lsb"], e


if __name__ == "__main__":
    print(measured_errors())
