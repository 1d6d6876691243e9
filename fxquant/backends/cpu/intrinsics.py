"""The x86 integer dot-product instructions the kernels use, as TIR expressions.

* ``pmaddwd(a, b)`` (AVX2 ``vpmaddwd``): ``int16x16 x int16x16 -> int32x8``,
  ``out[i] = a[2i] b[2i] + a[2i+1] b[2i+1]``. Exact for all int16 inputs except the one pair
  ``(-2^15)^2 * 2`` (never reached: one operand is always a sign-extended int8 activation, so a
  product is at most ``2^15 * 2^7``, weights being at most 16 bits).
* ``pmaddubsw(u, s)`` (AVX2 ``vpmaddubsw``): ``uint8x32 x int8x32 -> int16x16`` pair sums,
  **saturating** in int16: exact only while ``|u0 s0 + u1 s1| <= 32767``, i.e. for unsigned operands
  below 2^7 against int8, which is why it is used only for weights of 4 bits or fewer
  (``u <= 15``: ``|pair| <= 2 * 15 * 128 = 3840``).
* ``vpdpbusd(c, u, s)`` (AVX-512 VNNI): ``c[i] + sum_{j<4} u[4i+j] s[4i+j]`` with ``u`` unsigned,
  ``int32x16 += uint8x64 x int8x64``, no intermediate saturation. LLVM 22 types the operands as
  ``(i32x16, i8x64, i8x64)`` (the stock TVM intrinsic passes i32x16 and fails to compile).
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

PMADDWD = "llvm.x86.avx2.pmadd.wd"
PMADDUBSW = "llvm.x86.avx2.pmadd.ub.sw"
VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"


def pmaddwd(a: tirx.PrimExpr, b: tirx.PrimExpr) -> tirx.PrimExpr:
    return T.call_llvm_pure_intrin("int32x8", PMADDWD, a, b)


def pmaddubsw(u: tirx.PrimExpr, s: tirx.PrimExpr) -> tirx.PrimExpr:
    return T.call_llvm_pure_intrin("int16x16", PMADDUBSW, u, s)


def vpdpbusd(c: tirx.PrimExpr, u: tirx.PrimExpr, s: tirx.PrimExpr) -> tirx.PrimExpr:
    return T.call_llvm_pure_intrin("int32x16", VPDPBUSD, c, u, s)


def broadcast_word(word: tirx.PrimExpr, lanes: int, dtype: str) -> tirx.PrimExpr:
    """A 32-bit ``word`` repeated ``lanes`` times, reinterpreted as ``dtype`` (e.g. a pair of int16)."""
    return T.reinterpret(dtype, T.broadcast(word, lanes))
