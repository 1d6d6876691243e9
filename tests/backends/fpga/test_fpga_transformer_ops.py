"""The transformer kinds on the FPGA backend: g++ C-simulation bit-exact against IntegerGraph.run.

One project per kind (several outputs each, so one g++ build covers the variants), run on seeded
random integers plus the boundary samples of :func:`boundary_inputs` (every input at ``qmin``, at
``qmax``, at 0; token ids 0 and ``V - 1``). Boundaries per kind: ``matmul`` broadcast over heads,
rank 4, 16-bit operands at ``qmin`` (the accumulator's worst case), left and right requantize
shifts; ``embedding`` exact, requantized and saturating, 16-bit tables, a wide vocabulary;
``softmax`` without a mask, broadcast and full masks, all-masked rows, ``causal``, ``exp_bits`` 8 /
15 / 24, 16-bit scores (a 2841-entry table at E = 15), rows of 127 at E = 24 (the row sum at its
int32 limit) and ``K = 60`` (the widest reciprocal), outputs ``<8,7>``, ``<9,8>``, ``<16,15>``, ``<4,-1>``;
``layernorm`` rows of 1, 16, 64 and 1625 (16-bit inputs: the longest whose ``D < 2^62``), ``eps = 0`` on constant rows (``D = 0``),
16-bit gamma, int32 beta at its limits, ReLU, saturating outputs; ``slice`` / select on every axis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fxquant.backends.fpga import generate_project, run_csim
from fxquant.backends.fpga.codegen import random_inputs
from fxquant.errors import InputRangeError
from fxquant.fixed_point import LAYERNORM_FRAC_BITS, FixedPoint
from fxquant.integer_graph import IntegerGraph

from tests.conformance.zoo import GraphMaker

F = FixedPoint
N = 300


def boundary_inputs(graph: IntegerGraph, n: int = N, seed: int = 0) -> list[np.ndarray]:
    """Random integers for every input, with sample 0 at ``qmin`` (ids 0), 1 at ``qmax`` (ids ``V - 1``),
    2 at 0 and 3 alternating ``qmin`` / ``qmax`` (the widest row variance; ids alternate 0 / ``V - 1``)."""
    xs = random_inputs(graph, n, seed)
    vocab = {op.inputs[0]: op.weight.shape[0] for op in graph.ops if op.kind == "embedding"}
    for v, x in zip(graph.inputs, xs):
        lo, hi = (0, vocab[v.name] - 1) if v.name in vocab else (v.fmt.qmin, v.fmt.qmax)
        x[0], x[1], x[2] = lo, hi, 0
        x[3] = np.where(np.indices(v.shape).sum(axis=0) % 2 == 0, lo, hi)
    return xs


def _bit_exact(graph: IntegerGraph, tmp_path: Path, **options: object) -> dict:
    xs = boundary_inputs(graph)
    project = generate_project(graph, tmp_path, test_inputs=[x[:20] for x in xs], **options)
    report = run_csim(project, graph, xs)
    assert report["n"] == N and report["testbench_ok"] is True
    assert (report["mismatches"], report["mismatched_elements"], report["bit_exact"]) == (0, 0, True), report
    return report


def _matmul_graph() -> IntegerGraph:
    m = GraphMaker((2, 3, 4), F(8, 4), seed=1, name="a")
    m.input("b", (1, 4, 5), F(6, 2))  # broadcast over the head axis
    m.input("c", (2, 2, 3, 4), F(16, 12))
    m.input("d", (2, 1, 4, 3), F(16, 3))
    outs = [m.matmul("heads", "a", "b", F(8, 3)),  # right shift 3
            m.matmul("left", "a", "b", F(12, 9)),  # left shift 3, saturating
            m.matmul("rank4", "c", "d", F(16, 10)),  # 16 x 16 bits: 2^30 K at qmin
            m.matmul("rank4_tiny", "c", "d", F(2, -20))]
    m.ops[1].attrs["relu"] = True
    return m.graph(*outs)


def _embedding_graph() -> IntegerGraph:
    m = GraphMaker((7,), F(10, 0), seed=2, name="ids")  # ids <10,0>: V up to 512
    m.input("big", (5,), F(10, 0))
    m.input("pos", (3, 2), F(3, 0))
    outs = [m.embedding("wide", "big", 500, 3, F(16, 9)),  # exact, 16-bit ROM
            m.embedding("requant", "ids", 300, 4, F(8, 6), out_fmt=F(5, 2)),  # round half even
            m.embedding("saturate", "pos", 4, 5, F(8, 2), out_fmt=F(4, 3)),  # rank-2 ids, saturating
            m.embedding("left", "pos", 4, 2, F(6, 1), out_fmt=F(9, 4))]  # left shift
    return m.graph(*outs)


def _softmax_graph() -> IntegerGraph:
    m = GraphMaker((2, 4, 6), F(8, 4), seed=3, name="scores")
    m.input("pad", (1, 1, 6), F(2, 0))  # broadcast over heads and queries
    m.input("rows", (2, 4, 1), F(3, 0))  # masks whole rows (0 = masked)
    m.input("full", (2, 4, 6), F(4, 0))
    m.input("wide", (3, 40), F(16, 8))  # 16-bit scores: a 2841-entry table
    m.input("long", (2, 127), F(8, 4))  # 127 2^24 < 2^31: the widest row sum
    outs = [m.softmax("plain", "scores", F(8, 7)),
            m.softmax("padded", "scores", F(9, 8), mask="pad"),
            m.softmax("row_masked", "scores", F(8, 6), mask="rows", causal=True),
            m.softmax("full_mask", "scores", F(16, 15), mask="full"),
            m.softmax("coarse", "scores", F(4, -1), causal=True),
            m.softmax("e15_wide", "wide", F(8, 7)),
            m.softmax("e8", "wide", F(8, 7)),
            m.softmax("e24", "scores", F(16, 15)),
            m.softmax("sum_limit", "long", F(8, 7)),
            m.softmax("k60", "long", F(16, 32))]  # K = 24 + 32 + 4 = 60: the widest reciprocal
    for i, e in ((6, 8), (7, 24), (8, 24), (9, 24)):
        m.ops[i].attrs["exp_bits"] = e
    return m.graph(*outs)


def _layernorm_graph() -> IntegerGraph:
    m = GraphMaker((3, 16), F(8, 3), seed=4, name="x")
    m.input("one", (4, 1), F(6, 2))
    m.input("wide", (2, 64), F(16, 10))
    m.input("limit", (1, 1625), F(16, 10))  # the longest 16-bit row whose D stays below 2^62
    outs = [m.layernorm("ln_limit", "limit", F(16, 12), F(16, 12)),
            m.layernorm("ln", "x", F(8, 6), F(8, 4)),
            m.layernorm("ln_eps0", "x", F(16, 14), F(16, 12), eps=0.0),  # constant rows (samples 0-2): D = 0
            m.layernorm("ln_one", "one", F(5, 3), F(6, 2)),  # n = 1: x_hat = 0, the output is beta
            m.layernorm("ln_wide", "wide", F(8, 6), F(12, 8), eps=1e-2, bias=False),
            m.layernorm("ln_sat", "wide", F(8, 2), F(4, 3))]  # saturating
    ln_relu = next(op for op in m.ops if op.name == "ln")
    ln_relu.attrs["relu"] = True
    beta = next(op for op in m.ops if op.name == "ln_eps0")
    beta.bias = np.resize(np.array([2**31 - 1, -2**31, 0, 12345], np.int64), 16)  # int32 at its limits
    return m.graph(*outs)


def _slice_graph() -> IntegerGraph:
    m = GraphMaker((3, 4, 5, 6), F(7, 2), seed=5, name="x")
    outs = [m.slice("heads", "x", 1, 1, 3), m.slice("rows", "x", 2, 0, 4, 3), m.slice("cols", "x", 3, 1, 5, 2),
            m.slice("feat", "x", 4, 5, 6), m.select("cls", "x", 2, 0), m.select("last", "x", 4, 5),
            m.select("cls_of_slice", m.slice("tail", "x", 3, 2, 5), 1, 2)]
    return m.graph(*outs)


@pytest.mark.parametrize("make", [_matmul_graph, _embedding_graph, _softmax_graph, _layernorm_graph, _slice_graph],
                         ids=["matmul", "embedding", "softmax", "layernorm", "slice"])
def test_transformer_kind_csim_is_bit_exact(make, tmp_path: Path) -> None:
    graph = make()
    from fxquant.backends.fpga.target import FpgaTarget

    assert FpgaTarget().check(graph) == []
    _bit_exact(graph, tmp_path)


def test_layernorm_boundaries_are_exercised() -> None:
    """The boundary samples reach what the layernorm case claims: a constant row with eps = 0 (D = 0)
    and rows of one entry both give exactly beta (x - mean = 0), beta at the int32 limits included."""
    graph = _layernorm_graph()
    xs = boundary_inputs(graph)
    ref = graph.run(*xs)
    ops = {op.name: op for op in graph.ops}
    assert ops["ln_eps0"].attrs["eps"] == 0
    # beta on FL 14 + 16 to <16,12>: a right shift by 18, round half even (np.round), saturate
    beta = np.clip(np.round(ops["ln_eps0"].bias / 2.0 ** (14 + LAYERNORM_FRAC_BITS - 12)), -2**15, 2**15 - 1)
    for sample in range(3):  # qmin, qmax, 0: constant rows
        assert np.array_equal(ref["ln_eps0"][sample], np.broadcast_to(beta, (3, 16)))
    one = np.clip(np.round(ops["ln_one"].bias / 2.0 ** (3 + LAYERNORM_FRAC_BITS - 2)), -32, 31)
    assert np.array_equal(ref["ln_one"], np.broadcast_to(one, ref["ln_one"].shape))


def test_stream_io_with_several_inputs_and_outputs(tmp_path: Path) -> None:
    """An attention head with a padding mask as a second input and two outputs, through the stream interface."""
    m = GraphMaker((4, 8), F(8, 4), seed=6)
    mask = m.input("mask", (1, 4), F(2, 0))
    q = m.dense("q", "input", 4, F(6, 5), F(8, 4))
    k = m.dense("k", "input", 4, F(6, 5), F(8, 4))
    p = m.softmax("softmax", m.matmul("scores", q, m.transpose("k_t", k, (1, 0)), F(8, 3)), F(8, 7), mask=mask)
    graph = m.graph(m.matmul("context", p, q, F(8, 4)), p)
    report = _bit_exact(graph, tmp_path, io="stream", reuse=2)
    top = (tmp_path / "firmware" / "fxq_model.cpp").read_text()
    assert "hls::stream<input1_t> &in1_stream" in top and "hls::stream<result1_t> &out1_stream" in top
    assert report["bit_exact"]


def test_token_ids_are_checked_never_clipped(tmp_path: Path) -> None:
    """The placed artifact refuses an id outside [0, V) (the reference does too), and splits its outputs."""
    from fxquant.backends.base import export
    from fxquant.backends.fpga.target import FpgaTarget

    graph = _embedding_graph()
    xs = boundary_inputs(graph, n=12)
    out = tmp_path / "fpga"
    export(FpgaTarget(), graph, out, [x.astype(np.float64) for x in xs])
    got = FpgaTarget().run(out, xs)
    ref = graph.run(*xs)
    assert [g.shape for g in got] == [ref[o].shape for o in graph.outputs]
    assert all(np.array_equal(g, ref[o]) for g, o in zip(got, graph.outputs))
    bad = [x.copy() for x in xs]
    bad[1][3, 1] = 500
    with pytest.raises(InputRangeError, match=r"input 'big': token id 500 outside \[0, 500\)"):
        FpgaTarget().run(out, bad)
    with pytest.raises(InputRangeError, match="token id 500 outside"):
        graph.run(*bad)
    with pytest.raises(InputRangeError, match=r"'wide' \(embedding\): token id 500 outside \[0, 500\)"):
        run_csim(out, graph, bad)
