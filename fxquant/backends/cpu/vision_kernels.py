"""TensorIR kernels for the vision-zoo ops (issue 13), written like :mod:`.kernels`.

Low-level TIR with explicit vector types, destination passing, int8 activations with a symbolic
batch ``n``, cached on their hashable arguments, and the requantize epilogue of
:mod:`fxquant.backends.tvm_epilogue`; each is bit-exact with the executor of the same op in
:mod:`fxquant.integer_graph`:

* :func:`grouped_conv2d` (depthwise when ``groups == channels``):
  ``y[b,o,p] = sum_{c in group(o), kh, kw} x[b,c,h(p,kh),w(p,kw)] w[o,c,kh,kw] + bias[o]``.
  One task per ``(b, group)``: the group's input planes are copied once, zero padded, into int16
  planes, then into int32 words holding the column pair ``(x[col], x[col + DW])``; per output
  channel and row, ``RV`` int32x8 accumulators of 8 output columns each take one ``vpmaddwd``
  per tap pair ``(kw, kw+1)`` against the broadcast weight pair (an odd last tap pairs with a
  zero weight; strided convs read the words at ``ramp(., SW, 8)``). Only the group's own
  channels are multiplied: a depthwise 3x3 is 6 ``vpmaddwd`` per 8 outputs.
* :func:`concat2` ``y = cat(requant_a(a), requant_b(b), axis)`` (a ``cat`` of ``k`` inputs is
  ``k - 1`` of these, the running result already in the output format).
* :func:`clamp` ``clip(requantize(x), lo, hi)``; :func:`lut` ``y = table[x - qmin]``;
  :func:`mul` ``requantize(a * b)`` with broadcasting (an int8 product fits int16, the int32
  product is exact).
* :func:`window_pool` max pooling (dilation, ceil mode) or average pooling of any window:
  ``sum * M`` at ``FL_in + s`` with ``(M, s) = fixed_point.reciprocal(d)`` per window
  (``integer_graph.avg_divisors``), the round-half-even shift done per window in int64.
* :func:`transpose`, :func:`upsample_nearest`: index maps (contiguous blocks vectorized).
* :func:`conv_transpose2d`: the gather form of the scatter in ``integer_graph._conv_transpose2d``:
  ``y[o, oy, ox] = bias[o] + sum x[c, iy, ix] w[c, o', kh, kw]`` over ``iy*sh = oy + ph - kh*dh``
  (and the same on x), int32 accumulation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from tvm import tirx
from tvm.script import tirx as T

from fxquant.backends.cpu.intrinsics import broadcast_word, pmaddwd
from fxquant.backends.cpu.kernels import PARALLEL_MIN_WORK, VEC, _finish
from fxquant.backends.pool_shape import PoolShape
from fxquant.backends.tvm_epilogue import Requant, Residual, requantize, residual_add


def _lanes(size: int) -> int:
    return VEC if size % VEC == 0 else 1


def _vec(value: int, lanes: int, dtype: str = "int32") -> tirx.PrimExpr:
    c = tirx.const(value, dtype)
    return T.broadcast(c, lanes) if lanes > 1 else c


def _idx(i, lanes: int, stride: int = 1):  # noqa: ANN001, ANN202
    return T.ramp(i, stride, lanes) if lanes > 1 else i


def _vt(dtype: str, lanes: int) -> str:
    return f"{dtype}x{lanes}" if lanes > 1 else dtype


# ------------------------------------------------------------------------------------------ conv
@dataclass(frozen=True)
class GroupConvShape:
    """A grouped conv2d: input ``[n, C, H, W]``, weight ``[OC, C/groups, KH, KW]``."""

    channels: int
    height: int
    width: int
    out_channels: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def out_hw(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        return ((self.height + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
                (self.width + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


@lru_cache(maxsize=None)
def grouped_conv2d(s: GroupConvShape, rq: Requant, residual: Residual | None = None,
                   name: str = "fxq_gconv2d") -> tirx.PrimFunc:
    """int8 NCHW grouped / depthwise conv2d + bias + requantize (+ ReLU, + fused residual add).

    Weights: :func:`.packing.pack_tap_pairs` ``[OC, C/groups, KH, ceil(KW/2)]`` int16 pair words."""
    C, H, W, OC, G = s.channels, s.height, s.width, s.out_channels, s.groups
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = s.kernel, s.stride, s.padding, s.dilation
    CG, OG = C // G, OC // G
    OH, OW = s.out_hw
    KP = (KW + 1) // 2
    OWV = math.ceil(OW / VEC)
    RV = min((4, 3, 2, 1), key=lambda r: (math.ceil(OWV / r) * r, -r)) if OWV > 1 else 1
    VB = math.ceil(OWV / RV)
    OWPP = VB * RV * VEC
    # stride 1: one word row per input row, tap pair p read at column ow + 2p*DW; strided: one word
    # row per (tap pair, input row), the columns ow*SW + 2p*DW gathered once, read contiguously
    SHARED = SW == 1
    NPH = 1 if SHARED else KP
    WCOLS = math.ceil((OWPP + 2 * (KP - 1) * DW) / VEC) * VEC if SHARED else OWPP
    SPAN = WCOLS + DW if SHARED else OWPP * SW + 2 * (KP - 1) * DW + DW
    COLS = math.ceil(max(SPAN, W + PW) / (2 * VEC)) * 2 * VEC
    HP = max(H + 2 * PH, (OH - 1) * SH + (KH - 1) * DH + 1)
    PLANE = CG * HP * COLS
    WORDS = CG * NPH * HP * WCOLS
    VECTOR_COPY = W % VEC == 0
    TASK_WORK = OG * OH * OW * CG * KH * KW
    has_res = residual is not None

    def word(xw, ci, oh, v, kh, p):
        if SHARED:
            return T.reinterpret("int16x16", xw[T.ramp((ci * HP + oh * SH + kh * DH) * WCOLS + v * VEC + 2 * p * DW,
                                                       1, VEC)])
        return T.reinterpret("int16x16", xw[T.ramp(((ci * KP + p) * HP + oh * SH + kh * DH) * WCOLS + v * VEC, 1, VEC)])

    def columns(xp, base, stride):
        """``xp[base + i*stride]``, i < 8: a contiguous load and a shuffle (no gather)."""
        if stride == 1:
            return xp[T.ramp(base, 1, VEC)]
        return T.Shuffle([xp[T.ramp(base, 1, VEC * stride)]], [i * stride for i in range(VEC)])

    def pair(xp, base, stride):
        return (T.Cast("int32x8", columns(xp, base, stride)) & T.broadcast(T.int32(0xFFFF), VEC)) | (
            T.Cast("int32x8", columns(xp, base + DW, stride)) << T.broadcast(T.int32(16), VEC))

    def store(res, b, o, oh, v, acc):
        if has_res:
            return T.Cast("int8x8", residual_add(requantize(acc, rq, VEC), T.Cast(
                "int32x8", res[b, o, oh, T.ramp(v * VEC, 1, VEC)]), residual, VEC))
        return T.Cast("int8x8", requantize(acc, rq, VEC))

    @T.macro
    def task(x, wp, bias, res, y, t):
        b = T.meta_var(t // G)
        g = T.meta_var(t % G)
        xp = T.decl_buffer((PLANE,), "int16")
        xw = T.decl_buffer((WORDS,), "int32")
        for i in range(PLANE // (2 * VEC)):
            xp[T.ramp(i * 2 * VEC, 1, 2 * VEC)] = T.broadcast(T.int16(0), 2 * VEC)
        for ci, h in T.grid(CG, H):
            if VECTOR_COPY:
                for w0 in range(W // VEC):
                    xp[T.ramp((ci * HP + h + PH) * COLS + PW + w0 * VEC, 1, VEC)] = T.Cast(
                        "int16x8", x[b, g * CG + ci, h, T.ramp(w0 * VEC, 1, VEC)])
            else:
                for col in range(W):
                    xp[(ci * HP + h + PH) * COLS + PW + col] = T.Cast("int16", x[b, g * CG + ci, h, col])
        if SHARED:  # word = (x[col], x[col + DW]) as an int16 pair
            for r, c0 in T.grid(CG * HP, WCOLS // VEC):
                xw[T.ramp(r * WCOLS + c0 * VEC, 1, VEC)] = pair(xp, r * COLS + c0 * VEC, 1)
        else:
            for ci, p, h, c0 in T.grid(CG, KP, HP, WCOLS // VEC):
                xw[T.ramp(((ci * KP + p) * HP + h) * WCOLS + c0 * VEC, 1, VEC)] = pair(
                    xp, (ci * HP + h) * COLS + c0 * VEC * SW + 2 * p * DW, SW)
        for og, oh, vb in T.grid(OG, OH, VB):
            acc = T.decl_buffer((RV * VEC,), "int32")  # flat: an int32x8 buffer of RV trips StorageRewrite
            for i in T.unroll(RV):
                acc[T.ramp(i * VEC, 1, VEC)] = T.broadcast(bias[g * OG + og], VEC)
            for ci in range(CG):
                for kh in T.unroll(KH):
                    for p in T.unroll(KP):
                        for i in T.unroll(RV):
                            acc[T.ramp(i * VEC, 1, VEC)] = acc[T.ramp(i * VEC, 1, VEC)] + pmaddwd(word(xw, ci, oh, vb * RV + i, kh, p),
                                                      broadcast_word(wp[g * OG + og, ci, kh, p], VEC, "int16x16"))
            for i in T.unroll(RV):
                if (vb * RV + i + 1) * VEC <= OW:
                    y[b, g * OG + og, oh, T.ramp((vb * RV + i) * VEC, 1, VEC)] = store(
                        res, b, g * OG + og, oh, vb * RV + i, acc[T.ramp(i * VEC, 1, VEC)])
                elif (vb * RV + i) * VEC < OW:
                    part = T.decl_buffer((VEC,), "int32")
                    part[T.ramp(0, 1, VEC)] = requantize(acc[T.ramp(i * VEC, 1, VEC)], rq, VEC)
                    for lane in range(VEC):
                        if (vb * RV + i) * VEC + lane < OW:
                            if has_res:
                                y[b, g * OG + og, oh, (vb * RV + i) * VEC + lane] = T.Cast("int8", residual_add(
                                    part[lane], T.Cast("int32", res[b, g * OG + og, oh, (vb * RV + i) * VEC + lane]),
                                    residual, 1))
                            else:
                                y[b, g * OG + og, oh, (vb * RV + i) * VEC + lane] = T.Cast("int8", part[lane])

    @T.macro
    def body(x, wp, bias, res, y, n):
        if n * (G * TASK_WORK) >= PARALLEL_MIN_WORK:
            for t in T.parallel(n * G):
                task(x, wp, bias, res, y, t)
        else:
            for t in range(n * G):
                task(x, wp, bias, res, y, t)

    @T.prim_func
    def kernel(x_h: T.handle, w_h: T.handle, bias_h: T.handle, res_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n, C, H, W), "int8")
        wp = T.match_buffer(w_h, (OC, CG, KH, KP), "int32")
        bias = T.match_buffer(bias_h, (OC,), "int32")
        res = T.match_buffer(res_h, (n, OC, OH, OW), "int8")
        y = T.match_buffer(y_h, (n, OC, OH, OW), "int8")
        body(x, wp, bias, res, y, n)

    @T.prim_func
    def kernel_nores(x_h: T.handle, w_h: T.handle, bias_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n, C, H, W), "int8")
        wp = T.match_buffer(w_h, (OC, CG, KH, KP), "int32")
        bias = T.match_buffer(bias_h, (OC,), "int32")
        y = T.match_buffer(y_h, (n, OC, OH, OW), "int8")
        body(x, wp, bias, y, y, n)  # res is never read without a residual

    return _finish(kernel if has_res else kernel_nores, name)


# --------------------------------------------------------------------------------- element-wise
@lru_cache(maxsize=None)
def concat2(shape_a: tuple[int, ...], shape_b: tuple[int, ...], axis: int, rq_a: Requant, rq_b: Requant,
            name: str = "fxq_concat") -> tirx.PrimFunc:
    """``y = cat(requantize(a, rq_a), requantize(b, rq_b))`` on non-batch ``axis`` (0 = channels)."""
    out_shape = shape_a[:axis] + (shape_a[axis] + shape_b[axis],) + shape_a[axis + 1:]
    OUTER = math.prod(shape_a[:axis])
    IA, IB = math.prod(shape_a[axis:]), math.prod(shape_b[axis:])
    MA, MB, MY = math.prod(shape_a), math.prod(shape_b), math.prod(out_shape)
    LA, LB = _lanes(IA), _lanes(IB)

    @T.prim_func
    def kernel(a_h: T.handle, b_h: T.handle, y_h: T.handle):
        n = T.int64()
        a = T.match_buffer(a_h, (n,) + tuple(shape_a), "int8")
        b = T.match_buffer(b_h, (n,) + tuple(shape_b), "int8")
        y = T.match_buffer(y_h, (n,) + tuple(out_shape), "int8")
        af = T.decl_buffer((n * MA,), "int8", data=a.data)
        bf = T.decl_buffer((n * MB,), "int8", data=b.data)
        yf = T.decl_buffer((n * MY,), "int8", data=y.data)
        for r in range(n * OUTER):
            for i in range(IA // LA):
                yf[_idx(r * (IA + IB) + i * LA, LA)] = T.Cast(_vt("int8", LA), requantize(
                    T.Cast(_vt("int32", LA), af[_idx(r * IA + i * LA, LA)]), rq_a, LA))
            for i in range(IB // LB):
                yf[_idx(r * (IA + IB) + IA + i * LB, LB)] = T.Cast(_vt("int8", LB), requantize(
                    T.Cast(_vt("int32", LB), bf[_idx(r * IB + i * LB, LB)]), rq_b, LB))

    return _finish(kernel, name)


@lru_cache(maxsize=None)
def clamp(shape: tuple[int, ...], rq: Requant, lo: int | None, hi: int | None,
          name: str = "fxq_clamp") -> tirx.PrimFunc:
    """``clip(requantize(x, rq), lo, hi)`` (``None``: that side unbounded) over int8 ``[n, *shape]``."""
    M = math.prod(shape)
    L = _lanes(M)

    def value(xf, i):
        v = requantize(T.Cast(_vt("int32", L), xf[_idx(i, L)]), rq, L)
        if hi is not None:
            v = T.min(v, _vec(hi, L))
        if lo is not None:
            v = T.max(v, _vec(lo, L))
        return T.Cast(_vt("int8", L), v)

    @T.prim_func
    def kernel(x_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n,) + tuple(shape), "int8")
        y = T.match_buffer(y_h, (n,) + tuple(shape), "int8")
        xf = T.decl_buffer((n * M,), "int8", data=x.data)
        yf = T.decl_buffer((n * M,), "int8", data=y.data)
        if n * (M * 8) >= PARALLEL_MIN_WORK:
            for i in T.parallel(n * M // L):
                yf[_idx(i * L, L)] = value(xf, i * L)
        else:
            for i in range(n * M // L):
                yf[_idx(i * L, L)] = value(xf, i * L)

    return _finish(kernel, name)


@lru_cache(maxsize=None)
def lut(shape: tuple[int, ...], entries: int, qmin: int, name: str = "fxq_lut") -> tirx.PrimFunc:
    """``y = table[x - qmin]``: a gather from the constant int8 table of ``entries`` (``2^BW_in``)."""
    M = math.prod(shape)

    @T.prim_func
    def kernel(x_h: T.handle, t_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n,) + tuple(shape), "int8")
        table = T.match_buffer(t_h, (entries,), "int8")
        y = T.match_buffer(y_h, (n,) + tuple(shape), "int8")
        xf = T.decl_buffer((n * M,), "int8", data=x.data)
        yf = T.decl_buffer((n * M,), "int8", data=y.data)
        for i in range(n * M):
            yf[i] = table[T.Cast("int32", xf[i]) - qmin]

    return _finish(kernel, name)


def _flat_offset(index, shape: tuple[int, ...], strides: tuple[int, ...]):  # noqa: ANN001, ANN202
    """The flat offset, under ``strides``, of row-major position ``index`` in ``shape``."""
    offset, rest = 0, index
    for dim, stride in zip(reversed(shape), reversed(strides)):
        if stride:
            offset = offset + (rest % dim) * stride if dim > 1 else offset
        rest = rest // dim
    return offset


def _strides(shape: tuple[int, ...], out: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides of ``shape`` broadcast to ``out`` (0 on broadcast axes)."""
    strides, step = [], 1
    for d, o in zip(reversed(shape), reversed(out)):
        strides.append(step if d == o else 0)
        step *= d
    return tuple(reversed(strides))


@lru_cache(maxsize=None)
def mul(shape_a: tuple[int, ...], shape_b: tuple[int, ...], rq: Requant, name: str = "fxq_mul") -> tirx.PrimFunc:
    """``requantize(a * b, rq)`` with numpy broadcasting of equal-rank non-batch shapes.

    The innermost axes where each input is either whole or broadcast form one block of ``L``
    elements (a vector loop; a broadcast input is one broadcast scalar per block)."""
    out = tuple(max(p, q) for p, q in zip(shape_a, shape_b))
    sa, sb = _strides(shape_a, out), _strides(shape_b, out)
    def uniform(shape: tuple[int, ...], j: int) -> bool:  # axes j.. all whole, or all broadcast
        return shape[j:] == out[j:] or all(d == 1 for d in shape[j:])

    k = len(out)  # the block: axes k.. on which each input is whole or broadcast
    while k > 0 and uniform(shape_a, k - 1) and uniform(shape_b, k - 1):
        k -= 1
    L = math.prod(out[k:])
    outer = out[:k]
    OUTER = math.prod(outer)
    full_a, full_b = math.prod(shape_a[k:]) == L, math.prod(shape_b[k:]) == L
    lanes = _lanes(L)
    MA, MB, MY = math.prod(shape_a), math.prod(shape_b), math.prod(out)

    def operand(buf, r, i, full, strides, size):
        base = _flat_offset(r % OUTER, outer, strides[:k]) + (r // OUTER) * size
        if full:
            return T.Cast(_vt("int32", lanes), buf[_idx(base + i * lanes, lanes)])
        return T.broadcast(T.Cast("int32", buf[base]), lanes) if lanes > 1 else T.Cast("int32", buf[base])

    @T.prim_func
    def kernel(a_h: T.handle, b_h: T.handle, y_h: T.handle):
        n = T.int64()
        a = T.match_buffer(a_h, (n,) + tuple(shape_a), "int8")
        b = T.match_buffer(b_h, (n,) + tuple(shape_b), "int8")
        y = T.match_buffer(y_h, (n,) + tuple(out), "int8")
        af = T.decl_buffer((n * MA,), "int8", data=a.data)
        bf = T.decl_buffer((n * MB,), "int8", data=b.data)
        yf = T.decl_buffer((n * MY,), "int8", data=y.data)
        for r in range(n * OUTER):
            for i in range(L // lanes):
                yf[_idx(r * L + i * lanes, lanes)] = T.Cast(_vt("int8", lanes), requantize(
                    operand(af, r, i, full_a, sa, MA) * operand(bf, r, i, full_b, sb, MB), rq, lanes))

    return _finish(kernel, name)


@lru_cache(maxsize=None)
def transpose(shape: tuple[int, ...], perm: tuple[int, ...], name: str = "fxq_transpose") -> tirx.PrimFunc:
    """``y = x.transpose(0, *(p + 1 for p in perm))`` over int8 ``[n, *shape]``."""
    out = tuple(shape[p] for p in perm)
    k = len(perm)
    while k > 0 and perm[k - 1] == k - 1 and all(perm[j] == j for j in range(k - 1, len(perm))):
        k -= 1
    L = math.prod(shape[k:])  # the trailing axes perm keeps in place: contiguous blocks
    in_strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
    strides = tuple(in_strides[p] for p in perm[:k])
    outer = out[:k]
    OUTER, M = math.prod(outer), math.prod(shape)
    lanes = _lanes(L)

    @T.prim_func
    def kernel(x_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n,) + tuple(shape), "int8")
        y = T.match_buffer(y_h, (n,) + tuple(out), "int8")
        xf = T.decl_buffer((n * M,), "int8", data=x.data)
        yf = T.decl_buffer((n * M,), "int8", data=y.data)
        for r in range(n * OUTER):
            for i in range(L // lanes):
                yf[_idx(r * L + i * lanes, lanes)] = xf[_idx(
                    (r // OUTER) * M + _flat_offset(r % OUTER, outer, strides) + i * lanes, lanes)]

    return _finish(kernel, name)


@lru_cache(maxsize=None)
def patches(shape: tuple[int, int, int], kernel: tuple[int, int], name: str = "fxq_patches") -> tirx.PrimFunc:
    """``y[b, oh OW + ow, (c KH + kh) KW + kw] = x[b, c, oh KH + kh, ow KW + kw]``: the windows of a conv
    whose stride is its kernel (a ViT patch embedding) as the rows of a linear (``[n, P, C KH KW]``);
    each window row of ``KW`` is one contiguous copy."""
    C, H, W = shape
    KH, KW = kernel
    OH, OW = H // KH, W // KW
    P, K = OH * OW, C * KH * KW
    lanes = 16 if KW % 16 == 0 else _lanes(KW)

    @T.prim_func
    def kernel_(x_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n, C, H, W), "int8")
        y = T.match_buffer(y_h, (n, P, K), "int8")
        for b, p, c, kh in T.grid(n, P, C, KH):
            for i in range(KW // lanes):
                y[b, p, _idx((c * KH + kh) * KW + i * lanes, lanes)] = x[
                    b, c, (p // OW) * KH + kh, _idx((p % OW) * KW + i * lanes, lanes)]

    return _finish(kernel_, name)


@lru_cache(maxsize=None)
def upsample_nearest(shape: tuple[int, int, int], scale: tuple[int, int],
                     name: str = "fxq_upsample") -> tirx.PrimFunc:
    """``y[b, c, h, w] = x[b, c, h // sh, w // sw]``."""
    C, H, W = shape
    SH, SW = scale

    @T.prim_func
    def kernel(x_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n, C, H, W), "int8")
        y = T.match_buffer(y_h, (n, C, H * SH, W * SW), "int8")
        for bc, oh in T.grid(n * C, H * SH):
            for ow in range(W * SW):
                y[bc // C, bc % C, oh, ow] = x[bc // C, bc % C, oh // SH, ow // SW]

    return _finish(kernel, name)


# ----------------------------------------------------------------------------------------- pools
def _shift_round_even_i64(v, r):  # noqa: ANN001, ANN202
    """``round_half_even(v * 2^-r)`` of an int64 ``v`` for a run-time ``1 <= r <= 62``."""
    q = v >> T.Cast("int64", r)
    rem = v - (q << T.Cast("int64", r))
    half = T.int64(1) << T.Cast("int64", r - 1)
    return q + T.Select(T.Or(rem > half, T.And(rem == half, (q & T.int64(1)) == T.int64(1))),
                        T.int64(1), T.int64(0))


def _requantize_dynamic(v, r, bits: int, relu: bool):  # noqa: ANN001, ANN202
    """``clamp(round_half_even(v * 2^-r))`` (+ ReLU) of int64 ``v``, ``r`` an int32 known per window."""
    lo, hi = (0 if relu else -(1 << (bits - 1))), (1 << (bits - 1)) - 1
    sat = T.max(T.min(v, T.int64(hi)), T.int64(-(1 << (bits - 1))))
    left = sat << T.Cast("int64", T.min(-r, bits))  # |sat << t| >= |sat|: saturates below
    right = T.Select(r > 62, T.int64(0), _shift_round_even_i64(v, T.max(T.min(r, 62), 1)))
    value = T.Select(r > 0, right, left)
    return T.max(T.min(value, T.int64(hi)), T.int64(lo))


@lru_cache(maxsize=None)
def window_pool(s: PoolShape, average: tuple[int, bool] | None, name: str = "fxq_pool") -> tirx.PrimFunc:
    """Max pooling (``average is None``; padding and the ceil-mode overhang never win) or average
    pooling (``average = (bits, relu)`` of the output): the in-bounds window sum times ``mult[p]``,
    requantized by the per-window right shift ``rshift[p] = FL_in + s_p - FL_out``
    (``mult``/``rshift`` int32 ``[OH * OW]`` inputs, from ``avg_divisors`` and ``reciprocal``)."""
    C, H, W = s.channels, s.height, s.width
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = s.kernel, s.stride, s.padding, s.dilation
    OH, OW = s.out_hw
    WORK = C * OH * OW * KH * KW
    BITS, RELU = average if average is not None else (8, False)

    def inside(oh, ow, kh, kw):
        return T.And(T.And(oh * SH + kh * DH >= PH, oh * SH + kh * DH < H + PH),
                     T.And(ow * SW + kw * DW >= PW, ow * SW + kw * DW < W + PW))

    def element(x, b, c, oh, ow, kh, kw):
        return T.Cast("int32", x[b, c, T.max(T.min(oh * SH + kh * DH - PH, H - 1), 0),
                                 T.max(T.min(ow * SW + kw * DW - PW, W - 1), 0)])

    @T.macro
    def max_plane(x, y, bc):
        for oh, ow in T.grid(OH, OW):
            acc = T.decl_buffer((1,), "int32")
            acc[0] = -128
            for kh, kw in T.grid(KH, KW):
                if inside(oh, ow, kh, kw):
                    acc[0] = T.max(acc[0], element(x, bc // C, bc % C, oh, ow, kh, kw))
            y[bc // C, bc % C, oh, ow] = T.Cast("int8", acc[0])

    @T.macro
    def avg_plane(x, mult, rshift, y, bc):
        for oh, ow in T.grid(OH, OW):
            acc = T.decl_buffer((1,), "int32")
            acc[0] = 0
            for kh, kw in T.grid(KH, KW):
                if inside(oh, ow, kh, kw):
                    acc[0] = acc[0] + element(x, bc // C, bc % C, oh, ow, kh, kw)
            y[bc // C, bc % C, oh, ow] = T.Cast("int8", _requantize_dynamic(
                T.Cast("int64", acc[0]) * T.Cast("int64", mult[oh * OW + ow]), rshift[oh * OW + ow], BITS, RELU))

    if average is None:
        @T.prim_func
        def kernel(x_h: T.handle, y_h: T.handle):
            n = T.int64()
            x = T.match_buffer(x_h, (n, C, H, W), "int8")
            y = T.match_buffer(y_h, (n, C, OH, OW), "int8")
            if n * WORK >= PARALLEL_MIN_WORK:
                for bc in T.parallel(n * C):
                    max_plane(x, y, bc)
            else:
                for bc in range(n * C):
                    max_plane(x, y, bc)

        return _finish(kernel, name)

    @T.prim_func
    def kernel_avg(x_h: T.handle, m_h: T.handle, r_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n, C, H, W), "int8")
        mult = T.match_buffer(m_h, (OH * OW,), "int32")
        rshift = T.match_buffer(r_h, (OH * OW,), "int32")
        y = T.match_buffer(y_h, (n, C, OH, OW), "int8")
        if n * WORK >= PARALLEL_MIN_WORK:
            for bc in T.parallel(n * C):
                avg_plane(x, mult, rshift, y, bc)
        else:
            for bc in range(n * C):
                avg_plane(x, mult, rshift, y, bc)

    return _finish(kernel_avg, name)


# ------------------------------------------------------------------------------- conv transpose
@dataclass(frozen=True)
class ConvTransposeShape:
    """ConvTranspose2d: input ``[n, C, H, W]``, weight ``[C, OC/groups, KH, KW]``."""

    channels: int
    height: int
    width: int
    out_channels: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    output_padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple((n - 1) * st - 2 * p + d * (k - 1) + op + 1  # type: ignore[return-value]
                     for n, st, p, d, k, op in zip((self.height, self.width), self.stride, self.padding,
                                                   self.dilation, self.kernel, self.output_padding))


@lru_cache(maxsize=None)
def conv_transpose2d(s: ConvTransposeShape, rq: Requant, name: str = "fxq_conv_transpose2d") -> tirx.PrimFunc:
    """int8 NCHW ConvTranspose2d + bias + requantize (+ ReLU), one output pixel at a time."""
    C, H, W, OC, G = s.channels, s.height, s.width, s.out_channels, s.groups
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = s.kernel, s.stride, s.padding, s.dilation
    CG, OG = C // G, OC // G
    OH, OW = s.out_hw

    def valid(o_pos, k, stride, pad, dil, size):
        num = o_pos + pad - k * dil
        return T.And(T.And(num >= 0, num % stride == 0), num < size * stride)

    @T.prim_func
    def kernel(x_h: T.handle, w_h: T.handle, bias_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n, C, H, W), "int8")
        w = T.match_buffer(w_h, (C, OG, KH, KW), "int32")
        bias = T.match_buffer(bias_h, (OC,), "int32")
        y = T.match_buffer(y_h, (n, OC, OH, OW), "int8")
        for bo in range(n * OC):
            for oy, ox in T.grid(OH, OW):
                acc = T.decl_buffer((1,), "int32")
                acc[0] = bias[bo % OC]
                for ci, kh, kw in T.grid(CG, KH, KW):
                    if T.And(valid(oy, kh, SH, PH, DH, H), valid(ox, kw, SW, PW, DW, W)):
                        acc[0] = acc[0] + T.Cast("int32", x[
                            bo // OC, (bo % OC) // OG * CG + ci,
                            T.max(T.min((oy + PH - kh * DH) // SH, H - 1), 0),
                            T.max(T.min((ox + PW - kw * DW) // SW, W - 1), 0)]) * w[
                            (bo % OC) // OG * CG + ci, (bo % OC) % OG, kh, kw]
                y[bo // OC, bo % OC, oy, ox] = T.Cast("int8", requantize(acc[0], rq, 1))

    return _finish(kernel, name)


__all__ = ["GroupConvShape", "grouped_conv2d", "concat2", "clamp", "lut", "mul", "transpose", "upsample_nearest",
           "window_pool", "ConvTransposeShape", "conv_transpose2d"]
