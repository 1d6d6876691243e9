"""The transformer kinds (issue 14) in the ONNX exports: bit-exact in onnxruntime at the boundaries.

The conformance suite runs the zoo's transformer cases on both targets; these tests pin what those
small cases do not reach, each against an oracle the export does not share: ``IntegerGraph.run``
(the numpy reference) for whole ops, Python's exact integers (``math.isqrt``, ``Fraction``
rounding, ``int.bit_length``) for the int64 building blocks of
:mod:`fxquant.export.onnx_integer`. Boundaries: ids 0 and ``V - 1`` (and refused ids),
all-masked and single-key softmax rows, saturated scores beyond the exponential table, constant
layernorm rows, the largest legal variance, 16-bit rows, the square root at every power-of-two
and perfect-square edge up to ``2^62``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from tests.conformance.zoo import CASES, TRANSFORMER_CASES, F, GraphMaker

from fxquant.backends.registry import get_target
from fxquant.errors import UnsupportedOpError
from fxquant.export.limits import FLOAT32_EXACT_BOUND, qdq_problems
from fxquant.export.onnx_builder import GraphBuilder
from fxquant.export.onnx_integer import IntegerOps
from fxquant.export.onnx_qdq import check_artifact, to_fp32, to_qdq
from fxquant.export.qonnx import lower_quant, to_qonnx
from fxquant.export.verify import input_feed, output_integers, session
from fxquant.fixed_point import layernorm_eps
from fxquant.integer_graph import IntegerGraph
from fxquant.legality import layernorm_d_bound

OPSET = 21


# ------------------------------------------------------------------------------------ helpers
def run_model(model: onnx.ModelProto, graph: IntegerGraph, ints: list[np.ndarray], flavour: str = "qdq") -> dict:
    """Output integers of ``model`` in onnxruntime on input integers ``ints`` (fed as the model declares)."""
    runnable = lower_quant(model) if flavour == "qonnx" else model
    feed = {i.name: input_feed(i, k, graph.values[i.name].fmt.frac_bits) for i, k in zip(model.graph.input, ints)}
    outs = session(runnable).run(graph.outputs, feed)
    return {n: output_integers(o, graph.values[n].fmt.frac_bits) for n, o in zip(graph.outputs, outs)}


def assert_exact(graph: IntegerGraph, ints: list[np.ndarray], flavour: str = "qdq") -> onnx.ModelProto:
    """The flavour's model passes the checker and equals ``IntegerGraph.run`` integer for integer."""
    model = to_qdq(graph, opset=OPSET) if flavour == "qdq" else to_qonnx(graph)
    check_artifact(model, flavour)
    want = graph.run(*ints)
    got = run_model(model, graph, ints, flavour)
    for name in graph.outputs:
        assert np.asarray(got[name]).dtype.kind == "i", f"{name}: off the output grid"
        bad = np.argwhere(got[name] != want[name])
        assert bad.size == 0, (f"{flavour} {name}: {len(bad)} of {want[name].size} differ, first at {tuple(bad[0])}: "
                               f"expected {want[name][tuple(bad[0])]}, got {got[name][tuple(bad[0])]}")
    return model


def input_types(model: onnx.ModelProto) -> dict[str, int]:
    return {i.name: i.type.tensor_type.elem_type for i in model.graph.input}


def run_block(build, xs: np.ndarray) -> np.ndarray:
    """Run one :class:`IntegerOps` building block on int64 ``xs`` alone in onnxruntime."""
    b = GraphBuilder()
    b.reserve("x")
    y = build(IntegerOps(b, OPSET), "x")
    b.node("Identity", [y], "y_out", output=b.reserve("y"))
    g = helper.make_graph(b.nodes, "block", [helper.make_tensor_value_info("x", TensorProto.INT64, ["n"])],
                          [helper.make_tensor_value_info("y", TensorProto.INT64, ["n"])], b.initializers)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model, full_check=True)
    return session(model).run(["y"], {"x": np.asarray(xs, np.int64)})[0]


# ------------------------------------------------------------------------------------ int64 building blocks
def _square_edges() -> list[int]:
    xs = {0, 1, 2, 3, 4, 5, (1 << 62) - 1, 1 << 62}
    for m in (2, 3, 1 << 15, (1 << 26) + 1, 3037000499, (1 << 31) - 1, 1 << 31):  # 3037000499 = isqrt(2^63 - 1)
        xs |= {m * m - 1, m * m, m * m + 1, (m + 1) * (m + 1) - 1}
    for p in range(63):
        xs |= {(1 << p) - 1, 1 << p, (1 << p) + 1}
    return sorted(x for x in xs if 0 <= x <= 1 << 62)


def test_isqrt_equals_math_isqrt_at_every_edge_up_to_2_62() -> None:
    """Perfect squares and their neighbours (where a float64 Sqrt rounds across an integer) and every
    power of two: the float64 guess plus one correction each way is ``math.isqrt``."""
    xs = np.array(_square_edges(), np.int64)
    got = run_block(lambda ops, x: ops.isqrt(x, "s"), xs)
    assert got.tolist() == [math.isqrt(int(x)) for x in xs]


def test_isqrt_needs_its_correction_on_large_squares_minus_one() -> None:
    """The float64 square root alone is wrong there (so the correction step is exercised)."""
    m = np.arange((1 << 31) - 2000, (1 << 31), dtype=np.int64)
    xs = m * m - 1
    assert np.any(np.floor(np.sqrt(xs.astype(np.float64))).astype(np.int64) != m - 1)
    assert run_block(lambda ops, x: ops.isqrt(x, "s"), xs).tolist() == [math.isqrt(int(x)) for x in xs]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 1 << 62), min_size=1, max_size=64))
def test_isqrt_property(xs: list[int]) -> None:
    assert run_block(lambda ops, x: ops.isqrt(x, "s"), np.array(xs, np.int64)).tolist() == [math.isqrt(x) for x in xs]


def test_bit_length_at_powers_of_two() -> None:
    xs = sorted({0, *((1 << p) - 1 for p in range(1, 63)), *(1 << p for p in range(63)), (1 << 63) - 1})
    assert run_block(lambda ops, x: ops.bit_length(x, "b"), np.array(xs, np.int64)).tolist() == [
        int(x).bit_length() for x in xs]


def _round_half_even(k: int, shift: int) -> int:
    return round(Fraction(k) * Fraction(2) ** shift)  # Python's round: ties to even


@settings(max_examples=40, deadline=None)
@given(st.integers(-70, 20), st.lists(st.integers(-(1 << 61), 1 << 61), min_size=1, max_size=32))
def test_shift_round_half_even_property(shift: int, ks: list[int]) -> None:
    """Right shifts round half to even (negative ties too); left shifts are exact below int64's reach."""
    if shift > 0:
        ks = [max(-(1 << (62 - shift)), min(k, 1 << (62 - shift))) for k in ks]
    got = run_block(lambda ops, x: ops.shift_round_half_even(x, shift, "r"), np.array(ks, np.int64))
    assert got.tolist() == [_round_half_even(k, shift) for k in ks]


@pytest.mark.parametrize("s", [1, 2, 5, 34, 61, 62])
def test_shift_ties_and_neighbours(s: int) -> None:
    half = 1 << (s - 1)
    qs = (-3, -2, -1, 0, 1, 2, 3) if s < 61 else (-1, 0, 1)
    ks = [q * (1 << s) + r for q in qs for r in (half - 1, half, half + 1)]
    got = run_block(lambda ops, x: ops.shift_round_half_even(x, -s, "r"), np.array(ks, np.int64))
    assert got.tolist() == [_round_half_even(k, -s) for k in ks]


# ------------------------------------------------------------------------------------ embedding
def _embedding_graph(vocab: int, ids_fmt, w_fmt, out_fmt=None) -> IntegerGraph:
    m = GraphMaker((5,), ids_fmt, seed=7, name="ids")
    return m.graph(m.embedding("emb", "ids", vocab, 6, w_fmt, out_fmt=out_fmt))


@pytest.mark.parametrize(("vocab", "ids_fmt", "w_fmt", "out_fmt"), [
    (20, F(6, 0), F(8, 6), None),          # exact gather, uint8 storage
    (20, F(6, 0), F(8, 6), F(6, 3)),       # requantized rows (round half even, saturation)
    (512, F(10, 0), F(12, 9), F(16, 14)),  # 16-bit table rows, 10-bit ids up to 511, a left shift
    (7, F(4, 0), F(3, 1), F(8, -2)),       # narrow table, FL < 0 output
])
def test_embedding_exact_at_ids_0_and_v_minus_1(vocab, ids_fmt, w_fmt, out_fmt) -> None:
    graph = _embedding_graph(vocab, ids_fmt, w_fmt, out_fmt)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(6, 5))
    ids[0], ids[1], ids[2] = 0, vocab - 1, [0, vocab - 1, 0, vocab - 1, 1]
    for flavour in ("qdq", "qonnx"):
        model = assert_exact(graph, [ids], flavour)
        assert input_types(model) == {"ids": TensorProto.INT64}, flavour


@pytest.mark.parametrize("flavour", ["qdq", "qonnx"])
@pytest.mark.parametrize("bad", [-1, 20])
def test_embedding_ids_outside_the_table_fail_in_onnxruntime(flavour: str, bad: int) -> None:
    """ONNX Gather would wrap -1 to the last row: the export maps negatives to V so both fail loudly."""
    graph = _embedding_graph(20, F(6, 0), F(8, 6))
    model = to_qdq(graph) if flavour == "qdq" else to_qonnx(graph)
    ids = np.zeros((1, 5), np.int64)
    ids[0, 3] = bad
    with pytest.raises(Exception, match="out of data bounds"):
        run_model(model, graph, [ids], flavour)


def test_ids_input_also_read_as_a_value_is_saturated_like_the_reference() -> None:
    """An int64 ids input that another op reads too gets its stored form (saturated to its format)."""
    m = GraphMaker((4,), F(5, 0), seed=3, name="ids")
    e = m.embedding("emb", "ids", 16, 4, F(8, 6))
    r = m.requantize("ids_again", "ids", F(8, 2))
    graph = m.graph(e, r)
    ids = np.array([[0, 15, 3, 9], [15, 15, 0, 1]])
    for flavour in ("qdq", "qonnx"):
        assert_exact(graph, [ids], flavour)


# ------------------------------------------------------------------------------------ slice
@pytest.mark.parametrize("fmt", [F(7, 3), F(12, 5)])
def test_slice_and_select_exact(fmt) -> None:
    m = GraphMaker((5, 6), fmt, seed=9)
    cls = m.select("cls", "input", 1, 0)
    last = m.select("last_feature", "input", 2, 5)
    strided = m.slice("strided", "input", 1, 1, 5, 3)
    tail = m.slice("tail", strided, 2, 2, 6)
    graph = m.graph(cls, last, tail)
    ints = [np.random.default_rng(1).integers(fmt.qmin, fmt.qmax + 1, size=(4, 5, 6))]
    for flavour in ("qdq", "qonnx"):
        assert_exact(graph, ints, flavour)


# ------------------------------------------------------------------------------------ softmax
def _softmax_graph(shape, in_fmt, out_fmt, *, mask_shape=None, causal=False, exp_bits=None) -> IntegerGraph:
    m = GraphMaker(shape, in_fmt, seed=11, name="scores")
    mask = m.input("mask", mask_shape, F(2, 0)) if mask_shape else None
    s = m.softmax("softmax", "scores", out_fmt, mask=mask, causal=causal)
    if exp_bits is not None:
        m.ops[-1].attrs["exp_bits"] = exp_bits
    return m.graph(s)


def _boundary_scores(shape, fmt, n=8, seed=0) -> np.ndarray:
    """Random rows plus: all qmin, all qmax, one qmax among qmin (beyond the table), equal pairs."""
    rng = np.random.default_rng(seed)
    k = rng.integers(fmt.qmin, fmt.qmax + 1, size=(n, *shape))
    k[0], k[1] = fmt.qmin, fmt.qmax
    k[2] = fmt.qmin
    k[2, ..., 0] = fmt.qmax
    k[3, ..., ::2] = k[3, ..., 1::2] if shape[-1] % 2 == 0 else k[3, ..., ::2]
    return k


@pytest.mark.parametrize(("in_fmt", "out_fmt", "exp_bits"), [
    (F(8, 3), F(8, 7), None),
    (F(8, 4), F(8, 8), None),     # FL_out > BW - 2: probability 1.0 saturates to qmax
    (F(12, 6), F(16, 15), None),  # 16-bit output, a 12-bit score grid (table of 710 entries)
    (F(16, 8), F(9, 8), 20),      # 16-bit scores, table of 2^12 - ... entries, E = 20
    (F(6, 1), F(4, 3), 8),        # narrow everything, E = 8
    (F(8, 3), F(16, 30), 24),     # K = 58 >= 53: the int64 requantization instead of the float64 one
    (F(8, 3), F(16, 18), 24),     # K = 46: tiny probabilities, saturation of the large ones
])
def test_softmax_exact_at_the_table_edges(in_fmt, out_fmt, exp_bits) -> None:
    graph = _softmax_graph((3, 10), in_fmt, out_fmt, exp_bits=exp_bits)
    assert_exact(graph, [_boundary_scores((3, 10), in_fmt)])


def test_softmax_masks_all_masked_rows_and_single_keys() -> None:
    """Mask (1, L) broadcast over queries: an all-zero mask row gives 0s, a single kept key qmax
    (when 1.0 fits) or its saturation; nonzero of any sign keeps."""
    graph = _softmax_graph((4, 6), F(8, 3), F(8, 6), mask_shape=(1, 6))
    scores = _boundary_scores((4, 6), F(8, 3), n=6)
    mask = np.ones((6, 1, 6), np.int64)
    mask[0] = 0                       # everything masked
    mask[1] = 0
    mask[1, 0, 2] = 1                 # one key kept
    mask[2, 0, ::2] = -2              # negative = nonzero = keep
    mask[3, 0, 0] = 0
    model = assert_exact(graph, [scores, mask])
    assert input_types(model) == {"scores": TensorProto.FLOAT, "mask": TensorProto.INT64}
    out = graph.run(scores, mask)["softmax"]
    assert np.all(out[0] == 0) and np.all(out[1][..., [0, 1, 3, 4, 5]] == 0)  # the oracle's own boundary facts


def test_causal_softmax_with_a_mask_over_heads() -> None:
    """(H, S, S) scores, causal, a (1, 1, S) padding mask: query 0 with key 0 masked is an all-masked row."""
    graph = _softmax_graph((2, 5, 5), F(9, 4), F(9, 8), mask_shape=(1, 1, 5), causal=True)
    scores = _boundary_scores((2, 5, 5), F(9, 4), n=5)
    mask = np.ones((5, 1, 1, 5), np.int64)
    mask[0, ..., 0] = 0
    mask[1] = 0
    mask[2, ..., 3:] = 0
    assert_exact(graph, [scores, mask])
    assert np.all(graph.run(scores, mask)["softmax"][0, :, 0] == 0)


def test_causal_softmax_without_mask_and_full_mask_shape() -> None:
    assert_exact(_softmax_graph((4, 4), F(8, 2), F(8, 7), causal=True), [_boundary_scores((4, 4), F(8, 2))])
    graph = _softmax_graph((3, 4), F(8, 2), F(8, 7), mask_shape=(3, 4))
    mask = np.random.default_rng(2).integers(-1, 2, size=(8, 3, 4))
    assert_exact(graph, [_boundary_scores((3, 4), F(8, 2)), mask])


def test_long_softmax_rows() -> None:
    """Rows of 512 at E = 15: the row sum reaches 2^24 (int32 in the reference, int64 here)."""
    graph = _softmax_graph((2, 512), F(8, 2), F(12, 11))
    assert_exact(graph, [_boundary_scores((2, 512), F(8, 2), n=4)])


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 16), st.integers(-2, 10), st.integers(2, 16), st.integers(0, 14), st.integers(1, 24),
       st.integers(1, 9), st.booleans(), st.integers(0, 2**31))
def test_softmax_property(in_bits, in_fl, out_bits, out_fl, exp_bits, length, masked, seed) -> None:
    in_fmt, out_fmt = F(in_bits, min(in_fl, in_bits + 2)), F(out_bits, out_fl)
    graph = _softmax_graph((2, length), in_fmt, out_fmt, mask_shape=(1, length) if masked else None,
                           exp_bits=exp_bits)
    if get_target("onnx-qdq").check(graph):  # beyond the legal table or reciprocal: refused, as the reference's bounds
        return
    rng = np.random.default_rng(seed)
    ints = [_boundary_scores((2, length), in_fmt, n=5, seed=seed)]
    if masked:
        ints.append(rng.integers(0, 2, size=(5, 1, length)))
    assert_exact(graph, ints)


# ------------------------------------------------------------------------------------ layernorm
def _layernorm_graph(n, in_fmt, w_fmt, out_fmt, *, eps=1e-5, bias=True, relu=False, rows=3) -> IntegerGraph:
    m = GraphMaker((rows, n), in_fmt, seed=13)
    h = m.layernorm("ln", "input", w_fmt, out_fmt, eps=eps, bias=bias)
    m.ops[-1].attrs["relu"] = relu
    return m.graph(h)


def _layernorm_rows(n: int, fmt, count: int, seed: int = 0) -> np.ndarray:
    """Constant rows (qmin, qmax, 0), alternating extremes (the largest variance), one outlier, random."""
    rng = np.random.default_rng(seed)
    k = rng.integers(fmt.qmin, fmt.qmax + 1, size=(count, 3, n))
    k[0, 0], k[0, 1], k[0, 2] = fmt.qmin, fmt.qmax, 0
    k[1, 0, ::2], k[1, 0, 1::2] = fmt.qmin, fmt.qmax
    k[1, 1], k[1, 1, 0] = fmt.qmin, fmt.qmax
    k[1, 2], k[1, 2, -1] = 0, 1
    return k


@pytest.mark.parametrize(("n", "in_fmt", "w_fmt", "out_fmt", "eps", "bias", "relu"), [
    (16, F(8, 3), F(8, 6), F(8, 4), 1e-5, True, False),
    (16, F(16, 10), F(7, 5), F(12, 8), 1e-2, False, False),  # eps dominating small variances
    (64, F(8, 4), F(8, 6), F(8, 5), 0.0, True, True),        # eps 0 (constant rows: D = 0), fused ReLU
    (7, F(12, 4), F(16, 12), F(16, 15), 1e-5, True, False),  # odd row, 16-bit gamma and output
    (5, F(4, 0), F(3, 1), F(6, -1), 1e-5, True, False),      # a left-shifting FL < 0 output
])
def test_layernorm_exact_on_constant_and_extreme_rows(n, in_fmt, w_fmt, out_fmt, eps, bias, relu) -> None:
    graph = _layernorm_graph(n, in_fmt, w_fmt, out_fmt, eps=eps, bias=bias, relu=relu)
    assert_exact(graph, [_layernorm_rows(n, in_fmt, 6)])


def test_layernorm_constant_row_is_beta() -> None:
    """The reference's own boundary fact: a constant row normalizes to 0, so the output is beta requantized."""
    graph = _layernorm_graph(16, F(8, 3), F(8, 6), F(8, 4))
    ints = [_layernorm_rows(16, F(8, 3), 2)]
    assert_exact(graph, ints)
    out = graph.run(*ints)["ln"][0]
    assert np.all(out == out[0])


def test_layernorm_at_the_largest_legal_variance() -> None:
    """16-bit rows as long as legality allows (``D`` just below 2^62), alternating qmin / qmax."""
    fmt = F(16, 8)
    n = max(k for k in range(2, 2000, 2) if layernorm_d_bound(k, 16, layernorm_eps(1e-5, k, fmt)) < 1 << 62)
    graph = _layernorm_graph(n, fmt, F(8, 6), F(16, 12), rows=2)
    assert not get_target("onnx-qdq").check(graph)
    assert get_target("onnx-qdq").check(_layernorm_graph(n + 2, fmt, F(8, 6), F(16, 12), rows=2))  # one step beyond
    k = np.empty((3, 2, n), np.int64)
    k[..., ::2], k[..., 1::2] = fmt.qmin, fmt.qmax
    k[2, 1] = np.random.default_rng(4).integers(fmt.qmin, fmt.qmax + 1, size=n)
    k[1, 1, 0] = 0
    d = n * n * n * ((1 << 16) - 1) ** 2 // 4
    assert d > 1 << 61  # the variance sum is within a factor 2 of the int64 budget
    assert_exact(graph, [k])


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 40), st.integers(2, 16), st.integers(-3, 12), st.integers(2, 16), st.integers(0, 12),
       st.integers(2, 16), st.integers(-2, 14), st.booleans(), st.integers(0, 2**31))
def test_layernorm_property(n, in_bits, in_fl, w_bits, w_fl, out_bits, out_fl, bias, seed) -> None:
    in_fmt = F(in_bits, in_fl)
    graph = _layernorm_graph(n, in_fmt, F(w_bits, w_fl), F(out_bits, out_fl), bias=bias, eps=1e-5)
    if get_target("onnx-qdq").check(graph):
        return
    assert_exact(graph, [_layernorm_rows(n, in_fmt, 4, seed)])


# ------------------------------------------------------------------------------------ matmul and N-D linear
def test_activation_matmul_beyond_float32_runs_in_int64() -> None:
    """16-bit Q K^T over 64 features: |acc| up to 2^36, beyond float32's 2^24: int64 MatMul, exact,
    and not listed as a float32 risk; (H, S, d) @ (1, d, S) broadcasting."""
    m = GraphMaker((2, 4, 64), F(16, 8), seed=17, name="q")
    m.input("k", (1, 64, 4), F(16, 8))
    s = m.matmul("scores", "q", "k", F(16, 2))
    graph = m.graph(s)
    assert graph.accumulator_bound(graph.ops[0]) > FLOAT32_EXACT_BOUND
    fmt = F(16, 8)
    rng = np.random.default_rng(5)
    q, k = rng.integers(fmt.qmin, fmt.qmax + 1, size=(4, 2, 4, 64)), rng.integers(fmt.qmin, fmt.qmax + 1,
                                                                                  size=(4, 1, 64, 4))
    q[0], k[0] = fmt.qmin, fmt.qmin  # the worst case: 64 * 2^30
    model = assert_exact(graph, [q, k])
    props = {p.key: p.value for p in model.metadata_props}
    assert props["fxquant.float32_risk_ops"] == "[]"


@pytest.mark.parametrize(("in_fmt", "w_fmt"), [(F(8, 4), F(6, 5)), (F(8, 3), F(16, 12)), (F(12, 6), F(8, 6))])
def test_linear_on_rank_3_and_4_inputs(in_fmt, w_fmt) -> None:
    """Projections of (S, D) and (H, S, D) values; 8-bit x 16-bit weights take the MatMulInteger path."""
    m = GraphMaker((3, 4, 16), in_fmt, seed=19)
    h = m.dense("proj", "input", 5, w_fmt, F(10, 2), relu=True)
    flat = m.dense("per_token", m.select("head0", "input", 1, 0), 3, w_fmt, F(8, 1))
    graph = m.graph(h, flat)
    ints = [np.random.default_rng(6).integers(in_fmt.qmin, in_fmt.qmax + 1, size=(5, 3, 4, 16))]
    ints[0][0] = in_fmt.qmin
    for flavour in ("qdq", "qonnx"):
        if flavour == "qonnx" and get_target("qonnx").check(graph):
            continue  # a bias beyond float32 (QONNX's own rule)
        assert_exact(graph, ints, flavour)


# ------------------------------------------------------------------------------------ targets
@pytest.mark.parametrize("case", TRANSFORMER_CASES)
def test_zoo_inputs_are_integer_typed_for_ids_and_masks(case: str) -> None:
    graph, _ = CASES[case].build()
    model = to_qdq(graph)
    ids = {op.inputs[0] for op in graph.ops if op.kind == "embedding"}
    masks = {op.inputs[1] for op in graph.ops if op.kind == "softmax" and len(op.inputs) > 1}
    want = {v.name: TensorProto.INT64 if v.name in ids | masks else TensorProto.FLOAT for v in graph.inputs}
    assert input_types(model) == want
    assert not {n.op_type for n in model.graph.node} & {"Softmax", "LayerNormalization", "Exp", "ReduceMean"}


def test_qonnx_refuses_softmax_and_layernorm_with_one_reason_each() -> None:
    graph, _ = CASES["transformer_block"].build()
    problems = get_target("qonnx").check(graph)
    assert sorted((p.layer, p.kind) for p in problems) == [("ln1", "layernorm"), ("ln2", "layernorm"),
                                                           ("softmax", "softmax")]
    assert all(p.reason.startswith("QONNX has no exact integer") and "\n" not in p.reason for p in problems)
    with pytest.raises(UnsupportedOpError, match="QONNX has no exact integer softmax"):
        to_qonnx(graph)


def test_illegal_transformer_ops_refused_by_the_exporter_itself() -> None:
    """``to_qdq`` called directly applies the shared bounds (a 16-bit score grid whose table is too big)."""
    graph = _softmax_graph((2, 8), F(16, 11), F(8, 7))
    assert any("exponential table" in p.reason for p in qdq_problems(graph))
    with pytest.raises(UnsupportedOpError, match="exponential table"):
        to_qdq(graph)
    problems = get_target("onnx-qdq").check(graph)
    assert len(problems) == len(set(problems)) == 1


# ------------------------------------------------------------------------------------ the FP32 baseline
def _fp32_outputs(graph: IntegerGraph, ints: list[np.ndarray]) -> dict[str, np.ndarray]:
    model = to_fp32(graph)
    check_artifact(model, "fp32")
    feed = {i.name: (np.asarray(k, np.int64) if i.type.tensor_type.elem_type == TensorProto.INT64
                     else np.ldexp(np.asarray(k, np.float64), -graph.values[i.name].fmt.frac_bits).astype(np.float32))
            for i, k in zip(model.graph.input, ints)}
    return dict(zip(graph.outputs, session(model).run(graph.outputs, feed)))


def test_fp32_baseline_softmax_is_torch_softmax_with_masks() -> None:
    import torch

    graph = _softmax_graph((2, 5, 5), F(9, 4), F(9, 8), mask_shape=(1, 1, 5), causal=True)
    scores = _boundary_scores((2, 5, 5), F(9, 4), n=5)
    mask = np.ones((5, 1, 1, 5), np.int64)
    mask[0, ..., 0], mask[1] = 0, 0
    got = _fp32_outputs(graph, [scores, mask])["softmax"]
    x = torch.tensor(np.ldexp(scores.astype(np.float64), -4))
    keep = torch.tensor(mask != 0) & torch.ones(5, 5, dtype=torch.bool).tril()
    want = torch.softmax(x.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    assert np.all(got[1] == 0)


def test_fp32_baseline_layernorm_and_embedding_are_torch() -> None:
    import torch

    graph = _layernorm_graph(16, F(8, 3), F(8, 6), F(8, 4), eps=1e-2)
    op = graph.ops[0]
    k = _layernorm_rows(16, F(8, 3), 4)
    got = _fp32_outputs(graph, [k])["ln"]
    want = torch.nn.functional.layer_norm(torch.tensor(np.ldexp(k.astype(np.float64), -3)), (16,),
                                          torch.tensor(np.ldexp(op.weight.astype(np.float64), -6)),
                                          torch.tensor(np.ldexp(op.bias.astype(np.float64), -22)), eps=1e-2)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    graph = _embedding_graph(20, F(6, 0), F(8, 6), F(6, 3))
    ids = np.array([[0, 19, 3, 4, 5]])
    table = torch.tensor(np.ldexp(graph.ops[0].weight.astype(np.float64), -6))
    np.testing.assert_array_equal(_fp32_outputs(graph, [ids])["emb"], torch.nn.functional.embedding(
        torch.tensor(ids), table).numpy())


# ------------------------------------------------------------------------------------ other consumers, opsets
@pytest.mark.parametrize("case", ["embedding_lookup", "slice_cls"])
def test_qonnx_package_executes_embedding_and_slice_bit_exactly(case: str) -> None:
    """The qonnx package's own executor (its Quant semantics, not our lowering) on int64 ids."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.util.cleanup import cleanup_model

    graph, inputs = CASES[case].build()
    ints = [k[:4] for k in graph.quantize_inputs(*inputs)]
    proto = to_qonnx(graph)
    for vi in [*proto.graph.input, *proto.graph.output]:  # fixed batch for qonnx's shape inference
        vi.type.tensor_type.shape.dim[0].dim_value = 4
    model = cleanup_model(ModelWrapper(proto))
    feed = {i.name: (k.astype(np.int64) if i.type.tensor_type.elem_type == TensorProto.INT64
                     else np.ldexp(k.astype(np.float64), -v.fmt.frac_bits).astype(np.float32))
            for i, k, v in zip(model.graph.input, ints, graph.inputs)}
    out = execute_onnx(model, feed)
    want = graph.run(*ints)
    for name, o in zip(graph.outputs, model.graph.output):
        np.testing.assert_array_equal(np.ldexp(out[o.name].astype(np.float64), graph.values[name].fmt.frac_bits),
                                      want[name])


@pytest.mark.parametrize("opset", [13, 17])
@pytest.mark.parametrize("case", ["attention_head", "transformer_block"])
def test_older_opsets_reduce_with_axes_attributes(opset: int, case: str) -> None:
    """Before opset 18 ReduceMax takes ``axes`` as an attribute; 8-bit cases need no int16."""
    graph, inputs = CASES[case].build()
    model = to_qdq(graph, opset=opset)
    check_artifact(model, f"opset {opset}")
    ints = graph.quantize_inputs(*inputs)
    got, want = run_model(model, graph, ints), graph.run(*ints)
    for name in graph.outputs:
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("case", TRANSFORMER_CASES)
def test_int8_storage_without_the_x86_layout(case: str) -> None:
    """``ort_x86=False`` (int8, zero point 0, no uint8 + 128 storage) is exact too."""
    graph, inputs = CASES[case].build()
    model = to_qdq(graph, ort_x86=False)
    check_artifact(model, "qdq int8")
    ints = graph.quantize_inputs(*inputs)
    got, want = run_model(model, graph, ints), graph.run(*ints)
    for name in graph.outputs:
        np.testing.assert_array_equal(got[name], want[name])


def test_verify_onnx_feeds_token_ids_as_integers() -> None:
    from fxquant.export.verify import verify_onnx

    graph = _embedding_graph(20, F(6, 0), F(8, 6), F(6, 3))
    ids = np.random.default_rng(8).integers(0, 20, size=(5, 5)).astype(np.float32)
    for flavour, model in (("qdq", to_qdq(graph)), ("qonnx", to_qonnx(graph))):
        assert verify_onnx(model, graph, ids, flavour)["mismatches"] == 0


@pytest.mark.parametrize("target_name", ["onnx-qdq", "qonnx"])
def test_every_illegal_transformer_op_is_named_by_its_rule(target_name: str) -> None:
    """The shared legality rules (one offender per rule, tests/backends/test_legality.py) name every
    op, each reason once, none as an unsupported kind; qonnx adds its own softmax / layernorm reason."""
    from tests.backends.test_legality import _transformer_graph

    graph = _transformer_graph()
    problems = get_target(target_name).check(graph)
    assert len(problems) == len(set(problems))
    assert {p.layer for p in problems} == {op.name for op in graph.ops}
    assert not [p for p in problems if "is not supported by target" in p.reason]
    no_form = {p.layer for p in problems if p.reason.startswith("QONNX has no exact")}
    assert no_form == (set() if target_name == "onnx-qdq" else
                       {op.name for op in graph.ops if op.kind in ("softmax", "layernorm")})
