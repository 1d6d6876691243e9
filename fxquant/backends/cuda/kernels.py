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
* :func:`eltwise`, :func:`pool2d`, :func:`quantize`: one spatial block each (TE compute).
"""

from __future__ import annotations

from functools import lru_cache

from tvm import te, tirx
from tvm.script import tirx as T

from fxquant.backends.tvm_epilogue import requantize, residual_add
from fxquant.backends.cuda.plan import EltwiseSpec, GemmSpec, KernelSpec, PoolSpec, QuantizeSpec

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


@lru_cache(maxsize=None)
def eltwise(s: EltwiseSpec) -> tirx.PrimFunc:
    """``y = requantize(sum_i x_i << lefts[i])``: residual add, format change, standalone ReLU."""
    n = _batch()
    xs = [te.placeholder((n, *s.shape), ACT, name=f"x{i}") for i in range(len(s.lefts))]

    def f(*idx: tirx.PrimExpr) -> tirx.PrimExpr:
        total = _int32(xs[0][idx]) << s.lefts[0]
        for x, left in zip(xs[1:], s.lefts[1:]):
            total = total + (_int32(x[idx]) << left)
        return _to_int8(requantize(total, s.rq, 1))

    y = te.compute((n, *s.shape), f, name="eltwise")
    return te.create_prim_func([*xs, y])


@lru_cache(maxsize=None)
def pool2d(s: PoolSpec) -> tirx.PrimFunc:
    """Max pooling (padding reads as -128 and never wins: every window holds a real element) or
    the window sum of an average pooling, requantized from ``FL_in + log2(window)``."""
    n = _batch()
    (KH, KW), (SH, SW), (PH, PW) = s.kernel, s.stride, s.padding
    x = te.placeholder((n, s.channels, s.height, s.width), ACT, name="x")
    low = -128

    def element(b, c, i, j, kh, kw):
        r, q = i * SH + kh - PH, j * SW + kw - PW
        inside = tirx.all(r >= 0, r < s.height, q >= 0, q < s.width)
        value = x[b, c, tirx.max(tirx.min(r, s.height - 1), 0), tirx.max(tirx.min(q, s.width - 1), 0)]
        return tirx.if_then_else(inside, _int32(value), low if s.rq is None else 0)

    def f(b, c, i, j):
        terms = [element(b, c, i, j, kh, kw) for kh in range(KH) for kw in range(KW)]
        out = terms[0]
        for t in terms[1:]:
            out = tirx.max(out, t) if s.rq is None else out + t
        return _to_int8(out if s.rq is None else requantize(out, s.rq, 1))

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
    if isinstance(spec, GemmSpec):
        return gemm(spec)
    if isinstance(spec, EltwiseSpec):
        return eltwise(spec)
    if isinstance(spec, PoolSpec):
        return pool2d(spec)
    return quantize(spec)


__all__ = ["eltwise", "gemm", "pool2d", "primfunc", "quantize"]
