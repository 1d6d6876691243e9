"""TensorIR kernels for the transformer kinds (issue 14), written like :mod:`.vision_kernels`.

Low-level TIR, destination passing, a symbolic batch ``n``, cached on their hashable arguments;
each is bit-exact with the executor of the same kind in :mod:`fxquant.integer_ops_transformer` /
:mod:`fxquant.integer_graph` (the row arithmetic of :func:`fxquant.fixed_point.softmax_rows` and
:func:`fxquant.fixed_point.layernorm_rows`, step for step, in int32 / int64):

* :func:`matmul` ``y = requantize(a @ b)`` of two activations (``Q K^T``, ``attention V``): rank 2..4
  operands of equal rank whose leading dims are equal or 1 (broadcast), int8 (or the uint8 of a
  9-bit softmax output) x int8, int32 accumulation (``|acc| <= 2^(BW_a-1) 2^(BW_b-1) K``, checked
  against int32 by the target), the shift epilogue of :mod:`fxquant.backends.tvm_epilogue`. Per
  (batch, head) both operands are packed as int16 k-pair words (``b`` zero-padded to whole
  vectors of 8 columns; a ``b`` given transposed, ``[N, K]``, is read row by row: ``Q K^T`` needs no
  transpose kernel), then each row of ``a`` takes one ``vpmaddwd`` per (k-pair, column vector)
  against its broadcast pair (exact: a pair sum is at most ``2 * 255 * 128``).
* :func:`embedding` ``y = requantize(table[ids])``: int32 (graph input) or int8 ids, an int32 copy of
  the table; an id is clamped into ``[0, V)`` for memory safety only -- the runner refuses ids outside
  it before the call (:class:`~fxquant.errors.InputRangeError`), as the reference does.
* :func:`constant_broadcast` ``y[b] = c``: a ``constant`` op's int8 integers copied into every sample.
* :func:`slice_copy` ``x[..., start:start+count*step:step, ...]`` on one axis (a select is a slice of
  one entry whose axis the output shape drops): contiguous inner blocks copied as vectors.
* :func:`softmax` per row of ``L``: ``m`` = max over kept entries (``qmin`` when none),
  ``e = TABLE[min(m - k, T - 1)]`` (0 where masked), ``s = sum e`` (int32: ``L 2^E < 2^31`` by
  legality), ``r = (2^(K+1) + s) // (2 s)`` (int64, 0 when ``s = 0``), ``y = sat(rhe(e r 2^-(E+G)))``;
  three passes over the row (max, sum, output) recompute ``e`` instead of storing it, 8 entries per
  vector (the table read as a gather; ``e r <= 2^K`` in int32 lanes), the last ``L % 8`` scalar.
  The mask is an int8 input broadcast over the scores (dims equal or 1), nonzero = keep; ``causal``
  keeps key ``j <= `` query ``i``.
* :func:`layernorm` per row of ``N``: ``S = sum k``, ``c = N k - S``, ``D = sum c^2 + eps_D`` (int64),
  ``t = (62 - bit_length(D)) // 2`` (a 6-step binary search), ``sigma = isqrt((D << 2t) // N)`` (a
  float64 square root corrected to the exact floor, :func:`_isqrt_fp64`: the reference's restoring
  square root gives the same integer), ``r = (2^(Y+1) + sigma) // (2 sigma)``,
  ``h = rhe((c << t) r 2^(FL_h - Y))``, then ``gamma h + beta`` requantized from ``FL_w + FL_h`` to the
  output (round half even, saturate, ReLU), in int32 lanes when the constants bound it
  (:func:`layernorm_acc_bound`), else int64; 8 columns per vector, rows in blocks of 8.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from fxquant.backends.cpu.intrinsics import broadcast_word, pmaddwd
from fxquant.backends.cpu.kernels import PARALLEL_MIN_WORK, VEC, _finish
from fxquant.backends.cpu.vision_kernels import _flat_offset, _idx, _lanes, _vt
from fxquant.backends.tvm_epilogue import Requant, requantize
from fxquant.fixed_point import LAYERNORM_FRAC_BITS, LAYERNORM_NORM_BITS, LAYERNORM_RECIP_BITS, SOFTMAX_GUARD_BITS


def _broadcast_strides(shape: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, ...]:
    """Element strides of row-major ``shape`` read at the coordinates of ``out`` (0 on broadcast axes)."""
    return tuple(math.prod(shape[i + 1:]) if d == o else 0 for i, (d, o) in enumerate(zip(shape, out)))


# ----------------------------------------------------------------------------------------- matmul
@lru_cache(maxsize=None)
def matmul(shape_a: tuple[int, ...], shape_b: tuple[int, ...], rq: Requant, dtype_a: str = "int8",
           dtype_b: str = "int8", b_transposed: bool = False, name: str = "fxq_matmul") -> tirx.PrimFunc:
    """``y = requantize(a @ b, rq)`` over ``[n, *lead, M, K] x [n, *lead', K, N]`` (leads broadcast);
    ``b_transposed``: ``b`` is given as ``[n, *lead', N, K]`` and the product is ``a @ b^T`` (``Q K^T``
    reading ``K`` as the projection wrote it: no transpose kernel).

    Per (batch, lead) task: ``a`` packed as int16 rows ``ap[i, k]`` (``K`` padded even), ``b`` as int16
    k-pairs ``bp[k2, j, 2]`` (``N`` padded to whole vectors, zeros); then per row ``i`` and block of
    up to 4 column vectors, one ``vpmaddwd`` per (k-pair, vector) against the broadcast pair
    ``ap[i, 2k2 .. 2k2+1]`` into register accumulators; the tail columns of the last vector are stored
    lane by lane."""
    if len(shape_a) != len(shape_b) or len(shape_a) < 2:
        raise ValueError(f"matmul of shapes {shape_a} x {shape_b}: equal ranks >= 2 only")
    M, K = shape_a[-2:]
    N = shape_b[-2] if b_transposed else shape_b[-1]
    if (shape_b[-1] if b_transposed else shape_b[-2]) != K:
        raise ValueError(f"matmul of shapes {shape_a} x {shape_b} (b transposed: {b_transposed}): inner dims differ")
    out_lead = tuple(max(p, q) for p, q in zip(shape_a[:-2], shape_b[:-2]))
    out = out_lead + (M, N)
    OUTL = math.prod(out_lead)
    sa = _broadcast_strides(shape_a[:-2], out_lead)
    sb = _broadcast_strides(shape_b[:-2], out_lead)
    SA, SB = tuple(s * M * K for s in sa), tuple(s * K * N for s in sb)
    MA, MB, MY = math.prod(shape_a), math.prod(shape_b), math.prod(out)
    WORK = OUTL * M * N * K
    K2, NV = (K + 1) // 2, math.ceil(N / VEC)
    NP = NV * VEC
    JB = next(j for j in (4, 3, 2, 1) if NV % j == 0)  # column vectors per register block
    FULL = N % VEC == 0

    def word(lo, hi, lanes):
        """int16 pairs ``(lo, hi)`` of int32 (vector) values as 32-bit words (``lo`` in the low half)."""
        return (lo & _bcast(0xFFFF, lanes, "int32")) | (hi << _bcast(16, lanes, "int32"))

    def pairs(buf, base, k0, lanes):
        """The words of ``2 lanes`` contiguous int8 ``buf[base + 2 k0 ...]`` (int16 pairs along ``k``)."""
        return T.reinterpret(_vt("int32", lanes),
                             T.Cast(f"int16x{2 * lanes}", buf[T.ramp(base + 2 * k0, 1, 2 * lanes)]))

    def tail_pair(buf, base, k2, step):
        """The word of entries ``2 k2`` and ``2 k2 + 1`` (0 past ``K``) at element stride ``step``."""
        lo = T.Cast("int32", buf[base + 2 * k2 * step])
        hi = T.Select(2 * k2 + 1 < K, T.Cast("int32", buf[base + T.min(2 * k2 + 1, K - 1) * step]), T.int32(0))
        return word(lo, hi, 1)

    KW = K // (2 * VEC) * VEC  # k-pairs packed 8 at a time from contiguous rows

    @T.macro
    def task(af, bf, yf, q):
        abase = T.meta_var((q // OUTL) * MA + _flat_offset(q % OUTL, out_lead, SA))
        bbase = T.meta_var((q // OUTL) * MB + _flat_offset(q % OUTL, out_lead, SB))
        ap = T.decl_buffer((M * K2,), "int32")  # a's int16 k-pairs as words: ap[i, k2]
        bp = T.decl_buffer((K2 * NP,), "int32")  # b's int16 k-pairs as words: bp[k2, j] = (b[2k2, j], b[2k2+1, j])
        for i in range(M):
            for c in range(KW // VEC):
                ap[T.ramp(i * K2 + c * VEC, 1, VEC)] = pairs(af, abase + i * K, c * VEC, VEC)
            for k2 in range(KW, K2):
                ap[i * K2 + k2] = tail_pair(af, abase + i * K, k2, 1)
        if NP > N:
            for k2, j in T.grid(K2, NP - N):
                bp[k2 * NP + N + j] = T.int32(0)
        if b_transposed:  # row j of b holds column j's k-pairs: words scattered down the k2 axis
            for j in range(N):
                for k2 in range(K // 2):
                    bp[k2 * NP + j] = pairs(bf, bbase + j * K, k2, 1)
                for k2 in range(K // 2, K2):
                    bp[k2 * NP + j] = tail_pair(bf, bbase + j * K, k2, 1)
        else:  # rows 2k2 and 2k2+1 of b interleaved into words, 8 columns at a time
            for k2 in range(K2):
                for c in range(N // VEC):
                    bp[T.ramp(k2 * NP + c * VEC, 1, VEC)] = word(
                        T.Cast("int32x8", bf[T.ramp(bbase + 2 * k2 * N + c * VEC, 1, VEC)]),
                        T.Select(2 * k2 + 1 < K, T.Cast("int32x8", bf[T.ramp(
                            bbase + T.min(2 * k2 + 1, K - 1) * N + c * VEC, 1, VEC)]), T.broadcast(T.int32(0), VEC)),
                        VEC)
                for j in range(N // VEC * VEC, N):
                    bp[k2 * NP + j] = tail_pair(bf, bbase + j, k2, N)
        acc = T.decl_buffer((JB,), "int32x8")
        for jb, i in T.grid(NV // JB, M):
            for v in T.unroll(JB):
                acc[v] = T.broadcast(T.int32(0), VEC)
            for k2 in range(K2):
                for v in T.unroll(JB):
                    acc[v] = acc[v] + pmaddwd(
                        T.reinterpret("int16x16", bp[T.ramp(k2 * NP + (jb * JB + v) * VEC, 1, VEC)]),
                        broadcast_word(ap[i * K2 + k2], VEC, "int16x16"))
            for v in T.unroll(JB):
                if FULL:
                    yf[T.ramp(q * (M * N) + i * N + (jb * JB + v) * VEC, 1, VEC)] = T.Cast(
                        "int8x8", requantize(acc[v], rq, VEC))
                else:
                    part = T.decl_buffer((VEC,), "int32")
                    part[T.ramp(0, 1, VEC)] = requantize(acc[v], rq, VEC)
                    for lane in range(T.min(VEC, N - (jb * JB + v) * VEC)):
                        yf[q * (M * N) + i * N + (jb * JB + v) * VEC + lane] = T.Cast("int8", part[lane])

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
    # a unit step keeps the ``count`` entries adjacent: one contiguous block per outer index
    BLOCK, COUNT = (count * INNER, 1) if step == 1 else (INNER, count)
    L = 16 if BLOCK % 16 == 0 else _lanes(BLOCK)

    @T.prim_func
    def kernel(x_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n,) + tuple(shape), dtype)
        y = T.match_buffer(y_h, (n,) + tuple(out_shape), dtype)
        xf = T.decl_buffer((n * M,), dtype, data=x.data)
        yf = T.decl_buffer((n * MY,), dtype, data=y.data)
        for r, j in T.grid(n * OUTER, COUNT):
            for i in range(BLOCK // L):
                yf[_idx((r * COUNT + j) * BLOCK + i * L, L)] = xf[_idx((r * A + start + j * step) * INNER + i * L, L)]

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

    NV = L // VEC  # whole vectors of a row; the last L % 8 entries take the scalar code
    narrow = recip_bits <= 30  # e r <= 2^K: int32 lanes

    def kept_vec(mf, r, j0):
        """``kept`` of entries ``j0 .. j0 + 7`` of row ``r`` as a boolx8 (``None``: all kept)."""
        cond = None
        if has_mask:
            base = (r // ROWS) * MM + _flat_offset(r % ROWS, shape[:-1], mrow)
            m = mf[T.ramp(base + j0, 1, VEC)] if mcol else T.broadcast(mf[base], VEC)
            cond = m != T.broadcast(T.int8(0), VEC)
        if causal:
            c = T.ramp(T.Cast("int64", j0), T.int64(1), VEC) <= T.broadcast(T.Cast("int64", (r % ROWS) % Q), VEC)
            cond = c if cond is None else T.And(cond, c)
        return cond

    def keep_or_vec(mf, r, j0, yes, no):
        cond = kept_vec(mf, r, j0)
        return yes if cond is None else T.Select(cond, yes, no)

    def exp_vec(xf, mf, table, r, j0, m):
        """``TABLE[min(m - k, T - 1)]`` (0 where masked) of 8 entries, int32 lanes (a table gather)."""
        k = T.Cast("int32x8", xf[T.ramp(r * L + j0, 1, VEC)])
        return keep_or_vec(mf, r, j0, table[T.min(T.broadcast(m, VEC) - k, T.broadcast(T.int32(table_size - 1), VEC))],
                           T.broadcast(T.int32(0), VEC))

    @T.macro
    def row(xf, mf, table, yf, r):
        st = T.decl_buffer((3,), "int64")  # max, sum, reciprocal
        vacc = T.decl_buffer((1,), "int32x8")
        vacc[0] = T.broadcast(T.int32(in_qmin), VEC)
        for c in range(NV):
            vacc[0] = keep_or_vec(mf, r, c * VEC, T.max(vacc[0], T.Cast("int32x8", xf[T.ramp(r * L + c * VEC, 1, VEC)])),
                                  vacc[0])
        st[0] = T.Cast("int64", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.smax", vacc[0]))
        for j in range(NV * VEC, L):
            st[0] = keep_or(mf, r, j, T.max(st[0], T.Cast("int64", xf[r * L + j])), st[0])
        vacc[0] = T.broadcast(T.int32(0), VEC)
        for c in range(NV):  # sum e < L 2^E < 2^31 (legality)
            vacc[0] = vacc[0] + exp_vec(xf, mf, table, r, c * VEC, T.Cast("int32", st[0]))
        st[1] = T.Cast("int64", T.call_llvm_pure_intrin("int32", "llvm.vector.reduce.add", vacc[0]))
        for j in range(NV * VEC, L):
            st[1] = st[1] + keep_or(mf, r, j, T.Cast("int64", table[T.min(
                T.Cast("int32", st[0]) - T.Cast("int32", xf[r * L + j]), table_size - 1)]), T.int64(0))
        st[2] = T.Select(st[1] > T.int64(0), (T.int64(num) + st[1]) // (T.int64(2) * T.max(st[1], T.int64(1))),
                         T.int64(0))
        for c in range(NV):
            if narrow:  # e <= 2^E, r <= 2^(K-E): e r <= 2^K < 2^31
                yf[T.ramp(r * L + c * VEC, 1, VEC)] = T.Cast(f"{out_dtype}x8", requantize(
                    exp_vec(xf, mf, table, r, c * VEC, T.Cast("int32", st[0])) * T.broadcast(T.Cast("int32", st[2]), VEC),
                    Requant(-shift, out_bits, False), VEC))
            else:
                yf[T.ramp(r * L + c * VEC, 1, VEC)] = T.Cast(f"{out_dtype}x8", T.min(_rhe_const(
                    T.Cast("int64x8", exp_vec(xf, mf, table, r, c * VEC, T.Cast("int32", st[0])))
                    * T.broadcast(st[2], VEC), shift, VEC), T.broadcast(T.int64(qmax), VEC)))
        for j in range(NV * VEC, L):
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


def _bcast(value, lanes: int, dtype: str = "int64"):  # noqa: ANN001, ANN202
    """``value`` (a Python int or a scalar expression) as ``lanes`` lanes of ``dtype``."""
    v = tirx.const(value, dtype) if isinstance(value, int) else value
    return T.broadcast(v, lanes) if lanes > 1 else v


def _rhe_const(v: tirx.PrimExpr, s: int, lanes: int = 1) -> tirx.PrimExpr:
    """``round_half_even(v 2^-s)`` of int64 ``v`` (``lanes`` wide) for a constant ``1 <= s <= 62``."""
    q = v >> _bcast(s, lanes)
    rem = v & _bcast((1 << s) - 1, lanes)
    half = _bcast(1 << (s - 1), lanes)
    up = T.Or(rem > half, T.And(rem == half, (q & _bcast(1, lanes)) == _bcast(1, lanes)))
    return q + T.Select(up, _bcast(1, lanes), _bcast(0, lanes))


def _rhe_bounded(v: tirx.PrimExpr, s: int, bound_bits: int, lanes: int) -> tirx.PrimExpr:
    """``round_half_even(v 2^-s)`` of int64 ``v`` with ``|v| < 2^bound_bits`` in logical shifts and adds
    (AVX2 has no 64-bit arithmetic shift or cheap 64-bit compare): ``u = v + 2^B`` (``B >= s + 1``, so
    ``u >= 0`` and ``u``'s quotient has ``v``'s parity), ``rhe = (u + 2^(s-1) - 1 + bit_s(u)) >> s - 2^(B-s)``
    (below half: floor; above: floor + 1; a tie adds the quotient's parity bit)."""
    big = max(bound_bits, s + 1)
    assert big <= 61, big
    u = T.Cast(_vt("uint64", lanes), v + _bcast(1 << big, lanes))
    one, half = tirx.const(1, "uint64"), tirx.const((1 << (s - 1)) - 1, "uint64")
    shift = tirx.const(s, "uint64")
    bcast = (lambda c: T.broadcast(c, lanes)) if lanes > 1 else (lambda c: c)
    q = (u + bcast(half) + ((u >> bcast(shift)) & bcast(one))) >> bcast(shift)
    return T.Cast(_vt("int64", lanes), q) - _bcast(1 << (big - s), lanes)


def _requantize_const(v: tirx.PrimExpr, r: int, bits: int, relu: bool, lanes: int) -> tirx.PrimExpr:
    """``clamp(round_half_even(v 2^-r))`` (+ ReLU) of int64 ``v`` for a constant ``r`` (negative: a
    saturating left shift): :func:`~.vision_kernels._requantize_dynamic` with ``r`` known at build."""
    lo, hi, qmin = (0 if relu else -(1 << (bits - 1))), (1 << (bits - 1)) - 1, -(1 << (bits - 1))
    if r > 62:
        value = _bcast(0, lanes)
    elif r >= 1:
        value = _rhe_const(v, r, lanes)
    else:  # |sat << t| >= |sat|: the clamp below saturates it
        value = T.max(T.min(v, _bcast(hi, lanes)), _bcast(qmin, lanes)) << _bcast(min(-r, bits), lanes)
    return T.max(T.min(value, _bcast(hi, lanes)), _bcast(lo, lanes))


def _isqrt_fp64(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """``floor(sqrt(x))`` of an int64 ``0 <= x <= 2^62``, equal to :func:`fxquant.fixed_point.isqrt64`.

    ``s0 = trunc(sqrt(double(x)))`` then one correction each way: ``double(x)`` is ``x (1 + e)``,
    ``|e| <= 2^-53``, and the rounded square root adds another ``2^-53``, so ``|sqrt_fp - sqrt(x)| <
    2^31 2^-52 = 2^-21``: ``s0`` is ``floor(sqrt(x))`` or one off it, which ``s0^2 > x`` (down) and
    ``(s + 1)^2 <= x`` (up) repair (``s <= 2^31``: every square fits int64)."""
    s0 = T.Cast("int64", T.sqrt(T.Cast("float64", x)))
    s1 = s0 - T.Select(s0 * s0 > x, T.int64(1), T.int64(0))
    return s1 + T.Select((s1 + T.int64(1)) * (s1 + T.int64(1)) <= x, T.int64(1), T.int64(0))


def _reduce_add(v: tirx.PrimExpr, lanes: int, dtype: str) -> tirx.PrimExpr:
    return T.call_llvm_pure_intrin(dtype, "llvm.vector.reduce.add", v) if lanes > 1 else v


# -------------------------------------------------------------------------------------- layernorm
LAYERNORM_MAX_VECTOR_N = 1 << 16
"""Rows up to this length take the int32-lane path: ``|N k - S| < 2^31`` and the reciprocal
``r < 2^21 sqrt(N) <= 2^29`` fits int32, so ``(c << t) r`` is one 32 x 32 -> 64-bit ``vpmuldq`` per
lane and ``|(c << t) r| < 2^60``."""


def layernorm_h_bound(n: int) -> int:
    """A bound on ``|h|`` (the normalized value at ``FL_h``) of a row of ``n``: ``|x_hat| <= sqrt(n)``
    (``c^2 <= D``), plus the reciprocal's and the square root's relative error (``< 2^-20``) and the
    roundings (2 units)."""
    return math.ceil(math.ldexp(math.sqrt(n), LAYERNORM_FRAC_BITS) * (1 + 2.0 ** -8)) + 2


def layernorm_acc_bound(gamma: np.ndarray, beta: np.ndarray) -> int:
    """``max |gamma h + beta|`` over every row: with ``< 2^31`` the kernel's epilogue runs in int32."""
    n = int(gamma.size)
    gmax = int(abs(gamma.astype(object)).max()) if n else 0
    bmax = int(abs(beta.astype(object)).max()) if beta.size else 0
    return gmax * layernorm_h_bound(n) + bmax


@lru_cache(maxsize=None)
def layernorm(shape: tuple[int, ...], eps_d: int, rshift: int, out_bits: int, relu: bool,
              acc_bound: int | None = None, name: str = "fxq_layernorm") -> tirx.PrimFunc:
    """Integer LayerNorm over the last axis (module docstring); ``gamma`` / ``beta`` int32 ``[N]``;
    ``rshift = FL_w + FL_h - FL_out`` (negative: a saturating left shift); ``acc_bound``
    (:func:`layernorm_acc_bound` of the constants, ``None``: unknown) bounds ``|gamma h + beta|``.

    Blocks of 8 rows per task; with ``N % 8 == 0`` every pass over a row runs 8 columns per vector
    (int32 lanes for ``c = N k - S`` and ``c << t``, int64 lanes for ``c^2`` and ``(c << t) r``, whose
    rounding is :func:`_rhe_bounded`; ``gamma h + beta`` and its requantize in int32 lanes when
    ``acc_bound < 2^31``, else int64); the per-row scalars (``t``, ``sigma``, ``r``) between the passes."""
    N = shape[-1]
    ROWS = math.prod(shape[:-1])
    M = math.prod(shape)
    h_shift = LAYERNORM_RECIP_BITS - LAYERNORM_FRAC_BITS
    recip_num = 1 << (LAYERNORM_RECIP_BITS + 1)
    L = VEC if N % VEC == 0 and N <= LAYERNORM_MAX_VECTOR_N else 1
    CH = N // L
    ROW_BLOCK = 8
    narrow = acc_bound is not None and acc_bound < 1 << 31
    # |(c << t) r| < 2^31 2^21 sqrt(N)
    prod_bits = 31 + 21 + math.ceil(math.log2(max(N, 1)) / 2) + 1

    def centred(xf, r, c, s):
        """``N k - S`` of columns ``c L .. c L + L - 1`` (int32 lanes)."""
        return _vt_cast("int32", L, xf[_idx(r * N + c * L, L)]) * _bcast(N, L, "int32") - _bcast(s, L, "int32")

    def normalized(xf, r, c, st, i):
        """``h = rhe((c << t) r 2^(FL_h - Y))`` (int64 lanes); ``|c| 2^t < 2^31`` (``c^2 <= D``,
        ``D 4^t < 2^62``): ``c << t`` is exact in int32."""
        shifted = centred(xf, r, c, T.Cast("int32", st[i, 0])) << _bcast(T.Cast("int32", st[i, 3]), L, "int32")
        prod = _vt_cast("int64", L, shifted) * _vt_cast("int64", L, _bcast(T.Cast("int32", st[i, 6]), L, "int32"))
        if prod_bits <= 61:
            return _rhe_bounded(prod, h_shift, prod_bits, L)
        return _rhe_const(prod, h_shift, L)

    def output(xf, gamma, beta, r, c, st, i):
        h = normalized(xf, r, c, st, i)
        if narrow:  # |gamma h + beta| < 2^31: int32 lanes and the int32 epilogue
            acc = gamma[_idx(c * L, L)] * _vt_cast("int32", L, h) + beta[_idx(c * L, L)]
            return _vt_cast("int8", L, requantize(acc, Requant(-rshift, out_bits, relu), L))
        acc = _vt_cast("int64", L, gamma[_idx(c * L, L)]) * h + _vt_cast("int64", L, beta[_idx(c * L, L)])
        return _vt_cast("int8", L, _requantize_const(acc, rshift, out_bits, relu, L))

    @T.macro
    def block(xf, gamma, beta, yf, r0, rows):
        """Rows ``r0 .. r0 + rows - 1`` in three sweeps (sums; the per-row scalars; the outputs): the
        rows' scalar chains (square root, division) are independent and overlap in the core."""
        sacc = T.decl_buffer((1,), _vt("int32", L))
        dacc = T.decl_buffer((1,), _vt("int64", L))
        # st[i]: 0 S, 1 D, 2 bit_length work, 3 bit_length -> t, 4 the isqrt argument, 5 sigma, 6 reciprocal
        st = T.decl_buffer((ROW_BLOCK, 7), "int64")
        for i in range(rows):
            sacc[0] = _bcast(0, L, "int32")
            for c in range(CH):
                sacc[0] = sacc[0] + _vt_cast("int32", L, xf[_idx((r0 + i) * N + c * L, L)])
            st[i, 0] = T.Cast("int64", _reduce_add(sacc[0], L, "int32"))
            dacc[0] = _bcast(0, L)
            for c in range(CH):
                dacc[0] = dacc[0] + _vt_cast("int64", L, centred(xf, r0 + i, c, T.Cast("int32", st[i, 0]))) * _vt_cast(
                    "int64", L, centred(xf, r0 + i, c, T.Cast("int32", st[i, 0])))
            st[i, 1] = _reduce_add(dacc[0], L, "int64") + T.int64(eps_d)
        for i in range(rows):
            st[i, 2] = st[i, 1]
            st[i, 3] = T.int64(0)
            for s in T.unroll(6):  # bit_length: a fixed binary search over 32, 16, ..., 1
                st[i, 3] = st[i, 3] + T.Select((st[i, 2] >> T.int64(32 >> s)) > T.int64(0), T.int64(32 >> s),
                                               T.int64(0))
                st[i, 2] = T.Select((st[i, 2] >> T.int64(32 >> s)) > T.int64(0), st[i, 2] >> T.int64(32 >> s),
                                    st[i, 2])
            st[i, 3] = (T.int64(LAYERNORM_NORM_BITS)
                        - (st[i, 3] + T.Select(st[i, 2] > T.int64(0), T.int64(1), T.int64(0)))) // 2
            st[i, 4] = (st[i, 1] << (T.int64(2) * st[i, 3])) // T.int64(N)
            st[i, 5] = _isqrt_fp64(st[i, 4])
            st[i, 6] = T.Select(st[i, 5] > T.int64(0),
                                (T.int64(recip_num) + st[i, 5]) // (T.int64(2) * T.max(st[i, 5], T.int64(1))),
                                T.int64(0))
        for i in range(rows):
            for c in range(CH):
                yf[_idx((r0 + i) * N + c * L, L)] = output(xf, gamma, beta, r0 + i, c, st, i)

    @T.prim_func
    def kernel(x_h: T.handle, g_h: T.handle, b_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n,) + tuple(shape), "int8")
        gamma = T.match_buffer(g_h, (N,), "int32")
        beta = T.match_buffer(b_h, (N,), "int32")
        y = T.match_buffer(y_h, (n,) + tuple(shape), "int8")
        xf = T.decl_buffer((n * M,), "int8", data=x.data)
        yf = T.decl_buffer((n * M,), "int8", data=y.data)
        blocks = T.meta_var((n * ROWS + ROW_BLOCK - 1) // ROW_BLOCK)
        if n * (ROWS * (N + 32) * 24 // L) >= PARALLEL_MIN_WORK:
            for b in T.parallel(blocks):
                block(xf, gamma, beta, yf, b * ROW_BLOCK, T.min(ROW_BLOCK, n * ROWS - b * ROW_BLOCK))
        else:
            for b in range(blocks):
                block(xf, gamma, beta, yf, b * ROW_BLOCK, T.min(ROW_BLOCK, n * ROWS - b * ROW_BLOCK))

    return _finish(kernel, name)


def _vt_cast(dtype: str, lanes: int, v: tirx.PrimExpr) -> tirx.PrimExpr:
    return T.Cast(_vt(dtype, lanes), v)


__all__ = ["embedding", "layernorm", "layernorm_acc_bound", "matmul", "slice_copy", "softmax"]
