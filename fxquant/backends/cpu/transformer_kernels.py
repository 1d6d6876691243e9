"""TensorIR kernels for the transformer kinds (issue 14), written like :mod:`.vision_kernels`.

Low-level TIR, destination passing, a symbolic batch ``n``, cached on their hashable arguments;
each is bit-exact with the executor of the same kind in :mod:`fxquant.integer_ops_transformer` /
:mod:`fxquant.integer_graph` (the row arithmetic of :func:`fxquant.fixed_point.softmax_rows` and
:func:`fxquant.fixed_point.layernorm_rows`, step for step, in int32 / int64):

* :func:`matmul` ``y = requantize(a @ b)`` of two activations (``Q K^T``, ``attention V``): rank 2..4
  operands of equal rank whose leading dims are equal or 1 (broadcast), int8 (or the uint8 of a
  9-bit softmax output) x int8, int32 accumulation (``|acc| <= 2^(BW_a-1) 2^(BW_b-1) K``, checked
  against int32 by the target), the shift epilogue of :mod:`fxquant.backends.tvm_epilogue`. With
  ``N % 8 == 0``: per (batch, head) ``b`` is first packed as int16 k-pairs ``bp[k/2, j, 2]`` (zero past
  ``K``), then 8 output columns take one ``vpmaddwd`` per k-pair against the broadcast pair
  ``(a[i, 2k'], a[i, 2k'+1])`` (exact: a pair sum is at most ``2 * 255 * 128``); otherwise one scalar
  int32 sum per output.
* :func:`embedding` ``y = requantize(table[ids])``: int32 (graph input) or int8 ids, an int32 copy of
  the table; an id is clamped into ``[0, V)`` for memory safety only -- the runner refuses ids outside
  it before the call (:class:`~fxquant.errors.InputRangeError`), as the reference does.
* :func:`constant_broadcast` ``y[b] = c``: a ``constant`` op's int8 integers copied into every sample.
* :func:`slice_copy` ``x[..., start:start+count*step:step, ...]`` on one axis (a select is a slice of
  one entry whose axis the output shape drops): contiguous inner blocks copied as vectors.
* :func:`softmax` per row of ``L``: ``m`` = max over kept entries (``qmin`` when none),
  ``e = TABLE[min(m - k, T - 1)]`` (0 where masked), ``s = sum e`` (int32: ``L 2^E < 2^31`` by
  legality), ``r = (2^(K+1) + s) // (2 s)`` (int64, 0 when ``s = 0``), ``y = sat(rhe(e r 2^-(E+G)))``;
  three passes over the row (max, sum, output) recompute ``e`` instead of storing it. The mask is an
  int8 input broadcast over the scores (dims equal or 1), nonzero = keep; ``causal`` keeps key
  ``j <= `` query ``i``.
* :func:`layernorm` per row of ``N``: ``S = sum k``, ``c = N k - S``, ``D = sum c^2 + eps_D`` (int64),
  ``t = (62 - bit_length(D)) // 2`` (a 6-step binary search), ``sigma = isqrt((D << 2t) // N)`` (the
  reference's 32-step restoring square root, a bounded loop), ``r = (2^(Y+1) + sigma) // (2 sigma)``,
  ``h = rhe((c << t) r 2^(FL_h - Y))``, then ``gamma h + beta`` requantized from ``FL_w + FL_h`` to the
  output (round half even, saturate, ReLU) in int64.
"""

from __future__ import annotations

import math
from functools import lru_cache

from tvm import tirx
from tvm.script import tirx as T

from fxquant.backends.cpu.intrinsics import broadcast_word, pmaddwd
from fxquant.backends.cpu.kernels import PARALLEL_MIN_WORK, VEC, _finish
from fxquant.backends.cpu.vision_kernels import _flat_offset, _idx, _lanes, _requantize_dynamic, _vt
from fxquant.backends.tvm_epilogue import Requant, requantize
from fxquant.fixed_point import LAYERNORM_FRAC_BITS, LAYERNORM_NORM_BITS, LAYERNORM_RECIP_BITS, SOFTMAX_GUARD_BITS


def _broadcast_strides(shape: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of row-major ``shape`` read at the coordinates of ``out`` (0 on broadcast axes)."""
    return tuple(math.prod(shape[i + 1:]) if d == o else 0 for i, (d, o) in enumerate(zip(shape, out)))


# ----------------------------------------------------------------------------------------- matmul
@lru_cache(maxsize=None)
def matmul(shape_a: tuple[int, ...], shape_b: tuple[int, ...], rq: Requant, dtype_a: str = "int8",
           dtype_b: str = "int8", name: str = "fxq_matmul") -> tirx.PrimFunc:
    """``y = requantize(a @ b, rq)`` over ``[n, *lead, M, K] x [n, *lead', K, N]`` (leads broadcast)."""
    if len(shape_a) != len(shape_b) or len(shape_a) < 2:
        raise ValueError(f"matmul of shapes {shape_a} x {shape_b}: equal ranks >= 2 only")
    M, K = shape_a[-2:]
    N = shape_b[-1]
    out_lead = tuple(max(p, q) for p, q in zip(shape_a[:-2], shape_b[:-2]))
    out = out_lead + (M, N)
    OUTL = math.prod(out_lead)
    sa = _broadcast_strides(shape_a[:-2], out_lead)
    sb = _broadcast_strides(shape_b[:-2], out_lead)
    SA, SB = tuple(s * M * K for s in sa), tuple(s * K * N for s in sb)
    MA, MB, MY = math.prod(shape_a), math.prod(shape_b), math.prod(out)
    WORK = OUTL * M * N * K
    if N % VEC:
        return _matmul_scalar(shape_a, shape_b, out_lead, SA, SB, rq, dtype_a, dtype_b, name)
    K2, NV = (K + 1) // 2, N // VEC

    def a_word(af, abase, i, k2):
        """The int16 pair ``(a[i, 2 k2], a[i, 2 k2 + 1])`` (0 past ``K``) as one 32-bit word."""
        lo = T.Cast("int32", af[abase + i * K + 2 * k2])
        hi = T.Select(2 * k2 + 1 < K, T.Cast("int32", af[abase + i * K + T.min(2 * k2 + 1, K - 1)]), T.int32(0))
        return (lo & T.int32(0xFFFF)) | (hi << T.int32(16))

    @T.macro
    def task(af, bf, yf, q):
        abase = T.meta_var((q // OUTL) * MA + _flat_offset(q % OUTL, out_lead, SA))
        bbase = T.meta_var((q // OUTL) * MB + _flat_offset(q % OUTL, out_lead, SB))
        bp = T.decl_buffer((K2 * N * 2,), "int16")  # b as int16 k-pairs: bp[k2, j, 2] = b[2k2 + (0, 1), j]
        for k2, j in T.grid(K2, N):
            bp[(k2 * N + j) * 2] = T.Cast("int16", bf[bbase + 2 * k2 * N + j])
            bp[(k2 * N + j) * 2 + 1] = T.Select(2 * k2 + 1 < K, T.Cast("int16", bf[
                bbase + T.min(2 * k2 + 1, K - 1) * N + j]), T.int16(0))
        for i, jv in T.grid(M, NV):
            acc = T.decl_buffer((VEC,), "int32")
            acc[T.ramp(0, 1, VEC)] = T.broadcast(T.int32(0), VEC)
            for k2 in range(K2):
                acc[T.ramp(0, 1, VEC)] = acc[T.ramp(0, 1, VEC)] + pmaddwd(
                    bp[T.ramp((k2 * N + jv * VEC) * 2, 1, 2 * VEC)], broadcast_word(a_word(af, abase, i, k2), VEC,
                                                                                     "int16x16"))
            yf[T.ramp(q * (M * N) + i * N + jv * VEC, 1, VEC)] = T.Cast("int8x8", requantize(
                acc[T.ramp(0, 1, VEC)], rq, VEC))

    @T.prim_func
    def kernel(a_h: T.handle, b_h: T.handle, y_h: T.handle):
        n = T.int64()
        a = T.match_buffer(a_h, (n,) + tuple(shape_a), dtype_a)
        b = T.match_buffer(b_h, (n,) + tuple(shape_b), dtype_b)
        y = T.match_buffer(y_h, (n,) + tuple(out), "int8")
        af = T.decl_buffer((n * MA,), dtype_a, data=a.data)
        bf = T.decl_buffer((n * MB,), dtype_b, data=b.data)
        yf = T.decl_buffer((n * MY,), "int8", data=y.data)
        if n * WORK >= PARALLEL_MIN_WORK:
            for q in T.parallel(n * OUTL):
                task(af, bf, yf, q)
        else:
            for q in range(n * OUTL):
                task(af, bf, yf, q)

    return _finish(kernel, name)


def _matmul_scalar(shape_a: tuple[int, ...], shape_b: tuple[int, ...], out_lead: tuple[int, ...],
                   SA: tuple[int, ...], SB: tuple[int, ...], rq: Requant, dtype_a: str, dtype_b: str,
                   name: str) -> tirx.PrimFunc:
    """:func:`matmul` for a column count that is not a multiple of 8: one int32 sum per output."""
    M, K = shape_a[-2:]
    N = shape_b[-1]
    out = out_lead + (M, N)
    OUTL = math.prod(out_lead)
    MA, MB, MY = math.prod(shape_a), math.prod(shape_b), math.prod(out)

    @T.macro
    def row(af, bf, yf, q, i):
        for j in range(N):
            acc = T.decl_buffer((1,), "int32")
            acc[0] = T.int32(0)
            for k in range(K):
                acc[0] = acc[0] + T.Cast("int32", af[(q // OUTL) * MA + _flat_offset(q % OUTL, out_lead, SA) + i * K
                                                     + k]) * T.Cast("int32", bf[
                    (q // OUTL) * MB + _flat_offset(q % OUTL, out_lead, SB) + k * N + j])
            yf[q * (M * N) + i * N + j] = T.Cast("int8", requantize(acc[0], rq, 1))

    @T.prim_func
    def kernel(a_h: T.handle, b_h: T.handle, y_h: T.handle):
        n = T.int64()
        a = T.match_buffer(a_h, (n,) + tuple(shape_a), dtype_a)
        b = T.match_buffer(b_h, (n,) + tuple(shape_b), dtype_b)
        y = T.match_buffer(y_h, (n,) + tuple(out), "int8")
        af = T.decl_buffer((n * MA,), dtype_a, data=a.data)
        bf = T.decl_buffer((n * MB,), dtype_b, data=b.data)
        yf = T.decl_buffer((n * MY,), "int8", data=y.data)
        if n * (OUTL * M * N * K) >= PARALLEL_MIN_WORK:
            for t in T.parallel(n * OUTL * M):
                row(af, bf, yf, t // M, t % M)
        else:
            for t in range(n * OUTL * M):
                row(af, bf, yf, t // M, t % M)

    return _finish(kernel, name)


# -------------------------------------------------------------------------------------- embedding
@lru_cache(maxsize=None)
def embedding(ids_shape: tuple[int, ...], rows: int, dim: int, rq: Requant, ids_dtype: str = "int32",
              name: str = "fxq_embedding") -> tirx.PrimFunc:
    """``y[..., d] = requantize(table[ids[...], d], rq)``; ``table`` int32 ``[rows, dim]``."""
    P = math.prod(ids_shape)
    L = _lanes(dim)

    @T.prim_func
    def kernel(ids_h: T.handle, t_h: T.handle, y_h: T.handle):
        n = T.int64()
        ids = T.match_buffer(ids_h, (n,) + tuple(ids_shape), ids_dtype)
        table = T.match_buffer(t_h, (rows * dim,), "int32")
        y = T.match_buffer(y_h, (n,) + tuple(ids_shape) + (dim,), "int8")
        idf = T.decl_buffer((n * P,), ids_dtype, data=ids.data)
        yf = T.decl_buffer((n * P * dim,), "int8", data=y.data)
        for p in range(n * P):
            for d in range(dim // L):
                yf[_idx(p * dim + d * L, L)] = T.Cast(_vt("int8", L), requantize(table[_idx(
                    T.max(T.min(T.Cast("int32", idf[p]), rows - 1), 0) * dim + d * L, L)], rq, L))

    return _finish(kernel, name)


# ------------------------------------------------------------------------------------------ slice
@lru_cache(maxsize=None)
def slice_copy(shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int, start: int, count: int, step: int,
               dtype: str = "int8", name: str = "fxq_slice") -> tirx.PrimFunc:
    """``y = x[..., start : start + count*step : step, ...]`` on non-batch ``axis`` (0-based), into
    ``out_shape`` (the same elements; a select drops the axis)."""
    OUTER, A, INNER = math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1:])
    M, MY = math.prod(shape), math.prod(out_shape)
    if MY != OUTER * count * INNER:
        raise ValueError(f"slice of {shape} on axis {axis} ({count} entries) into {out_shape}")
    L = _lanes(INNER)

    @T.prim_func
    def kernel(x_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n,) + tuple(shape), dtype)
        y = T.match_buffer(y_h, (n,) + tuple(out_shape), dtype)
        xf = T.decl_buffer((n * M,), dtype, data=x.data)
        yf = T.decl_buffer((n * MY,), dtype, data=y.data)
        for r, j in T.grid(n * OUTER, count):
            for i in range(INNER // L):
                yf[_idx((r * count + j) * INNER + i * L, L)] = xf[_idx((r * A + start + j * step) * INNER + i * L, L)]

    return _finish(kernel, name)


# --------------------------------------------------------------------------------------- constant
@lru_cache(maxsize=None)
def constant_broadcast(shape: tuple[int, ...], dtype: str = "int8", name: str = "fxq_constant") -> tirx.PrimFunc:
    """``y[b] = c`` for every sample ``b``: a ``constant`` op's integers ``c`` (flat, ``prod(shape)``)."""
    M = math.prod(shape)
    L = _lanes(M)

    @T.prim_func
    def kernel(c_h: T.handle, y_h: T.handle):
        n = T.int64()
        c = T.match_buffer(c_h, (M,), dtype)
        y = T.match_buffer(y_h, (n,) + tuple(shape), dtype)
        yf = T.decl_buffer((n * M,), dtype, data=y.data)
        for b in range(n):
            for i in range(M // L):
                yf[_idx(b * M + i * L, L)] = c[_idx(i * L, L)]

    return _finish(kernel, name)


# ---------------------------------------------------------------------------------------- softmax
@lru_cache(maxsize=None)
def softmax(shape: tuple[int, ...], mask_shape: tuple[int, ...] | None, causal: bool, in_qmin: int,
            table_size: int, exp_bits: int, recip_bits: int, out_bits: int, out_dtype: str = "int8",
            name: str = "fxq_softmax") -> tirx.PrimFunc:
    """Integer softmax over the last axis (module docstring); ``table`` int32 ``[table_size]``;
    the output is ``[0, 2^(out_bits-1) - 1]`` in ``out_dtype`` (uint8 holds a 9-bit output)."""
    L = shape[-1]
    ROWS = math.prod(shape[:-1])
    Q = shape[-2] if len(shape) >= 2 else 1
    M = math.prod(shape)
    shift = exp_bits + SOFTMAX_GUARD_BITS  # K - FL_out
    num = 1 << (recip_bits + 1)  # 2^(K+1), K = E + FL_out + G <= 60
    qmax = (1 << (out_bits - 1)) - 1
    has_mask = mask_shape is not None
    MM = math.prod(mask_shape) if has_mask else 1
    # element strides of the mask at the scores' row coordinates (a row of the mask is mask_shape[-1] long)
    mrow = tuple(st * mask_shape[-1] for st in _broadcast_strides(mask_shape[:-1], shape[:-1])) if has_mask else ()
    mcol = 1 if has_mask and mask_shape[-1] == L else 0

    def kept(mf, r, j):
        cond = None
        if has_mask:
            cond = mf[(r // ROWS) * MM + _flat_offset(r % ROWS, shape[:-1], mrow) + j * mcol] != T.int8(0)
        if causal:
            c = j <= (r % ROWS) % Q
            cond = c if cond is None else T.And(cond, c)
        return cond

    def keep_or(mf, r, j, yes, no):
        cond = kept(mf, r, j)
        return yes if cond is None else T.Select(cond, yes, no)

    @T.macro
    def row(xf, mf, table, yf, r):
        st = T.decl_buffer((3,), "int64")  # max, sum, reciprocal
        st[0] = T.int64(in_qmin)
        for j in range(L):
            st[0] = keep_or(mf, r, j, T.max(st[0], T.Cast("int64", xf[r * L + j])), st[0])
        st[1] = T.int64(0)
        for j in range(L):
            st[1] = st[1] + keep_or(mf, r, j, T.Cast("int64", table[T.min(
                T.Cast("int32", st[0]) - T.Cast("int32", xf[r * L + j]), table_size - 1)]), T.int64(0))
        st[2] = T.Select(st[1] > T.int64(0), (T.int64(num) + st[1]) // (T.int64(2) * T.max(st[1], T.int64(1))),
                         T.int64(0))
        for j in range(L):
            yf[r * L + j] = T.Cast(out_dtype, T.min(_rhe_const(keep_or(mf, r, j, T.Cast("int64", table[T.min(
                T.Cast("int32", st[0]) - T.Cast("int32", xf[r * L + j]), table_size - 1)]), T.int64(0)) * st[2],
                shift), T.int64(qmax)))

    if has_mask:
        @T.prim_func
        def kernel(x_h: T.handle, m_h: T.handle, t_h: T.handle, y_h: T.handle):
            n = T.int64()
            x = T.match_buffer(x_h, (n,) + tuple(shape), "int8")
            mk = T.match_buffer(m_h, (n,) + tuple(mask_shape), "int8")
            table = T.match_buffer(t_h, (table_size,), "int32")
            y = T.match_buffer(y_h, (n,) + tuple(shape), out_dtype)
            xf = T.decl_buffer((n * M,), "int8", data=x.data)
            mf = T.decl_buffer((n * MM,), "int8", data=mk.data)
            yf = T.decl_buffer((n * M,), out_dtype, data=y.data)
            if n * (ROWS * L * 24) >= PARALLEL_MIN_WORK:
                for r in T.parallel(n * ROWS):
                    row(xf, mf, table, yf, r)
            else:
                for r in range(n * ROWS):
                    row(xf, mf, table, yf, r)

        return _finish(kernel, name)

    @T.prim_func
    def kernel_nomask(x_h: T.handle, t_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n,) + tuple(shape), "int8")
        table = T.match_buffer(t_h, (table_size,), "int32")
        y = T.match_buffer(y_h, (n,) + tuple(shape), out_dtype)
        xf = T.decl_buffer((n * M,), "int8", data=x.data)
        yf = T.decl_buffer((n * M,), out_dtype, data=y.data)
        if n * (ROWS * L * 24) >= PARALLEL_MIN_WORK:
            for r in T.parallel(n * ROWS):
                row(xf, xf, table, yf, r)
        else:
            for r in range(n * ROWS):
                row(xf, xf, table, yf, r)

    return _finish(kernel_nomask, name)


def _rhe_const(v: tirx.PrimExpr, s: int) -> tirx.PrimExpr:
    """``round_half_even(v 2^-s)`` of an int64 ``v`` for a constant ``1 <= s <= 62``."""
    q = v >> T.int64(s)
    rem = v & T.int64((1 << s) - 1)
    half = T.int64(1 << (s - 1))
    return q + T.Select(T.Or(rem > half, T.And(rem == half, (q & T.int64(1)) == T.int64(1))), T.int64(1), T.int64(0))


# -------------------------------------------------------------------------------------- layernorm
@lru_cache(maxsize=None)
def layernorm(shape: tuple[int, ...], eps_d: int, rshift: int, out_bits: int, relu: bool,
              name: str = "fxq_layernorm") -> tirx.PrimFunc:
    """Integer LayerNorm over the last axis (module docstring); ``gamma`` / ``beta`` int32 ``[N]``;
    ``rshift = FL_w + FL_h - FL_out`` (negative: a saturating left shift)."""
    N = shape[-1]
    ROWS = math.prod(shape[:-1])
    M = math.prod(shape)
    h_shift = LAYERNORM_RECIP_BITS - LAYERNORM_FRAC_BITS
    recip_num = 1 << (LAYERNORM_RECIP_BITS + 1)

    @T.macro
    def row(xf, gamma, beta, yf, r):
        # st: 0 S, 1 D, 2 bit_length work, 3 bit_length, 4 isqrt num, 5 isqrt res, 6 ge, 7 reciprocal
        st = T.decl_buffer((8,), "int64")
        st[0] = T.int64(0)
        for j in range(N):
            st[0] = st[0] + T.Cast("int64", xf[r * N + j])
        st[1] = T.int64(eps_d)
        for j in range(N):
            st[1] = st[1] + (T.int64(N) * T.Cast("int64", xf[r * N + j]) - st[0]) * (
                T.int64(N) * T.Cast("int64", xf[r * N + j]) - st[0])
        st[2] = st[1]
        st[3] = T.int64(0)
        for s in T.unroll(6):  # bit_length: a fixed binary search over 32, 16, ..., 1
            st[3] = st[3] + T.Select((st[2] >> T.int64(32 >> s)) > T.int64(0), T.int64(32 >> s), T.int64(0))
            st[2] = T.Select((st[2] >> T.int64(32 >> s)) > T.int64(0), st[2] >> T.int64(32 >> s), st[2])
        st[3] = (T.int64(LAYERNORM_NORM_BITS) - (st[3] + T.Select(st[2] > T.int64(0), T.int64(1), T.int64(0)))) // 2
        st[4] = (st[1] << (T.int64(2) * st[3])) // T.int64(N)
        st[5] = T.int64(0)
        for it in range(32):  # the restoring square root, bit = 2^(62 - 2 it)
            st[6] = T.Select(st[4] >= st[5] + (T.int64(1) << T.Cast("int64", 62 - 2 * it)), T.int64(1), T.int64(0))
            st[4] = T.Select(st[6] > T.int64(0), st[4] - (st[5] + (T.int64(1) << T.Cast("int64", 62 - 2 * it))),
                             st[4])
            st[5] = T.Select(st[6] > T.int64(0), (st[5] >> T.int64(1)) + (T.int64(1) << T.Cast("int64", 62 - 2 * it)),
                             st[5] >> T.int64(1))
        st[7] = T.Select(st[5] > T.int64(0), (T.int64(recip_num) + st[5]) // (T.int64(2) * T.max(st[5], T.int64(1))),
                         T.int64(0))
        for j in range(N):
            yf[r * N + j] = T.Cast("int8", _requantize_dynamic(
                T.Cast("int64", gamma[j]) * _rhe_const(
                    ((T.int64(N) * T.Cast("int64", xf[r * N + j]) - st[0]) << st[3]) * st[7], h_shift)
                + T.Cast("int64", beta[j]), T.int32(rshift), out_bits, relu))

    @T.prim_func
    def kernel(x_h: T.handle, g_h: T.handle, b_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n,) + tuple(shape), "int8")
        gamma = T.match_buffer(g_h, (N,), "int32")
        beta = T.match_buffer(b_h, (N,), "int32")
        y = T.match_buffer(y_h, (n,) + tuple(shape), "int8")
        xf = T.decl_buffer((n * M,), "int8", data=x.data)
        yf = T.decl_buffer((n * M,), "int8", data=y.data)
        if n * (ROWS * (N + 32) * 24) >= PARALLEL_MIN_WORK:
            for r in T.parallel(n * ROWS):
                row(xf, gamma, beta, yf, r)
        else:
            for r in range(n * ROWS):
                row(xf, gamma, beta, yf, r)

    return _finish(kernel, name)


__all__ = ["embedding", "layernorm", "matmul", "slice_copy", "softmax"]
