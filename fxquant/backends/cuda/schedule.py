"""CUDA schedules (``tvm.s_tir.Schedule``) of the :mod:`.kernels` PrimFuncs.

Must run before it: :func:`.kernels.primfunc`. Schedules change loop structure and memory
scopes only, never the integer math, so the llvm build of the unscheduled PrimFunc checks the
same algorithm the GPU runs (the dp4a intrinsic computes the same exact int32 sum of 4 products).

* GEMM (conv / linear): thread block tile ``BM x BO`` (``BO`` = 16/32/64 output channels, O
  zero-padded to it; ``BM`` = 64 rows, 16 for linear layers below batch 64), per-thread tile
  ``TM x 4`` (``TM = BM / 16``), reduction step ``K_TILE = 16``. Per step the
  block stages ``col[BM, 16]`` (the im2col gather, zero padding included, inlined into the load)
  and ``w[BO, 16]`` (int8: one ``char4`` load per thread; packed int4: the nibble unpack inlined
  into the load) in shared memory; each thread accumulates ``TM x 4`` int32 in registers with
  ``__dp4a`` (4 int8 products per instruction). The requantize epilogue (bias, shift, round half
  to even, saturation, ReLU, residual add) runs on the registers and writes int8 NCHW directly.
* Direct convolutions (grouped / depthwise, transposed) and ``matmul``: one thread per output element (the four
  output loops fused, 256 threads per block), the reduction over the group's channels and taps
  serial in the thread into an int32 register, the requantize epilogue on that register.
* ``softmax`` / ``layernorm``: one thread per row (the ``row`` block's two loops fused, 256 threads
  per block), the row's loops serial in the thread on int64 register scalars. Correctness first:
  rows of transformer widths (tens to a few thousand entries) are read 2-3 times from global
  memory (L1-cached); a warp-per-row reduction is the obvious next step.
* Every other kernel (one spatial block): all loops fused, 256 threads per block.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx

from fxquant.backends.cuda.intrinsics import DP4A
from fxquant.backends.cuda.plan import (K_TILE, DirectConvSpec, GemmSpec, KernelSpec, LayerNormSpec, MatmulSpec,
                                        SoftmaxSpec, out_tile)

THREADS = 256
THREAD_TILE_O = 4
THREADS_M = 16
"""Threads along M: a 64-row block gives each thread 4 rows, a 16-row block (small-batch linear) one."""
DP4A_K = 4


def _gemm(sch: s_tir.Schedule, spec: GemmSpec) -> None:
    bm, tm = spec.m_tile, spec.m_tile // THREADS_M
    bo = out_tile(spec.out_channels)
    threads_m, threads_o = bm // tm, bo // THREAD_TILE_O
    threads = threads_m * threads_o
    g = sch.get_sblock("gemm")
    m, o, k = sch.get_loops(g)
    mb, mt, mi = sch.split(m, [None, threads_m, tm])
    ob, ot, oi = sch.split(o, [None, threads_o, THREAD_TILE_O])
    ko, ki, k4 = sch.split(k, [None, K_TILE // DP4A_K, DP4A_K])
    sch.reorder(mb, ob, mt, ot, ko, ki, mi, oi, k4)
    sch.bind(sch.fuse(mb, ob), "blockIdx.x")
    tx = sch.fuse(mt, ot)
    sch.bind(tx, "threadIdx.x")
    col_s = sch.cache_read(g, 0, "shared")
    w_s = sch.cache_read(g, 1, "shared")
    for block, vector in ((col_s, 1), (w_s, 1 if spec.packed else DP4A_K)):
        sch.compute_at(block, ko)
        fused = sch.fuse(*sch.get_loops(block)[-2:])
        if vector > 1:
            _, t, v = sch.split(fused, [None, threads, vector])
            sch.vectorize(v)
        else:
            _, t = sch.split(fused, [None, threads])
        sch.bind(t, "threadIdx.x")
    sch.compute_inline("im2col")
    if spec.packed:
        sch.compute_inline("unpack")
    sch.reverse_compute_at("epilogue", tx)
    sch.set_scope(g, 0, "local")
    sch.decompose_reduction(g, ko)
    sch.tensorize(k4, DP4A)


def _reduction(sch: s_tir.Schedule, spatial: int) -> None:
    """An ``acc`` reduction block and its ``out`` epilogue: the ``spatial`` output loops fused and
    bound, the reduction serial in the thread, the accumulator in a register."""
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    bx, tx = sch.split(sch.fuse(*loops[:spatial]), [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    sch.reverse_compute_at("out", tx)
    sch.set_scope(acc, 0, "local")


def _per_row(sch: s_tir.Schedule) -> None:
    """The ``row`` block's (batch, row) loops fused and bound: one thread per row."""
    row = sch.get_sblock("row")
    bx, tx = sch.split(sch.fuse(*sch.get_loops(row)), [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def _elementwise(sch: s_tir.Schedule) -> None:
    (block,) = sch.get_child_blocks(sch.get_sblock("root"))
    bx, tx = sch.split(sch.fuse(*sch.get_loops(block)), [None, THREADS])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")


def schedule(func: tirx.PrimFunc, spec: KernelSpec) -> tirx.PrimFunc:
    """``func`` bound to CUDA blocks and threads (raises ``tvm`` errors on schedule failures)."""
    sch = s_tir.Schedule(tvm.IRModule({"main": func}))
    if isinstance(spec, GemmSpec):
        _gemm(sch, spec)
    elif isinstance(spec, DirectConvSpec):
        _reduction(sch, 4)
    elif isinstance(spec, MatmulSpec):
        _reduction(sch, len(spec.shape) + 1)
    elif isinstance(spec, (SoftmaxSpec, LayerNormSpec)):
        _per_row(sch)
    else:
        _elementwise(sch)
    return sch.mod["main"]
