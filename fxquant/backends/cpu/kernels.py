"""TensorIR kernels (``call_tir``-able PrimFuncs, destination passing) for the integer ops.

All activations are int8 (integers of up to 8 bits), NCHW or NC, with a symbolic batch ``n``;
weights are integers of up to 16 bits (int16 channel pairs in the conv, int8 or int16 in the linear).
Every kernel ends with the requantize epilogue of :mod:`.epilogue` (shift, round half to even,
saturate, ReLU, optional fused residual add), so its output is the integer tensor of the next
value, bit-exact with :meth:`fxquant.integer_graph.IntegerGraph.run`.

Generators are cached on their (hashable) arguments: parsing TVMScript costs more than the
LLVM build of a kernel, and real networks repeat layer shapes. The kernels are written in
low-level TIR with explicit vector types instead of a TensorIR schedule: every loop order, unroll
and vector width is fixed by hand, and the inner products are the x86 instructions of
:mod:`.intrinsics`.

* :func:`conv2d` ``y[b,o,p] = sum_{c,kh,kw} x[b,c,h(p,kh),w(p,kw)] w[o,c,kh,kw] + bias[o]``.
  One task per output row ``(b, oh)`` (the tasks run in parallel, one region, no barrier). It
  first packs the ``KH`` zero-padded input rows it needs as int16 *channel pairs*
  ``xp[c/2, kh, col, 2]`` (sign-extending, interleaving 16 columns of two channels per vector
  shuffle), so that for every ``(c/2, kh, kw)`` the 8 output columns of a vector read 16
  contiguous int16 at column ``ow + kw*dw``; strided convs replicate per ``kw``
  (``xp[c/2, kw, kh, ow, 2]``, column ``ow*sw + kw*dw`` gathered at pack time). Then a
  register-blocked micro-kernel: ``RO`` output channels x ``RV`` vectors of 8 columns, ``RO*RV``
  int32x8 accumulators, one ``vpmaddwd`` per (channel, vector) and (c/2, kh, kw) against a
  broadcast weight pair, and the epilogue.
* :func:`linear` ``y[b,o] = sum_k x[b,k] w[o,k] + bias[o]``: 8 outputs per vector, ``RO`` vectors
  per tile; int8 weights via ``vpmaddwd`` (sign-extending loads), 9..16-bit weights stored as
  int16 into the same ``vpmaddwd``, 4/2-bit packed weights via
  ``vpmaddubsw`` on ``w + 2^(b-1)`` (unpacked in registers with shift+mask) minus
  ``2^(b-1) sum_k x``, or AVX-512 VNNI ``vpdpbusd`` on ``x + 128``.
* :func:`eltwise` (residual add, format change, standalone ReLU), :func:`pool2d` (max, or
  power-of-two average windows), :func:`quantize_input` (float32 -> int8), :func:`dequantize_output`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from tvm import tirx
from tvm.script import tirx as T

from fxquant.backends.tvm_epilogue import Requant, Residual, requantize, residual_add
from fxquant.backends.cpu.intrinsics import broadcast_word, pmaddubsw, pmaddwd, vpdpbusd
from fxquant.backends.cpu.packing import LINEAR_LANES, LOWBIT_GROUP, VNNI_LANES
from fxquant.errors import UnsupportedOpError
from fxquant.backends.pool_shape import PoolShape, window_out_hw

OPAQUE = 8
"""relax ``op_pattern`` kOpaque: FuseOps must leave these kernels alone."""
VEC = 8
PARALLEL_MIN_WORK = 1 << 18
"""MACs (or element operations) below which a loop runs serially: waking the thread pool costs
microseconds, more than a small layer takes, and far more on a loaded machine. Element-wise
kernels count 8 operations per element."""


def _loop(parallel: bool):  # noqa: ANN202 (a TVMScript loop constructor)
    return T.parallel if parallel else T.serial


def _finish(func: tirx.PrimFunc, name: str) -> tirx.PrimFunc:
    return func.with_attr({"global_symbol": name, "tir.noalias": True, "op_pattern": OPAQUE,
                           "fxquant.kernel": name})


@dataclass(frozen=True)
class ConvShape:
    """A conv2d without groups: input ``[n, C, H, W]``, weight ``[OC, C, KH, KW]``."""

    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def out_hw(self) -> tuple[int, int]:
        return window_out_hw(self.height, self.width, self.kernel, self.stride, self.padding, self.dilation)

    @property
    def block(self) -> tuple[int, int]:
        """Register tile ``(RO, RV)``: output channels x 8-column vectors, at most 8 accumulators."""
        vectors = math.ceil(self.out_hw[1] / VEC)
        rv = 2 if vectors % 2 == 0 else 1
        ro = next(r for r in (8 // rv, 4, 2, 1) if self.out_channels % r == 0)
        return ro, rv


@lru_cache(maxsize=None)
def conv2d(s: ConvShape, rq: Requant, residual: Residual | None = None, name: str = "fxq_conv2d") -> tirx.PrimFunc:
    """int8 NCHW conv2d + bias + requantize (+ ReLU, + fused residual add)."""
    C, H, W, OC = s.channels, s.height, s.width, s.out_channels
    (KH, KW), (SH, SW), (PH, PW), (DH, DW) = s.kernel, s.stride, s.padding, s.dilation
    OH, OW = s.out_hw
    RO, RV = s.block
    C2, OWV = (C + 1) // 2, math.ceil(OW / VEC)
    OWP = OWV * VEC
    OCB, VB = OC // RO, OWV // RV
    # stride 1: the kw taps of a row are shifted windows of one padded row (no replication)
    SHARED = SW == 1
    REP = 1 if SHARED else KW
    COLS = math.ceil(max(OWP + (KW - 1) * DW, W + PW) / VEC) * VEC if SHARED else OWP
    VECTOR_PACK = SHARED and W % 16 == 0
    PACK = C2 * REP * KH * COLS * 2
    ROW_WORK = OC * OW * C * KH * KW
    FULL = OW % VEC == 0
    ZERO_BLOCK = 2 * VEC
    has_res = residual is not None

    def xp_index(c2, kw, kh, ow):
        if SHARED:
            return ((c2 * KH + kh) * COLS + ow + kw * DW) * 2
        return (((c2 * KW + kw) * KH + kh) * COLS + ow) * 2

    def pair_vector(x, b, c2, h, w0):
        """int16x32 ``(x[2c2, h, w], x[2c2+1, h, w])`` interleaved for ``w0 <= w < w0 + 16``."""
        even = T.Cast("int16x16", x[b, c2 * 2, h, T.ramp(w0, 1, 16)])
        odd = T.Cast("int16x16", x[b, T.min(c2 * 2 + 1, C - 1), h, T.ramp(w0, 1, 16)])
        if C % 2:
            odd = T.Select(c2 * 2 + 1 < C, odd, T.broadcast(T.int16(0), 16))
        return T.Shuffle([even, odd], [i // 2 + (i % 2) * 16 for i in range(32)])

    def epilogue(acc, bias, res, b, o, oh, ow0):
        y = requantize(acc + T.broadcast(bias[o], VEC), rq, VEC)
        if has_res:
            r = T.Cast("int32x8", res[b, o, oh, T.ramp(ow0, 1, VEC)])
            return T.Cast("int8x8", residual_add(y, r, residual, VEC))
        return T.Cast("int8x8", y)

    def epilogue_lane(y_lane, res, b, o, oh, ow):
        if has_res:
            return T.Cast("int8", residual_add(y_lane, T.Cast("int32", res[b, o, oh, ow]), residual, 1))
        return T.Cast("int8", y_lane)

    @T.macro
    def pack_rows(x, b, oh, xp):
        for i in range(PACK // ZERO_BLOCK):
            for lane in T.vectorized(ZERO_BLOCK):
                xp[i * ZERO_BLOCK + lane] = T.int16(0)
        for c2, kh in T.grid(C2, KH):
            if T.And(oh * SH + kh * DH >= PH, oh * SH + kh * DH < H + PH):
                if SHARED:
                    if VECTOR_PACK:
                        for chunk in range(W // 16):
                            xp[T.ramp(xp_index(c2, 0, kh, PW + chunk * 16), 1, 32)] = pair_vector(
                                x, b, c2, oh * SH + kh * DH - PH, chunk * 16)
                    else:
                        for col, j in T.grid(W, 2):
                            if c2 * 2 + j < C:
                                xp[xp_index(c2, 0, kh, PW + col) + j] = T.Cast(
                                    "int16", x[b, c2 * 2 + j, oh * SH + kh * DH - PH, col])
                else:
                    for kw in range(KW):
                        for ow in range(T.max(PW - kw * DW + SW - 1, 0) // SW,
                                        T.min(OW, (W + PW - kw * DW + SW - 1) // SW)):
                            for j in range(T.min(2, C - c2 * 2)):
                                xp[xp_index(c2, kw, kh, ow) + j] = T.Cast(
                                    "int16", x[b, c2 * 2 + j, oh * SH + kh * DH - PH, ow * SW + kw * DW - PW])

    @T.macro
    def tile(wp, bias, res, y, b, oh, ocb, vb, xp):
        acc = T.decl_buffer((RO * RV,), "int32x8")
        for i in T.unroll(RO * RV):
            acc[i] = T.broadcast(T.int32(0), VEC)
        for c2, kh, kw in T.grid(C2, KH, KW):
            for o in T.unroll(RO):
                for v in T.unroll(RV):
                    acc[o * RV + v] = acc[o * RV + v] + pmaddwd(
                        xp[T.ramp(xp_index(c2, kw, kh, (vb * RV + v) * VEC), 1, 2 * VEC)],
                        broadcast_word(wp[ocb, c2, kh, kw, o], VEC, "int16x16"))
        for o in T.unroll(RO):
            for v in T.unroll(RV):
                if FULL:
                    y[b, ocb * RO + o, oh, T.ramp((vb * RV + v) * VEC, 1, VEC)] = epilogue(
                        acc[o * RV + v], bias, res, b, ocb * RO + o, oh, (vb * RV + v) * VEC)
                else:
                    part = T.decl_buffer((VEC,), "int32")
                    part[T.ramp(0, 1, VEC)] = requantize(
                        acc[o * RV + v] + T.broadcast(bias[ocb * RO + o], VEC), rq, VEC)
                    for lane in range(VEC):
                        if (vb * RV + v) * VEC + lane < OW:
                            y[b, ocb * RO + o, oh, (vb * RV + v) * VEC + lane] = epilogue_lane(
                                part[lane], res, b, ocb * RO + o, oh, (vb * RV + v) * VEC + lane)

    @T.macro
    def row_task(x, wp, bias, res, y, t):
        xp = T.decl_buffer((PACK,), "int16")
        pack_rows(x, t // OH, t % OH, xp)
        for ocb, vb in T.grid(OCB, VB):
            tile(wp, bias, res, y, t // OH, t % OH, ocb, vb, xp)

    @T.macro
    def body(x, wp, bias, res, y, n):
        if n * (OH * ROW_WORK) >= PARALLEL_MIN_WORK:
            for t in T.parallel(n * OH):
                row_task(x, wp, bias, res, y, t)
        else:
            for t in range(n * OH):
                row_task(x, wp, bias, res, y, t)

    @T.prim_func
    def kernel(x_h: T.handle, wp_h: T.handle, bias_h: T.handle, res_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n, C, H, W), "int8")
        wp = T.match_buffer(wp_h, (OCB, C2, KH, KW, RO), "int32")
        bias = T.match_buffer(bias_h, (OC,), "int32")
        res = T.match_buffer(res_h, (n, OC, OH, OW), "int8")
        y = T.match_buffer(y_h, (n, OC, OH, OW), "int8")
        body(x, wp, bias, res, y, n)

    @T.prim_func
    def kernel_nores(x_h: T.handle, wp_h: T.handle, bias_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n, C, H, W), "int8")
        wp = T.match_buffer(wp_h, (OCB, C2, KH, KW, RO), "int32")
        bias = T.match_buffer(bias_h, (OC,), "int32")
        y = T.match_buffer(y_h, (n, OC, OH, OW), "int8")
        body(x, wp, bias, y, y, n)  # res is never read without a residual

    return _finish(kernel if has_res else kernel_nores, name)


LINEAR_KINDS = ("int8", "int16", "int4", "int2", "vnni")


@lru_cache(maxsize=None)
def linear(in_features: int, out_features: int, rq: Requant, weight_kind: str = "int8",
           name: str = "fxq_linear") -> tirx.PrimFunc:
    """int8 ``[n, K] x [O, K]^T`` + bias + requantize (+ ReLU); weights packed per ``weight_kind``.

    ``weight_kind``: ``int8`` (``vpmaddwd``, weights sign-extended on load), ``int16`` (the same
    layout and instruction on 9..16-bit weights stored as int16), ``int4`` / ``int2`` (packed, ``vpmaddubsw``, the bias
    input already holds ``bias``; the kernel subtracts ``2^(b-1) sum_k x``), ``vnni`` (``vpdpbusd``
    on ``x + 128``; the bias input must hold ``bias - 128 rowsum(w)``).
    """
    if weight_kind not in LINEAR_KINDS:
        raise UnsupportedOpError(f"linear weight kind {weight_kind!r}", f"use one of {', '.join(LINEAR_KINDS)}")
    K, O = in_features, out_features
    lanes = VNNI_LANES if weight_kind == "vnni" else LINEAR_LANES
    bits = {"int4": 4, "int2": 2}.get(weight_kind, 8)
    per_byte = 8 // bits if bits < 8 else 1
    wide = weight_kind in ("int8", "int16")  # the vpmaddwd path
    k_step = 2 if wide else {"vnni": 4}.get(weight_kind, 4 * per_byte)
    group = LOWBIT_GROUP.get(bits, 1)  # packed steps summed in int16 before widening
    KP = math.ceil(K / (k_step * group)) * k_step * group
    KS = KP // k_step
    OB = math.ceil(O / lanes)
    OP = OB * lanes
    offset = (1 << (bits - 1)) if bits < 8 else 0
    vdt, wdt = f"int32x{lanes}", ("uint8" if bits < 8 else "int16" if weight_kind == "int16" else "int8")
    w_shape = (OB, KS, 2 * lanes) if wide else {"vnni": (OB, KS, 4 * lanes)}.get(weight_kind, (OB, KS, 32))
    FULL = O % lanes == 0
    XPAD = 128 if weight_kind == "vnni" else 0
    PACK_VEC = 16

    def lowbit_sums(xs, wp, b, ob, k):
        """int16 pair sums of one packed 32-byte block (``per_byte`` k-quads)."""
        v = wp[ob, k, T.ramp(0, 1, 32)]
        pair_sums = pmaddubsw(v & T.broadcast(T.uint8((1 << bits) - 1), 32),
                              broadcast_word(T.reinterpret("int32", xs[b, T.ramp(k * k_step, 1, 4)]), 8, "int8x32"))
        for i in range(1, per_byte):
            field = (v >> T.broadcast(T.uint8(bits * i), 32)) & T.broadcast(T.uint8((1 << bits) - 1), 32)
            pair_sums = pair_sums + pmaddubsw(
                field, broadcast_word(T.reinterpret("int32", xs[b, T.ramp(k * k_step + 4 * i, 1, 4)]), 8, "int8x32"))
        return pair_sums

    def step(xs, wp, b, ob, kg):
        if wide:
            k = kg
            w16 = wp[ob, k, T.ramp(0, 1, 16)]
            return pmaddwd(w16 if weight_kind == "int16" else T.Cast("int16x16", w16),
                           broadcast_word(T.reinterpret("int32", xs[b, T.ramp(k * 2, 1, 2)]), 8, "int16x16"))
        if weight_kind == "vnni":
            return broadcast_word(T.reinterpret("int32", xs[b, T.ramp(kg * 4, 1, 4)]), 16, "int8x64")
        sums = lowbit_sums(xs, wp, b, ob, kg * group)
        for g in range(1, group):
            sums = sums + lowbit_sums(xs, wp, b, ob, kg * group + g)
        return pmaddwd(sums, T.broadcast(T.int16(1), 16))

    def accumulate(acc, xs, wp, b, ob, kg):
        if weight_kind == "vnni":
            return vpdpbusd(acc, step(xs, wp, b, ob, kg), wp[ob, kg, T.ramp(0, 1, 64)])
        return acc + step(xs, wp, b, ob, kg)

    def make_tile(rb: int, ro: int):
        @T.macro
        def tile(xs, xsum, wp, bias, y, n, b0, ob0):
            acc = T.decl_buffer((rb * ro,), vdt)
            for i in T.unroll(rb * ro):
                acc[i] = T.broadcast(T.int32(0), lanes)
            for k in range(KS // group):
                for r in T.unroll(rb):
                    for o in T.unroll(ro):
                        acc[r * ro + o] = accumulate(acc[r * ro + o], xs, wp, T.min(b0 + r, n - 1),
                                                     T.min(ob0 + o, OB - 1), k)
            for r in T.unroll(rb):
                for o in T.unroll(ro):
                    if T.And(b0 + r < n, ob0 + o < OB):
                        part = T.decl_buffer((lanes,), "int32")
                        part[T.ramp(0, 1, lanes)] = requantize(
                            acc[r * ro + o] + bias[T.ramp((ob0 + o) * lanes, 1, lanes)]
                            - T.broadcast(xsum[b0 + r] * offset, lanes), rq, lanes)
                        if FULL:
                            y[b0 + r, T.ramp((ob0 + o) * lanes, 1, lanes)] = T.Cast(f"int8x{lanes}",
                                                                                  part[T.ramp(0, 1, lanes)])
                        else:
                            for lane in range(lanes):
                                if (ob0 + o) * lanes + lane < O:
                                    y[b0 + r, (ob0 + o) * lanes + lane] = T.Cast("int8", part[lane])
        return tile

    RO1 = 4
    RB, RO = 4, (2 if lanes == LINEAR_LANES else 1)
    tile_one, tile_many = make_tile(1, RO1), make_tile(RB, RO)
    one_row = _loop(O * K >= PARALLEL_MIN_WORK)
    # activations as the kernel broadcasts them: int16 pairs (one 32-bit word per broadcast),
    # u8 quads (x + 128) for VNNI, int8 quads for the packed path
    XDT = "int16" if wide else {"vnni": "uint8"}.get(weight_kind, "int8")

    @T.prim_func
    def kernel(x_h: T.handle, wp_h: T.handle, bias_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n, K), "int8")
        wp = T.match_buffer(wp_h, w_shape, wdt)
        bias = T.match_buffer(bias_h, (OP,), "int32")
        y = T.match_buffer(y_h, (n, O), "int8")
        xs = T.decl_buffer((n, KP), XDT)
        xsum = T.decl_buffer((n,), "int32")
        for b in range(n):
            for k0 in range(K // PACK_VEC):
                for k1 in T.vectorized(PACK_VEC):
                    xs[b, k0 * PACK_VEC + k1] = T.Cast(XDT, T.Cast("int32", x[b, k0 * PACK_VEC + k1]) + XPAD)
            for k in range(K // PACK_VEC * PACK_VEC, KP):
                xs[b, k] = T.if_then_else(k < K, T.Cast(XDT, T.Cast("int32", x[b, T.min(k, K - 1)]) + XPAD),
                                          T.Cast(XDT, 0))
            xsum[b] = 0
            if offset != 0:
                for k in range(K):
                    xsum[b] = xsum[b] + T.Cast("int32", x[b, k])
        n32 = T.meta_var(T.Cast("int32", n))
        if n == T.int64(1):
            for t in one_row((OB + RO1 - 1) // RO1):
                tile_one(xs, xsum, wp, bias, y, n32, 0, t * RO1)
        else:
            for t in T.parallel((n32 + RB - 1) // RB * ((OB + RO - 1) // RO)):
                tile_many(xs, xsum, wp, bias, y, n32, t // ((OB + RO - 1) // RO) * RB,
                          t % ((OB + RO - 1) // RO) * RO)

    return _finish(kernel, name)


@lru_cache(maxsize=None)
def eltwise(shape: tuple[int, ...], lefts: tuple[int, ...], rq: Requant, name: str = "fxq_eltwise") -> tirx.PrimFunc:
    """``y = requantize(sum_i x_i << lefts[i])`` over int8 tensors ``[n, *shape]``.

    Two inputs: the residual add (inputs aligned to ``max(FL_a, FL_b)``); one input: a format
    change or a standalone ReLU (``lefts = (0,)``, ``rq.shift = FL_out - FL_in``).
    """
    M = math.prod(shape)
    full = (None,) + tuple(shape)
    lanes = VEC if M % VEC == 0 else 1
    vt = f"int32x{lanes}" if lanes > 1 else "int32"
    it = f"int8x{lanes}" if lanes > 1 else "int8"

    def load(buf, i):
        return T.Cast(vt, buf[T.ramp(i, 1, lanes)] if lanes > 1 else buf[i])

    def total(bufs, i):
        expr = load(bufs[0], i) << (T.broadcast(T.int32(lefts[0]), lanes) if lanes > 1 else T.int32(lefts[0]))
        for buf, left in zip(bufs[1:], lefts[1:]):
            expr = expr + (load(buf, i) << (T.broadcast(T.int32(left), lanes) if lanes > 1 else T.int32(left)))
        return T.Cast(it, requantize(expr, rq, lanes))

    def store_index(i):
        return T.ramp(i, 1, lanes) if lanes > 1 else i

    if len(lefts) == 2:
        @T.prim_func
        def kernel(a_h: T.handle, b_h: T.handle, y_h: T.handle):
            n = T.int64()
            a = T.match_buffer(a_h, (n,) + full[1:], "int8")
            b = T.match_buffer(b_h, (n,) + full[1:], "int8")
            y = T.match_buffer(y_h, (n,) + full[1:], "int8")
            af = T.decl_buffer((n * M,), "int8", data=a.data)
            bf = T.decl_buffer((n * M,), "int8", data=b.data)
            yf = T.decl_buffer((n * M,), "int8", data=y.data)
            if n * (M * 8) >= PARALLEL_MIN_WORK:
                for i in T.parallel(n * M // lanes):
                    yf[store_index(i * lanes)] = total((af, bf), i * lanes)
            else:
                for i in range(n * M // lanes):
                    yf[store_index(i * lanes)] = total((af, bf), i * lanes)
    else:
        @T.prim_func
        def kernel(a_h: T.handle, y_h: T.handle):
            n = T.int64()
            a = T.match_buffer(a_h, (n,) + full[1:], "int8")
            y = T.match_buffer(y_h, (n,) + full[1:], "int8")
            af = T.decl_buffer((n * M,), "int8", data=a.data)
            yf = T.decl_buffer((n * M,), "int8", data=y.data)
            if n * (M * 8) >= PARALLEL_MIN_WORK:
                for i in T.parallel(n * M // lanes):
                    yf[store_index(i * lanes)] = total((af,), i * lanes)
            else:
                for i in range(n * M // lanes):
                    yf[store_index(i * lanes)] = total((af,), i * lanes)
    return _finish(kernel, name)


@lru_cache(maxsize=None)
def pool2d(s: PoolShape, rq: Requant | None, name: str = "fxq_pool2d") -> tirx.PrimFunc:
    """Max pooling (``rq is None``; padding never wins) or window sum + requantize (average)."""
    C, H, W = s.channels, s.height, s.width
    (KH, KW), (SH, SW), (PH, PW) = s.kernel, s.stride, s.padding
    OH, OW = s.out_hw
    is_max = rq is None

    def inside(oh, ow, kh, kw):
        return T.And(T.And(oh * SH + kh >= PH, oh * SH + kh < H + PH),
                     T.And(ow * SW + kw >= PW, ow * SW + kw < W + PW))

    def element(x, b, c, oh, ow, kh, kw):
        return T.Cast("int32", x[b, c, T.max(T.min(oh * SH + kh - PH, H - 1), 0),
                                 T.max(T.min(ow * SW + kw - PW, W - 1), 0)])

    def finish(v):
        return T.Cast("int8", v if is_max else requantize(v, rq, 1))

    @T.macro
    def plane(x, y, bc):
        for oh, ow in T.grid(OH, OW):
            acc = T.decl_buffer((1,), "int32")
            acc[0] = -128 if is_max else 0
            for kh, kw in T.grid(KH, KW):
                if inside(oh, ow, kh, kw):
                    acc[0] = (T.max(acc[0], element(x, bc // C, bc % C, oh, ow, kh, kw)) if is_max
                              else acc[0] + element(x, bc // C, bc % C, oh, ow, kh, kw))
            y[bc // C, bc % C, oh, ow] = finish(acc[0])

    @T.prim_func
    def kernel(x_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n, C, H, W), "int8")
        y = T.match_buffer(y_h, (n, C, OH, OW), "int8")
        if n * (C * OH * OW * KH * KW) >= PARALLEL_MIN_WORK:
            for bc in T.parallel(n * C):
                plane(x, y, bc)
        else:
            for bc in range(n * C):
                plane(x, y, bc)

    return _finish(kernel, name)


@lru_cache(maxsize=None)
def quantize_input(shape: tuple[int, ...], frac_bits: int, bits: int, name: str = "fxq_quantize") -> tirx.PrimFunc:
    """float32 ``[n, *shape]`` -> int8 ``clamp(round_half_even(x * 2^FL), -2^(BW-1), 2^(BW-1)-1)``.

    ``x * 2^FL`` is exact in float32 (a power-of-two scale; overflow saturates through the clamp)
    and ``nearbyint`` rounds half to even, as :func:`fxquant.fixed_point.quantize_int` does for
    the same float32 values.
    """
    M = math.prod(shape)
    lanes = VEC if M % VEC == 0 else 1
    scale, lo, hi = math.ldexp(1.0, frac_bits), -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    ft = f"float32x{lanes}" if lanes > 1 else "float32"

    def const(v: float) -> tirx.PrimExpr:
        return T.broadcast(T.float32(v), lanes) if lanes > 1 else T.float32(v)

    def index(i):
        return T.ramp(i, 1, lanes) if lanes > 1 else i

    def quantized(xf, i):
        return T.Cast(f"int8x{lanes}" if lanes > 1 else "int8",
                      T.max(T.min(T.nearbyint(xf[index(i)] * const(scale)), const(hi)), const(lo)))

    @T.prim_func
    def kernel(x_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n,) + tuple(shape), "float32")
        y = T.match_buffer(y_h, (n,) + tuple(shape), "int8")
        xf = T.decl_buffer((n * M,), "float32", data=x.data)
        yf = T.decl_buffer((n * M,), "int8", data=y.data)
        if n * (M * 8) >= PARALLEL_MIN_WORK:
            for i in T.parallel(n * M // lanes):
                yf[index(i * lanes)] = quantized(xf, i * lanes)
        else:
            for i in range(n * M // lanes):
                yf[index(i * lanes)] = quantized(xf, i * lanes)

    return _finish(kernel, name)


@lru_cache(maxsize=None)
def dequantize_output(shape: tuple[int, ...], frac_bits: int, name: str = "fxq_dequantize") -> tirx.PrimFunc:
    """int8 ``[n, *shape]`` -> float32 ``k * 2^-FL`` (exact)."""
    M = math.prod(shape)
    scale = math.ldexp(1.0, -frac_bits)

    @T.prim_func
    def kernel(x_h: T.handle, y_h: T.handle):
        n = T.int64()
        x = T.match_buffer(x_h, (n,) + tuple(shape), "int8")
        y = T.match_buffer(y_h, (n,) + tuple(shape), "float32")
        xf = T.decl_buffer((n * M,), "int8", data=x.data)
        yf = T.decl_buffer((n * M,), "float32", data=y.data)
        for i in range(n * M):
            yf[i] = T.Cast("float32", xf[i]) * T.float32(scale)

    return _finish(kernel, name)
