"""The dp4a tensor intrinsic: ``C[0] += sum_{i<4} int32(A[i]) * int32(B[i])`` via ``__dp4a``.

TVM ships the same intrinsic (``DP4A_S8S8S32_INTRIN`` in ``tvm.s_tir.tensor_intrin``), but
importing that package parses every target's intrinsics (~100 s on the 2-core build hosts), so
this module registers only the one the GEMM schedule tensorizes with: int8 x int8 operands in
shared memory (4 contiguous bytes, read as one 32-bit word), an int32 accumulator in registers.
``__dp4a`` computes the exact int32 sum (no saturation), so tensorizing never changes a result.
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

DP4A = "fxquant_dp4a_s8s8s32"


@T.prim_func(s_tir=True)
def _desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1, align=4, scope="shared")
    B = T.match_buffer(b, (4,), "int8", offset_factor=1, align=4, scope="shared")
    C = T.match_buffer(c, (1,), "int32", offset_factor=1, align=4, scope="local")
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        for i in range(4):
            with T.sblock("update"):
                vi = T.axis.remap("R", [i])
                C[0] = C[0] + T.Cast("int32", A[vi]) * T.Cast("int32", B[vi])


@T.prim_func(s_tir=True)
def _impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    A = T.match_buffer(a, (4,), "int8", offset_factor=1, align=4, scope="shared")
    B = T.match_buffer(b, (4,), "int8", offset_factor=1, align=4, scope="shared")
    C = T.match_buffer(c, (1,), "int32", offset_factor=1, align=4, scope="local")
    with T.sblock("root"):
        T.reads(C[0], A[0:4], B[0:4])
        T.writes(C[0])
        C[0] = C[0] + T.call_pure_extern("__dp4a", A.vload([0], "int8x4"), B.vload([0], "int8x4"), T.int32(0),
                                         dtype="int32")


TensorIntrin.register(DP4A, _desc, _impl, override=True)
