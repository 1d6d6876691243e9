"""Weight layouts of the kernels (numpy, done once at build time).

* Conv, 8-bit path (:func:`pack_conv_weight`): ``w[OC, C, KH, KW]`` -> int32
  ``[OC/RO, ceil(C/2), KH, KW, RO]``; each int32 holds the int16 pair ``(w[o, 2c], w[o, 2c+1])``
  (low half first, little endian), so one broadcast word feeds ``vpmaddwd`` against an
  activation vector interleaved by channel pairs.
* Linear, 8-bit path: int8 ``[ceil(O/8), ceil(K/2), 8, 2]`` (sign-extended to int16 on load);
  16-bit path (weights of 9..16 bits): the same layout in int16, loaded as is.
* Linear, packed path for weights of ``b <= 4`` bits: unsigned ``u = w + 2^(b-1)`` in
  ``[0, 2^b)``, laid out ``[ceil(O/8), K/4, 8, 4]`` for ``vpmaddubsw``; ``8/b`` consecutive
  k-quads share one 32-byte block, field ``i`` of byte ``j`` (bits ``b*i .. b*i+b-1``) holding
  quad ``i``. The kernel subtracts ``2^(b-1) * sum_k x[k]``.
* Linear, VNNI path: int8 ``[ceil(O/16), K/4, 16, 4]``; activations get ``+128`` (unsigned) and
  the bias absorbs ``-128 * rowsum(w)``.
"""

from __future__ import annotations

import numpy as np

from fxquant import legality
from fxquant.errors import UnsupportedOpError
from fxquant.fixed_point import min_signed_bits, saturate

LINEAR_LANES = 8
VNNI_LANES = 16
LOWBIT_GROUP = {4: 4, 2: 8}
"""Packed 32-byte blocks whose ``vpmaddubsw`` pair sums the linear kernel adds in int16 before
one ``vpmaddwd``: one block adds at most ``(8/b) * 2 * (2^b - 1) * 128`` in magnitude per lane
(7680 for 4 bits, 3072 for 2 bits), so 4 (8) blocks stay within 30720 (24576) < 2^15. K is padded
to whole groups."""


ACT_BITS = 8
"""Activations are int8 tensors: integers of at most 8 bits (``|x| <= 128``)."""
MAX_WEIGHT_BITS = 16
"""``vpmaddwd`` multiplies int16 pairs: weights of up to 16 bits are exact against int8 activations
(``|w x| <= 2^15 * 2^7``; the one inexact pair, ``(-2^15)^2 * 2``, needs an int16 activation)."""


def linear_kind(w: np.ndarray, vnni: bool) -> str:
    """The linear kernel a weight matrix takes, from the bits its integers need (not its format):
    ``int2`` / ``int4`` (packed, ``vpmaddubsw``), ``vnni`` (``vpdpbusd``, int8 weights on a VNNI
    target), ``int8`` or ``int16`` (``vpmaddwd``)."""
    bits = min_signed_bits(w)
    if bits <= 2:
        return "int2"
    if bits <= 4:
        return "int4"
    if bits <= 8:
        return "vnni" if vnni else "int8"
    return "int16"


def linear_bound(kind: str, w: np.ndarray, bias: np.ndarray | None) -> int:
    """Worst-case int32 accumulator of the ``kind`` linear kernel (:func:`fxquant.legality.dot_bound`):
    the packed kernels sum ``(w + 2^(b-1)) x`` (``|w| + 8`` bounds both packed widths), VNNI sums
    ``w (x + 128)`` with ``x + 128 <= 255``."""
    act = 1 << (ACT_BITS - 1)
    if kind in ("int2", "int4"):
        return legality.dot_bound(w, bias, act, weight_offset=8)
    if kind == "vnni":
        return legality.dot_bound(w, bias, 2 * act)
    return legality.dot_bound(w, bias, act)


def conv_bound(w: np.ndarray, bias: np.ndarray | None) -> int:
    """Worst-case int32 accumulator of the conv kernel (``vpmaddwd`` on int16 channel pairs)."""
    return legality.dot_bound(w, bias, 1 << (ACT_BITS - 1))


def add_bound(lefts: tuple[int, ...]) -> int:
    """Worst-case int32 sum of an add (or fused residual add) of int8 inputs shifted by ``lefts``."""
    return legality.add_bound(lefts, [ACT_BITS] * len(lefts))


def _pad_to(a: np.ndarray, axis: int, multiple: int) -> np.ndarray:
    extra = -a.shape[axis] % multiple
    if not extra:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, extra)
    return np.pad(a, widths)


def _int16_pairs(w: np.ndarray, axis: int) -> np.ndarray:
    """Pairs along ``axis`` (padded to even) fused into int32 words, the pair index last-but-none."""
    w = np.moveaxis(_pad_to(w.astype(np.int16), axis, 2), axis, -1)
    return np.ascontiguousarray(w).view(np.int32)


def pack_conv_weight(w: np.ndarray, ro: int) -> np.ndarray:
    """``[OC, C, KH, KW]`` int -> int32 ``[OC/ro, ceil(C/2), KH, KW, ro]`` channel-pair words."""
    if min_signed_bits(w) > MAX_WEIGHT_BITS:
        raise UnsupportedOpError(f"conv weights need {min_signed_bits(w)} bits, more than int16",
                                 f"weights of up to {MAX_WEIGHT_BITS} bits are supported")
    oc, c, kh, kw = w.shape
    pairs = _int16_pairs(w.transpose(0, 2, 3, 1), axis=3).reshape(oc, kh, kw, (c + 1) // 2)
    return np.ascontiguousarray(pairs.reshape(oc // ro, ro, kh, kw, -1).transpose(0, 4, 2, 3, 1))


def pack_linear_weight(w: np.ndarray, dtype: str = "int8") -> np.ndarray:
    """``[O, K]`` values -> ``dtype`` (int8, or int16 for 9..16-bit weights) ``[ceil(O/8), ceil(K/2), 8 * 2]``."""
    bits = 8 if dtype == "int8" else MAX_WEIGHT_BITS
    if min_signed_bits(w) > bits:
        raise UnsupportedOpError(f"linear weights need {min_signed_bits(w)} bits, more than {dtype}",
                                 f"weights of up to {MAX_WEIGHT_BITS} bits are supported")
    w = _pad_to(_pad_to(w.astype(dtype), 0, LINEAR_LANES), 1, 2)
    o, k = w.shape
    blocks = w.reshape(o // LINEAR_LANES, LINEAR_LANES, k // 2, 2).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(blocks).reshape(o // LINEAR_LANES, k // 2, 2 * LINEAR_LANES)


def pack_linear_weight_lowbit(w: np.ndarray, bits: int) -> np.ndarray:
    """``[O, K]`` values of ``bits <= 4`` -> uint8 ``[ceil(O/8), K/(4*per_byte), 32]``."""
    if bits not in (2, 4):
        raise UnsupportedOpError(f"packed weights of {bits} bits", "use 2 or 4 (8 uses the int8 path)")
    per_byte = 8 // bits
    u = (saturate(w, bits) + (1 << (bits - 1))).astype(np.uint8)
    u = _pad_to(_pad_to(u, 0, LINEAR_LANES), 1, 4 * per_byte * LOWBIT_GROUP[bits])
    o, k = u.shape
    quads = u.reshape(o // LINEAR_LANES, LINEAR_LANES, k // 4, 4).transpose(0, 2, 1, 3)  # [Ob, K4, 8, 4]
    quads = quads.reshape(o // LINEAR_LANES, k // (4 * per_byte), per_byte, 32)
    packed = np.zeros(quads.shape[:2] + (32,), np.uint8)
    for i in range(per_byte):
        packed |= quads[:, :, i, :] << np.uint8(bits * i)
    return packed


def pack_linear_weight_vnni(w: np.ndarray) -> np.ndarray:
    """``[O, K]`` int8 values -> int8 ``[ceil(O/16), ceil(K/4), 16 * 4]``."""
    w = _pad_to(_pad_to(w.astype(np.int8), 0, VNNI_LANES), 1, 4)
    o, k = w.shape
    blocks = w.reshape(o // VNNI_LANES, VNNI_LANES, k // 4, 4).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(blocks).reshape(o // VNNI_LANES, k // 4, 4 * VNNI_LANES)


def pad_bias(bias: np.ndarray | None, out_features: int, multiple: int) -> np.ndarray:
    b = np.zeros(out_features, np.int64) if bias is None else np.asarray(bias, np.int64)
    return _pad_to(b, 0, multiple).astype(np.int32)


def pack_tap_pairs(w: np.ndarray) -> np.ndarray:
    """``[OC, CG, KH, KW]`` int -> int32 ``[OC, CG, KH, ceil(KW/2)]`` words of the int16 tap pairs
    ``(w[.., 2p], w[.., 2p+1])`` (a zero weight completes an odd ``KW``), for the grouped conv."""
    if min_signed_bits(w) > MAX_WEIGHT_BITS:
        raise UnsupportedOpError(f"conv weights need {min_signed_bits(w)} bits, more than int16",
                                 f"weights of up to {MAX_WEIGHT_BITS} bits are supported")
    return _int16_pairs(w, axis=3)
