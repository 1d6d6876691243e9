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
  :func:`pool2d`, :func:`quantize`: one spatial block each (TE compute). Every gather clamps its
  indices into the source tensor (a masked-out element is read in bounds, then discarded).
"""

from __future__ import annotations

from functools import lru_cache

from tvm import te, tirx
from tvm.script import tirx as T

from fxquant.backends.tvm_epilogue import requantize, residual_add
from fxquant.backends.cuda.plan import (CatSpec, DirectConvSpec, EltwiseSpec, GemmSpec, KernelSpec, LutSpec,
                                        MatmulSpec, MulSpec, PoolSpec, QuantizeSpec, TransposeSpec, UpsampleSpec)

ACT = "int8"


def _int32(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Cast("int32", v)


def _to_int8(v: tirx.PrimExpr) -> tirx.PrimExpr:
    return tirx.Cast(ACT, v)


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

    def im2col(x, n, m, k):
        if LINEAR:
            return T.if_then_else(T.And(k < K, m < n), x[T.min(m, n - 1), T.min(k, K - 1)], T.int8(0))
        inside = T.And(T.And(T.And(k < K, m < n * OHW), T.And(row(m, k) >= 0, row(m, k) < H)), T.And(col_(m, k) >= 0, col_(m, k) < W))
        return T.if_then_else(inside, x[T.min(m // OHW, n - 1), T.min(k // (KH * KW), C - 1), T.max(T.min(row(m, k), H - 1), 0),
                                        T.max(T.min(col_(m, k), W - 1), 0)], T.int8(0))

    def unpack(w, o, k):
        return T.Cast(ACT, (((T.Cast("int32", w[o, k // 2]) >> (k % 2 * 4)) & 15) ^ 8) - 8)

    def out_index(m, o):
        return (m, o) if LINEAR else (m // OHW, o, m % OHW // OW, m % OW)

    def epilogue(acc, bias, res, m, o):
        y = requantize(acc[m, o] + bias[o], s.rq, 1)
        if HAS_RES:
            y = residual_add(y, T.Cast("int32", res[out_index(m, o)]), s.residual, 1)
        return T.Cast(ACT, y)

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

    x_shape = (C,) if LINEAR else (C, H, W)
    y_shape = (O,) if LINEAR else (O, OH, OW)

    if HAS_RES:
        @T.prim_func(s_tir=True)
        def kernel(x_h: T.handle, w_h: T.handle, b_h: T.handle, r_h: T.handle, y_h: T.handle):
            n = T.int32()
            x = T.match_buffer(x_h, (n, *x_shape), ACT)
            w = T.match_buffer(w_h, WSHAPE, WDT)
            bias = T.match_buffer(b_h, (OP,), "int32")
            res = T.match_buffer(r_h, (n, *y_shape), ACT)
            y = T.match_buffer(y_h, (n, *y_shape), ACT)
            body(x, w, bias, res, y, n)
    else:
        @T.prim_func(s_tir=True)
        def kernel(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
            n = T.int32()
            x = T.match_buffer(x_h, (n, *x_shape), ACT)
            w = T.match_buffer(w_h, WSHAPE, WDT)
            bias = T.match_buffer(b_h, (OP,), "int32")
            y = T.match_buffer(y_h, (n, *y_shape), ACT)
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
    a = te.placeholder((n, *s.a_shape), ACT, name="a")
    b = te.placeholder((n, *s.b_shape), ACT, name="b")
    rk = te.reduce_axis((0, s.a_shape[-1]), name="rk")

    def f(bi: tirx.PrimExpr, *idx: tirx.PrimExpr) -> tirx.PrimExpr:
        *lead, i, j = idx
        return te.sum(_int32(a[(bi, *lead, i, rk)]) * _int32(b[(bi, *lead, rk, j)]), axis=rk)

    acc = te.compute((n, *s.shape), f, name="acc")
    y = te.compute((n, *s.shape), lambda *idx: _to_int8(requantize(acc[idx], s.rq, 1)), name="out")
    return te.create_prim_func([a, b, y])


@lru_cache(maxsize=None)
def eltwise(s: EltwiseSpec) -> tirx.PrimFunc:
    """``y = clip(requantize(sum_i x_i << lefts[i]))``: residual add, format change, ReLU, clamp."""
    n = _batch()
    xs = [te.placeholder((n, *s.shape), ACT, name=f"x{i}") for i in range(len(s.lefts))]
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
        return _to_int8(out)

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
    x = te.placeholder((n, *s.shape), ACT, name="x")

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
    """float32 -> int8 ``clamp(nearbyint(x * 2^FL))``: the scale is a power of two, so the product
    is exact in float32 (overflow saturates through the clamp) and ``nearbyint`` rounds half to
    even, as :meth:`fxquant.integer_graph.IntegerGraph.quantize_inputs` does for the same values."""
    n = _batch()
    x = te.placeholder((n, *s.shape), "float32", name="x")
    lo, hi = -(1 << (s.bits - 1)), (1 << (s.bits - 1)) - 1
    scale = tirx.const(2.0 ** s.frac_bits, "float32")

    def f(*idx: tirx.PrimExpr) -> tirx.PrimExpr:
        r = tirx.nearbyint(x[idx] * scale)
        return _to_int8(tirx.max(tirx.min(r, tirx.const(hi, "float32")), tirx.const(lo, "float32")))

    y = te.compute((n, *s.shape), f, name="quantize")
    return te.create_prim_func([x, y])


def primfunc(spec: KernelSpec) -> tirx.PrimFunc:
    """The unscheduled PrimFunc of ``spec``."""
    builders = {GemmSpec: gemm, DirectConvSpec: direct_conv, MatmulSpec: matmul, EltwiseSpec: eltwise, MulSpec: mul, LutSpec: lut,
                CatSpec: cat, TransposeSpec: transpose, UpsampleSpec: upsample, PoolSpec: pool2d, QuantizeSpec: quantize}
    return builders[type(spec)](spec)  # type: ignore[operator]


__all__ = ["cat", "direct_conv", "eltwise", "gemm", "lut", "matmul", "mul", "pool2d", "primfunc", "quantize", "transpose",
           "upsample"]
