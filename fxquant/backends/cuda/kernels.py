"""TensorIR PrimFuncs (unscheduled) of the CUDA kernels, one per :data:`.plan.KernelSpec`.

Each function is the integer algorithm only: serial loops over ``sblock``s, buildable as is for
``llvm`` (the CPU bit-exactness check) and bound to CUDA threads by :mod:`.schedule`. The batch
``n`` is symbolic (int32), so one kernel serves every batch size. Destination passing: the last
argument is the output.

* :func:`gemm` (``GemmSpec``): three blocks. ``im2col``: ``col[m, k] = x[img, c, oh*s+kh*d-p,
  ow*s+kw*d-p]`` (0 outside the image, for ``k >= K`` and for the rows ``m >= M`` that pad ``M = n*OH*OW`` to the
  block tile; ``m = (img, oh, ow)``, ``k = (c, kh, kw)``);
  for packed weights ``unpack``: ``wk[o, k] = ((byte >> 4*(k%2)) & 15 ^ 8) - 8`` (sign-extended
  nibble); ``gemm``: ``acc[m, o] = sum_k col[m, k] * wk[o, k]`` in int32; ``epilogue``:
  ``y = requantize(acc + bias)`` (+ fused residual add) with the shift epilogue of
  :mod:`fxquant.backends.tvm_epilogue` (round half to even, saturate, ReLU), written NCHW.
  The schedule inlines ``im2col``/``unpack`` into the shared-memory loads, so neither exists in
  global memory.
* :func:`matmul` (``MatmulSpec``, two activations) has the same two blocks, reducing over ``K``.
* :func:`direct_conv` (``DirectConvSpec``: grouped / depthwise conv, transposed conv): two blocks,
  ``acc`` (an int32 reduction over the group's channels and the window taps, padding and the
  transposed conv's off-stride taps contribute 0) and ``out`` (bias + requantize epilogue).
* :func:`eltwise`, :func:`mul`, :func:`lut`, :func:`cat`, :func:`transpose`, :func:`upsample`,
  :func:`pool2d`, :func:`quantize`, :func:`embedding`, :func:`slice_`: one spatial block each (TE
  compute). Every gather clamps its indices into the source tensor (a masked-out element is read
  in bounds, then discarded).
* :func:`softmax` and :func:`layernorm` (TVMScript): one ``row`` block per row of ``[n, R, L]``, its
  body serial loops over the row on int64 scalars in registers (``local`` scope), exactly the
  steps of :func:`fxquant.fixed_point.softmax_rows` / :func:`~fxquant.fixed_point.layernorm_rows`:
  bit length by a 6-step binary search, the square root by the 32-step restoring loop of
  :func:`~fxquant.fixed_point.isqrt64`, one int64 division per row reciprocal, and every rounding
  shift :func:`_rshift_half_even` (``q = v >> s``, ``r = v & (2^s - 1)``, ``q + [r + (q & 1) > 2^(s-1)]``).
"""

from __future__ import annotations

import math
from functools import lru_cache

from tvm import te, tirx
from tvm.script import tirx as T

from fxquant.backends.tvm_epilogue import Requant, requantize, residual_add
from fxquant.backends.cuda.plan import (CatSpec, ConstantSpec, DirectConvSpec, EltwiseSpec, EmbeddingSpec, GemmSpec, KernelSpec,
                                        LayerNormSpec, LutSpec, MatmulSpec, MulSpec, PoolSpec, QuantizeSpec, SliceSpec,
                                        SoftmaxSpec, TransposeSpec, UpsampleSpec, storage)

ACT = "int8"


def _int32(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Cast("int32", v)


def _to_int8(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Cast(ACT, v)


def _dtype(dtypes: tuple[str, ...], i: int) -> str:
    """Entry ``i`` of a spec's ``dtypes`` (``()`` = every tensor int8)."""
    return dtypes[i] if dtypes else ACT


@lru_cache(maxsize=None)
def gemm(s: GemmSpec) -> tirx.PrimFunc:
    """int8 implicit-GEMM conv / linear + bias + requantize (+ ReLU, + fused residual add)."""
    C, H, W, O = s.channels, s.height, s.width, s.out_channels
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = s.kernel, s.stride, s.padding, s.dilation
    OH, OW = s.out_hw
    OHW, K, KP, OP, BM = OH * OW, s.k, s.k_padded, s.o_padded, s.m_tile
    PACKED, LINEAR, HAS_RES = s.packed, s.linear, s.residual is not None
    WSHAPE, WDT = s.weight_shape, ("uint8" if s.packed else ACT)

    def row(m, k):
        return m % OHW // OW * SH + k % (KH * KW) // KW * DH - PH

    def col_(m, k):
        return m % OW * SW + k % KW * DW - PW

    TOKENS = s.tokens
    TOK = math.prod(TOKENS)  # rows per sample of a token-wise linear (1 for [n, features])
    if LINEAR:
        OHW = TOK

    def token(m):
        """The row ``m`` of a token-wise linear as ``(sample, *token)``."""
        return (m // TOK, *_unravel(m % TOK, TOKENS))

    def im2col(x, n, m, k):
        if LINEAR and TOKENS:
            sample, *tok = token(T.min(m, n * TOK - 1))
            return T.if_then_else(T.And(k < K, m < n * TOK), x[(sample, *tok, T.min(k, K - 1))], T.int8(0))
        if LINEAR:
            return T.if_then_else(T.And(k < K, m < n), x[T.min(m, n - 1), T.min(k, K - 1)], T.int8(0))
        inside = T.And(T.And(T.And(k < K, m < n * OHW), T.And(row(m, k) >= 0, row(m, k) < H)), T.And(col_(m, k) >= 0, col_(m, k) < W))
        return T.if_then_else(inside, x[T.min(m // OHW, n - 1), T.min(k // (KH * KW), C - 1), T.max(T.min(row(m, k), H - 1), 0),
                                        T.max(T.min(col_(m, k), W - 1), 0)], T.int8(0))

    def unpack(w, o, k):
        return T.Cast(ACT, (((T.Cast("int32", w[o, k // 2]) >> (k % 2 * 4)) & 15) ^ 8) - 8)

    def out_index(m, o):
        if LINEAR and TOKENS:
            return (*token(m), o)
        return (m, o) if LINEAR else (m // OHW, o, m % OHW // OW, m % OW)

    def epilogue(acc, bias, res, m, o):
        y = requantize(acc[m, o] + bias[o], s.rq, 1)
        if HAS_RES:
            y = residual_add(y, T.Cast("int32", res[out_index(m, o)]), s.residual, 1)
        return T.Cast(s.out_dtype, y)

    @T.macro
    def body(x, w, bias, res, y, n):
        col = T.sblock_alloc_buffer(((n * OHW + BM - 1) // BM * BM, KP), ACT)
        acc = T.sblock_alloc_buffer(((n * OHW + BM - 1) // BM * BM, OP), "int32")
        for m, k in T.grid((n * OHW + BM - 1) // BM * BM, KP):
            with T.sblock("im2col"):
                vm, vk = T.axis.remap("SS", [m, k])
                col[vm, vk] = im2col(x, n, vm, vk)
        if PACKED:
            wk = T.sblock_alloc_buffer((OP, KP), ACT)
            for o, k in T.grid(OP, KP):
                with T.sblock("unpack"):
                    vo, vk = T.axis.remap("SS", [o, k])
                    wk[vo, vk] = unpack(w, vo, vk)
        for m, o, k in T.grid((n * OHW + BM - 1) // BM * BM, OP, KP):
            with T.sblock("gemm"):
                vm, vo, vk = T.axis.remap("SSR", [m, o, k])
                with T.init():
                    acc[vm, vo] = 0
                if PACKED:
                    acc[vm, vo] = acc[vm, vo] + T.Cast("int32", col[vm, vk]) * T.Cast("int32", wk[vo, vk])
                else:
                    acc[vm, vo] = acc[vm, vo] + T.Cast("int32", col[vm, vk]) * T.Cast("int32", w[vo, vk])
        for m, o in T.grid((n * OHW + BM - 1) // BM * BM, O):
            with T.sblock("epilogue"):
                vm, vo = T.axis.remap("SS", [m, o])
                if vm < n * OHW:
                    y[out_index(vm, vo)] = epilogue(acc, bias, res, vm, vo)

    x_shape = (*TOKENS, C) if LINEAR else (C, H, W)
    y_shape = (*TOKENS, O) if LINEAR else (O, OH, OW)

    if HAS_RES:
        @T.prim_func(s_tir=True)
        def kernel(x_h: T.handle, w_h: T.handle, b_h: T.handle, r_h: T.handle, y_h: T.handle):
            n = T.int32()
            x = T.match_buffer(x_h, (n, *x_shape), ACT)
            w = T.match_buffer(w_h, WSHAPE, WDT)
            bias = T.match_buffer(b_h, (OP,), "int32")
            res = T.match_buffer(r_h, (n, *y_shape), s.res_dtype)
            y = T.match_buffer(y_h, (n, *y_shape), s.out_dtype)
            body(x, w, bias, res, y, n)
    else:
        @T.prim_func(s_tir=True)
        def kernel(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
            n = T.int32()
            x = T.match_buffer(x_h, (n, *x_shape), ACT)
            w = T.match_buffer(w_h, WSHAPE, WDT)
            bias = T.match_buffer(b_h, (OP,), "int32")
            y = T.match_buffer(y_h, (n, *y_shape), s.out_dtype)
            body(x, w, bias, y, y, n)  # res is never read without a residual
    return kernel


def _batch() -> tirx.Var:
    return tirx.Var("n", "int32")


def _inside(v: tirx.PrimExpr, size: int) -> tirx.PrimExpr:
    return tirx.all(v >= 0, v < size)


def _clip(v: tirx.PrimExpr, size: int) -> tirx.PrimExpr:
    """``v`` clamped into ``[0, size)``: an in-bounds read for a masked-out element."""
    return tirx.max(tirx.min(v, size - 1), 0)


@lru_cache(maxsize=None)
def direct_conv(s: DirectConvSpec) -> tirx.PrimFunc:
    """Grouped / depthwise ``conv2d`` or ``conv_transpose2d`` + bias + requantize (+ ReLU), direct.

    conv2d: ``acc[b, o, i, j] = sum_{c, r, q} x[b, g C/g + c, i s_h + r d_h - p_h, j s_w + q d_w - p_w]
    w[o, c, r, q]`` with ``g = o // (O/g)``. conv_transpose2d: ``Y = i + p_h - r d_h``,
    ``X = j + p_w - q d_w``; a tap counts where ``Y, X >= 0`` are multiples of the stride and
    ``Y / s_h < H``, ``X / s_w < W``: ``x[b, g C/g + c, Y / s_h, X / s_w] w[g C/g + c, o mod (O/g), r, q]``.
    """
    n = _batch()
    C, H, W, O, G = s.channels, s.height, s.width, s.out_channels, s.groups
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = s.kernel, s.stride, s.padding, s.dilation
    CG, OG = C // G, O // G
    x = te.placeholder((n, C, H, W), ACT, name="x")
    w = te.placeholder(s.weight_shape, ACT, name="w")
    bias = te.placeholder((O,), "int32", name="bias")
    rc, rh, rw = te.reduce_axis((0, CG), name="rc"), te.reduce_axis((0, KH), name="rh"), te.reduce_axis((0, KW), name="rw")

    def conv(b, o, i, j):
        c = tirx.floordiv(o, OG) * CG + rc
        r, q = i * SH + rh * DH - PH, j * SW + rw * DW - PW
        value = x[b, c, _clip(r, H), _clip(q, W)]
        term = tirx.if_then_else(tirx.all(_inside(r, H), _inside(q, W)), _int32(value) * _int32(w[o, rc, rh, rw]), 0)
        return te.sum(term, axis=[rc, rh, rw])

    def transposed(b, o, i, j):
        c = tirx.floordiv(o, OG) * CG + rc
        yy, xx = i + PH - rh * DH, j + PW - rw * DW
        r, q = tirx.floordiv(yy, SH), tirx.floordiv(xx, SW)
        hit = tirx.all(yy >= 0, xx >= 0, tirx.floormod(yy, SH) == 0, tirx.floormod(xx, SW) == 0, r < H, q < W)
        value = x[b, c, _clip(r, H), _clip(q, W)]
        term = tirx.if_then_else(hit, _int32(value) * _int32(w[c, tirx.floormod(o, OG), rh, rw]), 0)
        return te.sum(term, axis=[rc, rh, rw])

    acc = te.compute((n, O, *s.out_hw), transposed if s.transpose else conv, name="acc")
    y = te.compute((n, O, *s.out_hw), lambda b, o, i, j: _to_int8(requantize(acc[b, o, i, j] + bias[o], s.rq, 1)),
                   name="out")
    return te.create_prim_func([x, w, bias, y])


@lru_cache(maxsize=None)
def matmul(s: MatmulSpec) -> tirx.PrimFunc:
    """``acc[b, .., m, j] = sum_k a[b, .., m, k] b[b, .., k, j]`` (int32), then requantize (+ ReLU)."""
    n = _batch()
    a = te.placeholder((n, *s.a_shape), _dtype(s.dtypes, 0), name="a")
    b = te.placeholder((n, *s.b_shape), _dtype(s.dtypes, 1), name="b")
    rk = te.reduce_axis((0, s.a_shape[-1]), name="rk")

    def f(bi: tirx.PrimExpr, *idx: tirx.PrimExpr) -> tirx.PrimExpr:
        *lead, i, j = idx
        return te.sum(_int32(a[(bi, *lead, i, rk)]) * _int32(b[(bi, *lead, rk, j)]), axis=rk)

    acc = te.compute((n, *s.shape), f, name="acc")
    y = te.compute((n, *s.shape), lambda *idx: tirx.Cast(_dtype(s.dtypes, 2), requantize(acc[idx], s.rq, 1)), name="out")
    return te.create_prim_func([a, b, y])


@lru_cache(maxsize=None)
def eltwise(s: EltwiseSpec) -> tirx.PrimFunc:
    """``y = clip(requantize(sum_i x_i << lefts[i]))``: residual add, format change, ReLU, clamp."""
    n = _batch()
    xs = [te.placeholder((n, *s.shape), _dtype(s.dtypes, i), name=f"x{i}") for i in range(len(s.lefts))]
    lo, hi = s.clip

    def f(*idx: tirx.PrimExpr) -> tirx.PrimExpr:
        total = _int32(xs[0][idx]) << s.lefts[0]
        for x, left in zip(xs[1:], s.lefts[1:]):
            total = total + (_int32(x[idx]) << left)
        out = requantize(total, s.rq, 1)
        if lo is not None:
            out = tirx.max(out, tirx.const(lo, "int32"))
        if hi is not None:
            out = tirx.min(out, tirx.const(hi, "int32"))
        return tirx.Cast(_dtype(s.dtypes, -1), out)

    y = te.compute((n, *s.shape), f, name="eltwise")
    return te.create_prim_func([*xs, y])


@lru_cache(maxsize=None)
def mul(s: MulSpec) -> tirx.PrimFunc:
    """``y = requantize(a * b)``; a size-1 dimension of ``a`` or ``b`` reads index 0 (broadcast)."""
    n = _batch()
    a = te.placeholder((n, *s.a_shape), ACT, name="a")
    b = te.placeholder((n, *s.b_shape), ACT, name="b")

    def f(bi: tirx.PrimExpr, *idx: tirx.PrimExpr) -> tirx.PrimExpr:
        ia = [0 if d == 1 else i for i, d in zip(idx, s.a_shape)]
        ib = [0 if d == 1 else i for i, d in zip(idx, s.b_shape)]
        return _to_int8(requantize(_int32(a[(bi, *ia)]) * _int32(b[(bi, *ib)]), s.rq, 1))

    y = te.compute((n, *s.shape), f, name="mul")
    return te.create_prim_func([a, b, y])


@lru_cache(maxsize=None)
def lut(s: LutSpec) -> tirx.PrimFunc:
    """``y = table[x - qmin]`` (the index clamped into the table: every stored input is in range)."""
    n = _batch()
    x = te.placeholder((n, *s.shape), ACT, name="x")
    table = te.placeholder((s.entries,), ACT, name="table")
    y = te.compute((n, *s.shape), lambda *idx: table[_clip(_int32(x[idx]) - s.qmin, s.entries)], name="lut")
    return te.create_prim_func([x, table, y])


@lru_cache(maxsize=None)
def cat(s: CatSpec) -> tirx.PrimFunc:
    """``y[..., k, ...] = requantize_i(x_i[..., k - offset_i, ...])`` for ``offset_i <= k < offset_{i+1}`` on ``dim``."""
    n = _batch()
    xs = [te.placeholder((n, *shape), ACT, name=f"x{i}") for i, shape in enumerate(s.shapes)]
    axis = s.dim + 1
    offsets = [0]
    for shape in s.shapes:
        offsets.append(offsets[-1] + shape[s.dim])

    def f(*idx: tirx.PrimExpr) -> tirx.PrimExpr:
        k = idx[axis]
        out = None
        for i in reversed(range(len(xs))):
            src = (*idx[:axis], _clip(k - offsets[i], s.shapes[i][s.dim]), *idx[axis + 1:])
            value = requantize(_int32(xs[i][src]), s.rqs[i], 1)
            out = value if out is None else tirx.Select(k < offsets[i + 1], value, out)
        return _to_int8(out)

    y = te.compute((n, *s.shape), f, name="cat")
    return te.create_prim_func([*xs, y])


@lru_cache(maxsize=None)
def transpose(s: TransposeSpec) -> tirx.PrimFunc:
    """``y[b, o_0, ..] = x[b, i]`` with ``i[perm[k]] = o_k``."""
    n = _batch()
    x = te.placeholder((n, *s.shape), s.dtype, name="x")

    def f(b: tirx.PrimExpr, *out: tirx.PrimExpr) -> tirx.PrimExpr:
        src = [None] * len(s.perm)
        for k, p in enumerate(s.perm):
            src[p] = out[k]
        return x[(b, *src)]

    y = te.compute((n, *(s.shape[p] for p in s.perm)), f, name="transpose")
    return te.create_prim_func([x, y])


@lru_cache(maxsize=None)
def upsample(s: UpsampleSpec) -> tirx.PrimFunc:
    """Nearest upsampling: ``y[b, c, i, j] = x[b, c, i // sh, j // sw]``."""
    n = _batch()
    sh, sw = s.scale
    x = te.placeholder((n, s.channels, s.height, s.width), ACT, name="x")
    y = te.compute((n, s.channels, s.height * sh, s.width * sw),
                   lambda b, c, i, j: x[b, c, tirx.floordiv(i, sh), tirx.floordiv(j, sw)], name="upsample")
    return te.create_prim_func([x, y])


@lru_cache(maxsize=None)
def pool2d(s: PoolSpec) -> tirx.PrimFunc:
    """Max pooling (cells outside the input read as -128 and never win: every window holds a real
    element) or an average: the window sum over the cells inside the input times ``M`` of the
    window's divisor ``d = (min(i s_h - p_h + k_h, H + p_h) - (i s_h - p_h)) x (same for j)``,
    requantized with that divisor's shift (a ``Select`` over the distinct divisors)."""
    n = _batch()
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = s.kernel, s.stride, s.padding, s.dilation
    x = te.placeholder((n, s.channels, s.height, s.width), ACT, name="x")
    low = -128

    def element(b, c, i, j, kh, kw):
        r, q = i * SH + kh * DH - PH, j * SW + kw * DW - PW
        value = x[b, c, _clip(r, s.height), _clip(q, s.width)]
        return tirx.if_then_else(tirx.all(_inside(r, s.height), _inside(q, s.width)), _int32(value),
                                 0 if s.average else low)

    def count(i, k, st, p, size):
        start = i * st - p
        return tirx.min(start + k, size + p) - start

    def f(b, c, i, j):
        terms = [element(b, c, i, j, kh, kw) for kh in range(KH) for kw in range(KW)]
        out = terms[0]
        for t in terms[1:]:
            out = out + t if s.average else tirx.max(out, t)
        if not s.average:
            return _to_int8(out)
        *rest, (_, m_last, rq_last) = s.divisors
        result = requantize(out * m_last, rq_last, 1)
        if rest:
            d = count(i, KH, SH, PH, s.height) * count(j, KW, SW, PW, s.width)
            for dv, m, rq in reversed(rest):
                result = tirx.Select(d == dv, requantize(out * m, rq, 1), result)
        return _to_int8(result)

    y = te.compute((n, s.channels, *s.out_hw), f, name="pool")
    return te.create_prim_func([x, y])


@lru_cache(maxsize=None)
def quantize(s: QuantizeSpec) -> tirx.PrimFunc:
    """float32 -> int8 (int16 above 8 bits) ``clamp(nearbyint(x * 2^FL))``: the scale is a power of two, so the product
    is exact in float32 (overflow saturates through the clamp) and ``nearbyint`` rounds half to
    even, as :meth:`fxquant.integer_graph.IntegerGraph.quantize_inputs` does for the same values."""
    n = _batch()
    x = te.placeholder((n, *s.shape), "float32", name="x")
    lo, hi = -(1 << (s.bits - 1)), (1 << (s.bits - 1)) - 1
    scale = tirx.const(2.0 ** s.frac_bits, "float32")

    def f(*idx: tirx.PrimExpr) -> tirx.PrimExpr:
        r = tirx.nearbyint(x[idx] * scale)
        return tirx.Cast(storage(s.bits), tirx.max(tirx.min(r, tirx.const(hi, "float32")), tirx.const(lo, "float32")))

    y = te.compute((n, *s.shape), f, name="quantize")
    return te.create_prim_func([x, y])


@lru_cache(maxsize=None)
def embedding(s: EmbeddingSpec) -> tirx.PrimFunc:
    """``y[b, *i, d] = requantize(table[clip(ids[b, *i], 0, rows - 1), d])`` (ids int32 or int8;
    the host checks the ids of an id input, so the clamp only keeps every read in the table)."""
    n = _batch()
    ids = te.placeholder((n, *s.ids_shape), s.ids_dtype, name="ids")
    table = te.placeholder((s.rows, s.width), ACT, name="table")

    def f(*idx: tirx.PrimExpr) -> tirx.PrimExpr:
        *lead, d = idx
        row = _clip(_int32(ids[tuple(lead)]), s.rows)
        return tirx.Cast(s.out_dtype, requantize(_int32(table[row, d]), s.rq, 1))

    y = te.compute((n, *s.ids_shape, s.width), f, name="embedding")
    return te.create_prim_func([ids, table, y])


@lru_cache(maxsize=None)
def constant(s: ConstantSpec) -> tirx.PrimFunc:
    """``y[b, *i] = c[*i]``: a ``constant`` op's integers in every sample."""
    n = _batch()
    c = te.placeholder(s.shape, s.dtype, name="c")
    y = te.compute((n, *s.shape), lambda b, *i: c[tuple(i)], name="constant")
    return te.create_prim_func([c, y])


@lru_cache(maxsize=None)
def slice_(s: SliceSpec) -> tirx.PrimFunc:
    """``y[b, .., i, ..] = x[b, .., start + i step, ..]`` on axis ``dim``; select: ``x[b, .., start, ..]``."""
    n = _batch()
    x = te.placeholder((n, *s.shape), s.dtype, name="x")
    axis = s.dim + 1

    def f(*idx: tirx.PrimExpr) -> tirx.PrimExpr:
        if s.select:
            return x[(*idx[:axis], tirx.const(s.start, "int32"), *idx[axis:])]
        return x[(*idx[:axis], idx[axis] * s.step + s.start, *idx[axis + 1:])]

    y = te.compute((n, *s.out_shape), f, name="slice")
    return te.create_prim_func([x, y])


def _i64(v: int | tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.const(v, "int64") if isinstance(v, int) else tirx.Cast("int64", v)


def _rshift_half_even(v: tirx.PrimExpr, s: int) -> tirx.PrimExpr:
    """``round_half_even(v 2^-s)`` of an int64 ``v``, ``1 <= s <= 62`` (no overflow: ``r + 1 < 2^62``)."""
    q = v >> _i64(s)
    r = v & _i64((1 << s) - 1)
    return q + tirx.Select(r + (q & _i64(1)) > _i64(1 << (s - 1)), _i64(1), _i64(0))


def _requantize64(v: tirx.PrimExpr, rq: Requant) -> tirx.PrimExpr:
    """:func:`fxquant.fixed_point.requantize` of an int64 ``v`` with ``|v| < 2^62``: shift (round half
    even), saturate to ``rq.bits``, ReLU. A left shift clamps first (any value outside the output
    range saturates anyway) and caps the shift at ``bits``; a right shift by ``>= 63`` is 0."""
    lo, hi = _i64(rq.low), _i64(rq.high)
    if rq.shift >= 0:
        if rq.shift:
            v = tirx.max(tirx.min(v, _i64(rq.high)), _i64(-(1 << (rq.bits - 1)))) << _i64(min(rq.shift, rq.bits))
    elif -rq.shift >= 63:
        v = _i64(0)
    else:
        v = _rshift_half_even(v, -rq.shift)
    return tirx.max(tirx.min(v, hi), lo)


def _unravel(r: tirx.PrimExpr, dims: tuple[int, ...]) -> list[tirx.PrimExpr]:
    """The index of row-major flat ``r`` over ``dims``."""
    out, stride = [], 1
    for d in reversed(dims):
        out.append(tirx.floormod(tirx.floordiv(r, stride), d) if d > 1 else tirx.const(0, "int32"))
        stride *= d
    return out[::-1]


@lru_cache(maxsize=None)
def softmax(s: SoftmaxSpec) -> tirx.PrimFunc:
    """Integer softmax of scores ``x[n, R, L]`` (int8) per row, into ``y[n, R, L]`` (int8)::

        keep = mask != 0 (broadcast), and j <= query if causal
        m = max(x over kept, qmin); e_j = keep ? table[min(m - x_j, T - 1)] : 0; sum = sum(e)
        r = (2^(K+1) + sum) // (2 sum), 0 when sum == 0
        y_j = saturate(round_half_even(e_j r 2^(FL_out - K)))

    int64 throughout (``e r <= 2^K <= 2^60``); ``table`` is int32 ``[T]``, ``mask`` int8 ``[n, prod(mask_shape)]``."""
    R, L, T_SIZE, K = s.rows, s.shape[-1], s.table_size, s.recip_bits
    lead = s.shape[:-1]
    HAS_MASK, CAUSAL = s.mask_shape is not None, s.causal
    mshape = s.mask_shape or ()
    mstrides = [1] * len(mshape)
    for d in range(len(mshape) - 2, -1, -1):
        mstrides[d] = mstrides[d + 1] * mshape[d + 1]
    MF = max(1, math.prod(mshape))
    Q = lead[-1] if lead else 1
    IN, OUT = _dtype(s.dtypes, 0), _dtype(s.dtypes, 1)

    def keep(mask, b, r, j):
        ok = tirx.const(True, "bool")
        if HAS_MASK:
            idx = [*_unravel(r, lead), j]
            flat = tirx.const(0, "int32")
            for i, d, st in zip(idx, mshape, mstrides):
                if d != 1:
                    flat = flat + i * st
            ok = tirx.all(ok, mask[b, flat] != tirx.const(0, ACT))
        if CAUSAL:
            ok = tirx.all(ok, j <= tirx.floormod(r, Q))
        return ok

    def exp_of(table, m, x):
        return _i64(table[_int32(tirx.min(m - _i64(x), _i64(T_SIZE - 1)))])

    @T.macro
    def body(x, table, mask, y, n):
        for b, r in T.grid(n, R):
            with T.sblock("row"):
                vb, vr = T.axis.remap("SS", [b, r])
                acc = T.sblock_alloc_buffer((3,), "int64", scope="local")
                acc[0] = T.int64(s.qmin)
                for j in range(L):
                    if keep(mask, vb, vr, j):
                        acc[0] = T.max(acc[0], T.Cast("int64", x[vb, vr, j]))
                acc[1] = T.int64(0)
                for j in range(L):
                    if keep(mask, vb, vr, j):
                        acc[1] = acc[1] + exp_of(table, acc[0], x[vb, vr, j])
                acc[2] = T.Select(acc[1] > T.int64(0), T.floordiv(T.int64(1 << (K + 1)) + acc[1], acc[1] * T.int64(2)),
                                  T.int64(0))
                for j in range(L):
                    y[vb, vr, j] = T.Cast(OUT, _requantize64(
                        T.Select(keep(mask, vb, vr, j), exp_of(table, acc[0], x[vb, vr, j]), T.int64(0)) * acc[2],
                        s.rq))

    if HAS_MASK:
        @T.prim_func(s_tir=True)
        def kernel(x_h: T.handle, t_h: T.handle, m_h: T.handle, y_h: T.handle):
            n = T.int32()
            x = T.match_buffer(x_h, (n, R, L), IN)
            table = T.match_buffer(t_h, (T_SIZE,), "int32")
            mask = T.match_buffer(m_h, (n, MF), ACT)
            y = T.match_buffer(y_h, (n, R, L), OUT)
            body(x, table, mask, y, n)
    else:
        @T.prim_func(s_tir=True)
        def kernel(x_h: T.handle, t_h: T.handle, y_h: T.handle):
            n = T.int32()
            x = T.match_buffer(x_h, (n, R, L), IN)
            table = T.match_buffer(t_h, (T_SIZE,), "int32")
            y = T.match_buffer(y_h, (n, R, L), OUT)
            body(x, table, x, y, n)  # no mask: never read
    return kernel


@lru_cache(maxsize=None)
def layernorm(s: LayerNormSpec) -> tirx.PrimFunc:
    """Integer LayerNorm of ``x[n, R, L]`` (int8) per row, into ``y[n, R, L]`` (int8), int64 scalars::

        sum = sum(x); c_j = L x_j - sum; D = sum(c^2) + eps_D
        t = (62 - bit_length(D)) // 2                    (6-step binary search)
        sigma = isqrt((D << 2t) // L)                    (32-step restoring square root)
        r = (2^(Y+1) + sigma) // (2 sigma), 0 when sigma == 0
        h_j = round_half_even(c_j 2^t r 2^(FL_h - Y)); y_j = requantize(gamma_j h_j + beta_j)

    ``gamma``, ``beta``: int32 ``[L]``. Bounds (legality): ``D < 2^62``, ``|c| 2^t < 2^31``, ``r < 2^(Y-29) sqrt(L)``."""
    from fxquant.fixed_point import LAYERNORM_FRAC_BITS, LAYERNORM_NORM_BITS, LAYERNORM_RECIP_BITS

    R, L, EPS = s.rows, s.shape[-1], s.eps
    IN, OUT = _dtype(s.dtypes, 0), _dtype(s.dtypes, 1)
    NORM, Y, H_SHIFT = LAYERNORM_NORM_BITS, LAYERNORM_RECIP_BITS, LAYERNORM_RECIP_BITS - LAYERNORM_FRAC_BITS

    @T.prim_func(s_tir=True)
    def kernel(x_h: T.handle, g_h: T.handle, b_h: T.handle, y_h: T.handle):
        n = T.int32()
        x = T.match_buffer(x_h, (n, R, L), IN)
        gamma = T.match_buffer(g_h, (L,), "int32")
        beta = T.match_buffer(b_h, (L,), "int32")
        y = T.match_buffer(y_h, (n, R, L), OUT)
        for b, r in T.grid(n, R):
            with T.sblock("row"):
                vb, vr = T.axis.remap("SS", [b, r])
                # 0 sum, 1 D, 2 bit-length scratch, 3 bit length, 4 isqrt remainder, 5 root, 6 bit, 7 reciprocal
                acc = T.sblock_alloc_buffer((8,), "int64", scope="local")
                acc[0] = T.int64(0)
                for j in range(L):
                    acc[0] = acc[0] + T.Cast("int64", x[vb, vr, j])
                acc[1] = T.int64(EPS)
                for j in range(L):
                    acc[1] = acc[1] + (T.int64(L) * T.Cast("int64", x[vb, vr, j]) - acc[0]) * (
                        T.int64(L) * T.Cast("int64", x[vb, vr, j]) - acc[0])
                acc[2] = acc[1]
                acc[3] = T.int64(0)
                for i in range(6):
                    if (acc[2] >> (T.int64(32) >> T.Cast("int64", i))) > T.int64(0):
                        acc[3] = acc[3] + (T.int64(32) >> T.Cast("int64", i))
                        acc[2] = acc[2] >> (T.int64(32) >> T.Cast("int64", i))
                acc[3] = acc[3] + T.Select(acc[2] > T.int64(0), T.int64(1), T.int64(0))
                acc[3] = (T.int64(NORM) - acc[3]) >> T.int64(1)  # t
                acc[4] = T.floordiv(acc[1] << (acc[3] * T.int64(2)), T.int64(L))
                acc[5] = T.int64(0)
                acc[6] = T.int64(1) << T.int64(62)
                for i in range(32):
                    if acc[4] >= acc[5] + acc[6]:
                        acc[4] = acc[4] - (acc[5] + acc[6])
                        acc[5] = (acc[5] >> T.int64(1)) + acc[6]
                    else:
                        acc[5] = acc[5] >> T.int64(1)
                    acc[6] = acc[6] >> T.int64(2)
                acc[7] = T.Select(acc[5] > T.int64(0),
                                  T.floordiv(T.int64(1 << (Y + 1)) + acc[5], acc[5] * T.int64(2)), T.int64(0))
                for j in range(L):
                    y[vb, vr, j] = T.Cast(OUT, _requantize64(
                        T.Cast("int64", gamma[j]) * _rshift_half_even(
                            (T.int64(L) * T.Cast("int64", x[vb, vr, j]) - acc[0]) * (T.int64(1) << acc[3]) * acc[7],
                            H_SHIFT) + T.Cast("int64", beta[j]), s.rq))
    return kernel


def primfunc(spec: KernelSpec) -> tirx.PrimFunc:
    """The unscheduled PrimFunc of ``spec``."""
    builders = {GemmSpec: gemm, DirectConvSpec: direct_conv, MatmulSpec: matmul, EltwiseSpec: eltwise, MulSpec: mul, LutSpec: lut,
                CatSpec: cat, TransposeSpec: transpose, UpsampleSpec: upsample, PoolSpec: pool2d, QuantizeSpec: quantize,
                EmbeddingSpec: embedding, SliceSpec: slice_, SoftmaxSpec: softmax, LayerNormSpec: layernorm,
                ConstantSpec: constant}
    return builders[type(spec)](spec)  # type: ignore[operator]


__all__ = ["cat", "constant", "direct_conv", "eltwise", "embedding", "gemm", "layernorm", "lut", "matmul", "mul", "pool2d", "primfunc",
           "quantize", "slice_", "softmax", "transpose", "upsample"]
