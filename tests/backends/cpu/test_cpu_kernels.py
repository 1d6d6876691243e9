"""Each TensorIR kernel against a numpy int64 reference, bit-exact (fxquant.fixed_point math)."""

from __future__ import annotations

import numpy as np
import pytest

import tvm

from fxquant.backends.cpu import kernels, packing
from fxquant.backends.tvm_epilogue import Requant, Residual
from fxquant.backends.cpu.features import host_cpu, resolve_target
from fxquant.fixed_point import FixedPoint, requantize

HOST = {"kind": "llvm", "mcpu": resolve_target("host").mcpu}


def _run(func, *arrays: np.ndarray, out: np.ndarray) -> np.ndarray:
    lib = tvm.compile(func, target=HOST)
    y = tvm.runtime.tensor(out)
    lib[func.attrs["global_symbol"]](*[tvm.runtime.tensor(a) for a in arrays], y)
    return y.numpy()


def _ref_requant(acc: np.ndarray, rq: Requant) -> np.ndarray:
    out = requantize(acc, 0, FixedPoint(rq.bits, rq.shift))
    return np.maximum(out, 0) if rq.relu else out


def _out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    """Output positions counted one by one: the last window tap must lie inside the padded input."""
    return sum(1 for start in range(0, size + 2 * pad, stride) if start + dil * (k - 1) < size + 2 * pad)


def _conv_ref(x: np.ndarray, w: np.ndarray, b: np.ndarray, s: kernels.ConvShape) -> np.ndarray:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = s.kernel, s.stride, s.padding, s.dilation
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    oh, ow = _out_size(x.shape[2], kh, sh, ph, dh), _out_size(x.shape[3], kw, sw, pw, dw)
    acc = np.zeros((x.shape[0], w.shape[0], oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            acc += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j].astype(np.int64))
    return acc + b.reshape(1, -1, 1, 1)


CONV_CASES = [  # C, H, W, OC, k, stride, pad, dilation, batch
    (3, 7, 7, 4, 3, 1, 1, 1, 1),
    (5, 9, 10, 6, 3, 2, 1, 1, 3),
    (16, 16, 16, 16, 3, 1, 1, 1, 2),
    (8, 8, 8, 8, 1, 2, 0, 1, 1),
    (4, 11, 13, 8, 3, 1, 2, 2, 2),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(c) for c in CONV_CASES])
def test_conv2d(case: tuple[int, ...]) -> None:
    c, h, w_, oc, k, st, pad, dil, n = case
    rng = np.random.default_rng(sum(case))
    s = kernels.ConvShape(c, h, w_, oc, (k, k), (st, st), (pad, pad), (dil, dil))
    rq = Requant(-9, 8, relu=st == 1)
    x = rng.integers(-128, 128, (n, c, h, w_)).astype(np.int8)
    w = rng.integers(-128, 128, (oc, c, k, k))
    b = rng.integers(-40000, 40000, oc).astype(np.int32)
    oh, ow = _out_size(h, k, st, pad, dil), _out_size(w_, k, st, pad, dil)
    assert s.out_hw == (oh, ow)
    got = _run(kernels.conv2d(s, rq), x, packing.pack_conv_weight(w, s.block[0]), b,
               out=np.zeros((n, oc, oh, ow), np.int8))
    np.testing.assert_array_equal(got, _ref_requant(_conv_ref(x, w, b, s), rq))


def test_conv2d_16_bit_weights() -> None:
    """int16 weights (incl. -2^15 and 2^15-1) into the same vpmaddwd channel pairs."""
    rng = np.random.default_rng(12)
    s = kernels.ConvShape(5, 6, 8, 4, (3, 3), (1, 1), (1, 1))
    x = rng.integers(-128, 128, (2, 5, 6, 8)).astype(np.int8)
    w = rng.integers(-(1 << 15), 1 << 15, (4, 5, 3, 3))
    w[0], w[1] = -(1 << 15), (1 << 15) - 1
    x[0] = -128
    b = rng.integers(-40000, 40000, 4).astype(np.int32)
    rq = Requant(-16, 8)
    got = _run(kernels.conv2d(s, rq), x, packing.pack_conv_weight(w, s.block[0]), b,
               out=np.zeros((2, 4, 6, 8), np.int8))
    np.testing.assert_array_equal(got, _ref_requant(_conv_ref(x, w, b, s), rq))


def test_conv2d_fused_residual() -> None:
    rng = np.random.default_rng(7)
    s = kernels.ConvShape(8, 8, 12, 8, (3, 3), (1, 1), (1, 1))
    rq, res = Requant(-8, 6), Residual(1, 0, Requant(-2, 8, relu=True))
    x = rng.integers(-128, 128, (2, 8, 8, 12)).astype(np.int8)
    r = rng.integers(-128, 128, (2, 8, 8, 12)).astype(np.int8)
    w = rng.integers(-128, 128, (8, 8, 3, 3))
    b = rng.integers(-1000, 1000, 8).astype(np.int32)
    got = _run(kernels.conv2d(s, rq, res), x, packing.pack_conv_weight(w, s.block[0]), b, r,
               out=np.zeros((2, 8, 8, 12), np.int8))
    y = _ref_requant(_conv_ref(x, w, b, s), rq)
    np.testing.assert_array_equal(got, _ref_requant((y << 1) + r.astype(np.int64), res.out))


@pytest.mark.parametrize("kind", ["int16", "int8", "int4", "int2"])
@pytest.mark.parametrize("n,k,o", [(1, 37, 10), (5, 64, 21), (1, 256, 64), (9, 100, 16)])
def test_linear(kind: str, n: int, k: int, o: int) -> None:
    rng = np.random.default_rng(n * k + o)
    bits = {"int16": 16, "int8": 8, "int4": 4, "int2": 2}[kind]
    x = rng.integers(-128, 128, (n, k)).astype(np.int8)
    w = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (o, k))
    b = rng.integers(-5000, 5000, o)
    wp = packing.pack_linear_weight(w, kind) if bits >= 8 else packing.pack_linear_weight_lowbit(w, bits)
    rq = Requant(-5 - (bits - 8) * (bits > 8), 7, relu=True)
    got = _run(kernels.linear(k, o, rq, kind), x, wp, packing.pad_bias(b, o, packing.LINEAR_LANES),
               out=np.zeros((n, o), np.int8))
    np.testing.assert_array_equal(got, _ref_requant(x.astype(np.int64) @ w.T + b, rq))


def test_packed_weights_are_smaller() -> None:
    w = np.zeros((64, 256), np.int64)
    assert packing.pack_linear_weight_lowbit(w, 4).nbytes * 2 == packing.pack_linear_weight(w).nbytes
    assert packing.pack_linear_weight_lowbit(w, 2).nbytes * 4 == packing.pack_linear_weight(w).nbytes


@pytest.mark.parametrize("rq", [Requant(-1, 8), Requant(-2, 4, relu=True), Requant(-3, 8), Requant(2, 8),
                                Requant(0, 3), Requant(-30, 8), Requant(-31, 8), Requant(-40, 8), Requant(12, 5)])
def test_requantize_epilogue(rq: Requant) -> None:
    """Ties (x.5 both signs, odd and even neighbours), negatives and saturation, via eltwise."""
    ties = np.array([k * (1 << max(-rq.shift, 0)) + (1 << max(-rq.shift - 1, 0)) for k in range(-8, 8)])
    values = np.concatenate([ties, -ties, [0, 1, -1, 127, -128, 100, -100]])[:32]
    x = np.clip(values, -128, 127).astype(np.int8).reshape(1, 32)
    got = _run(kernels.eltwise((32,), (0,), rq), x, out=np.zeros_like(x))
    np.testing.assert_array_equal(got, _ref_requant(x.astype(np.int64), rq))


@pytest.mark.parametrize("shift", [-1, -10, -30, -31, 3])
def test_requantize_wide_accumulator(shift: int) -> None:
    """The int32 epilogue on accumulators far beyond int8 (ties, both signs, int32 extremes):
    a conv over zero input whose accumulator is its bias, one output channel per value."""
    acc = np.array([5, -5, 6, -6, 7, -7, 2**20 + 2**9, -(2**20) - 2**9, 3 * 2**9, -3 * 2**9, 2**30, -(2**30),
                    2**30 + 1, -(2**30) - 1, 2**31 - 1, -(2**31)])
    s = kernels.ConvShape(1, 1, 1, acc.size, (1, 1))
    rq = Requant(shift, 8)
    got = _run(kernels.conv2d(s, rq), np.zeros((1, 1, 1, 1), np.int8),
               packing.pack_conv_weight(np.zeros((acc.size, 1, 1, 1)), s.block[0]), acc.astype(np.int32),
               out=np.zeros((1, acc.size, 1, 1), np.int8))
    np.testing.assert_array_equal(got.reshape(-1), _ref_requant(acc, rq))


@pytest.mark.parametrize("shape,lefts", [((4, 5, 5), (0, 2)), ((16, 8, 8), (3, 0))])
def test_residual_add(shape: tuple[int, ...], lefts: tuple[int, int]) -> None:
    rng = np.random.default_rng(3)
    a = rng.integers(-128, 128, (3, *shape)).astype(np.int8)
    b = rng.integers(-128, 128, (3, *shape)).astype(np.int8)
    rq = Requant(-2, 6, relu=True)
    got = _run(kernels.eltwise(shape, lefts, rq), a, b, out=np.zeros_like(a))
    total = (a.astype(np.int64) << lefts[0]) + (b.astype(np.int64) << lefts[1])
    np.testing.assert_array_equal(got, _ref_requant(total, rq))


@pytest.mark.parametrize("rq", [None, Requant(-2, 8), Requant(-6, 8, relu=True)])
def test_pool2d(rq: Requant | None) -> None:
    rng = np.random.default_rng(5)
    k = 8 if rq is not None and rq.relu else 2
    s = kernels.PoolShape(3, 8, 8, (k, k), (k, k))
    x = rng.integers(-128, 128, (2, 3, 8, 8)).astype(np.int8)
    oh, ow = s.out_hw
    got = _run(kernels.pool2d(s, rq), x, out=np.zeros((2, 3, oh, ow), np.int8))
    win = np.lib.stride_tricks.sliding_window_view(x.astype(np.int64), (k, k), axis=(2, 3))[:, :, ::k, ::k]
    ref = win.max(axis=(-1, -2)) if rq is None else _ref_requant(win.sum(axis=(-1, -2)), rq)
    np.testing.assert_array_equal(got, ref)


def test_quantize_input_rounds_half_to_even() -> None:
    from fxquant.fixed_point import quantize_int

    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.25, 1e9, -1e9, 3.75, -3.75, 0.0, 7.9, -8.1, 1.25, 2.0]],
                 np.float32) / 2
    got = _run(kernels.quantize_input((16,), 1, 4), x, out=np.zeros((1, 16), np.int8))
    np.testing.assert_array_equal(got, quantize_int(x, FixedPoint(4, 1)))


def _vnni_case() -> tuple[object, list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(11)
    n, k, o = 3, 72, 20
    x = rng.integers(-128, 128, (n, k)).astype(np.int8)
    w = rng.integers(-128, 128, (o, k))
    b = rng.integers(-5000, 5000, o)
    rq = Requant(-7, 8)
    args = [x, packing.pack_linear_weight_vnni(w), packing.pad_bias(b - 128 * w.sum(1), o, packing.VNNI_LANES)]
    return kernels.linear(k, o, rq, "vnni"), args, _ref_requant(x.astype(np.int64) @ w.T + b, rq)


def test_vnni_linear_compiles_to_vpdpbusd() -> None:
    """Compile-only on any host: LLVM code generation for znver5 works everywhere."""
    func, _, _ = _vnni_case()
    lib = tvm.compile(func, target={"kind": "llvm", "mcpu": "znver5"})
    assert "vpdpbusd" in lib.mod.inspect_source("asm")


@pytest.mark.skipif(not host_cpu().has_vnni, reason="host CPU lacks AVX-512 VNNI")
def test_vnni_linear_runs_bit_exact() -> None:
    func, args, ref = _vnni_case()
    lib = tvm.compile(func, target={"kind": "llvm", "mcpu": resolve_target("host").mcpu})
    y = tvm.runtime.tensor(np.zeros(ref.shape, np.int8))
    lib["fxq_linear"](*[tvm.runtime.tensor(a) for a in args], y)
    np.testing.assert_array_equal(y.numpy(), ref)


def test_avx2_kernels_use_pmaddwd() -> None:
    lib = tvm.compile(kernels.linear(64, 16, Requant(-4, 8), "int4"), target=HOST)
    asm = lib.mod.inspect_source("asm")
    assert "vpmaddubsw" in asm and "vpmaddwd" in asm
