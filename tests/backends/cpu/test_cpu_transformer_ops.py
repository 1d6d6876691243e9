"""The transformer kernels (:mod:`fxquant.backends.cpu.transformer_kernels`) through the CPU target,
bit-exact against ``IntegerGraph.run``: activation x activation matmuls (batched, broadcast heads,
vector and scalar column paths), embeddings from int32 token ids, slices and selects, softmax with
masks of every broadcast form, causal, all-masked rows, 9-bit (uint8) outputs and other table sizes,
LayerNorm with constant rows, eps 0, ReLU, no beta and a left-shift output; the refusals ``check``
names; and a property test feeding random integers to one built module. Each export is a TVM build:
the graphs are small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fxquant.backends import base
from fxquant.backends.cpu.build import ENTRY, CpuModel, lower
from fxquant.backends.cpu.features import resolve_target
from fxquant.backends.cpu.target import CpuTarget
from fxquant.errors import InputRangeError
from fxquant.fixed_point import FixedPoint as F
from fxquant.integer_graph import IntegerGraph
from tests.conformance.harness import assert_bit_exact, assert_same_integers
from tests.conformance.zoo import GraphMaker, format_inputs, token_inputs


def _exact(graph: IntegerGraph, tmp_path: Path, inputs: list[np.ndarray] | None = None, n: int = 5) -> dict:
    assert CpuTarget().check(graph) == []
    return assert_bit_exact(CpuTarget(), graph, inputs or token_inputs(graph, seed=3, n=n), tmp_path)


def _kernels(graph: IntegerGraph) -> list[str]:
    mod, _ = lower(graph, resolve_target("host"))
    return [gv.name_hint for gv in mod.functions]


def _floats(graph: IntegerGraph, ints: list[np.ndarray]) -> list[np.ndarray]:
    """Float inputs whose quantization is exactly ``ints`` (ids stay integers)."""
    return [np.ldexp(np.asarray(k, np.float64), -v.fmt.frac_bits) for k, v in zip(ints, graph.inputs)]


def test_matmul_batched_broadcast_full_and_partial_column_vectors(tmp_path: Path) -> None:
    """(2,4,8) @ (1,8,16) (one key matrix for both heads, 16 columns: whole vectors) with ReLU;
    (2,4,16) @ (2,16,3) (3 columns: one partial vector); rank 4 (2,2,3,4) @ (2,1,4,5) broadcast on the
    head axis; an odd K (3,5) @ (5,8) (the last k-pair of the vpmaddwd path half zero)."""
    m = GraphMaker((2, 4, 8), F(8, 4), seed=90, name="a")
    b = m.input("b", (1, 8, 16), F(7, 3))
    c = m.input("c", (2, 16, 3), F(8, 6))
    d = m.input("d", (2, 2, 3, 4), F(6, 2))
    e = m.input("e", (2, 1, 4, 5), F(8, 7))
    ab = m._op("ab", "matmul", ("a", b), (2, 4, 16), F(8, 3), attrs={"relu": True})
    abc = m.matmul("abc", ab, c, F(8, 4))
    de = m.matmul("de", d, e, F(8, 7))
    f, g = m.input("f", (3, 5), F(8, 5)), m.input("g", (5, 8), F(8, 3))
    fg = m.matmul("fg", f, g, F(8, 5))
    graph = m.graph(abc, de, fg)
    names = _kernels(graph)
    assert sum(n.startswith("fxq_matmul") for n in names) == 4
    _exact(graph, tmp_path)


def test_matmul_reads_a_transposed_operand_in_place(tmp_path: Path) -> None:
    """``a @ transpose(b, last two axes)`` (Q K^T) lowers to one matmul reading ``b`` as written (no
    transpose kernel), bit-exact: 17 keys (a partial column vector), K = 32 and an odd K = 5, a
    broadcast head axis; a transpose of other axes, and one also read elsewhere, stay correct."""
    m = GraphMaker((2, 17, 32), F(8, 4), seed=91, name="q")
    k = m.input("k", (2, 17, 32), F(7, 3))
    s1 = m.matmul("scores", "q", m.transpose("k_t", k, (0, 2, 1)), F(8, 2))
    a, b = m.input("a", (2, 3, 5), F(8, 5)), m.input("b", (1, 9, 5), F(8, 3))
    s2 = m.matmul("odd", a, m.transpose("b_t", b, (0, 2, 1)), F(8, 4))
    c = m.input("c", (5, 2, 3), F(8, 5))
    c_t = m.transpose("c_t", c, (1, 2, 0))  # (2, 3, 5): not a swap of the last two axes
    s3 = m.matmul("other_axes", c_t, m.input("d", (2, 5, 4), F(8, 3)), F(8, 4))
    graph = m.graph(s1, s2, s3, "b_t")
    names = _kernels(graph)
    assert sum(n.startswith("fxq_transpose") for n in names) == 2, names  # c_t and the b_t output
    _exact(graph, tmp_path)


def test_embedding_int32_ids_requantized_tables_and_range(tmp_path: Path) -> None:
    """16-bit ids (vocab 3000, beyond int8) into a 12-bit table requantized to <8,5> (dim 8: vectors)
    and the same ids into an exact 3-wide table; the library takes int32 ids and refuses ids
    outside the vocabulary (the reference raises there too; nothing is clipped)."""
    m = GraphMaker((5,), F(16, 0), seed=91, name="ids")
    wide = m.embedding("wide", "ids", 3000, 8, F(12, 9), out_fmt=F(8, 5))
    narrow = m.embedding("narrow", "ids", 3000, 3, F(7, 4))
    graph = m.graph(m.requantize("out_wide", wide, F(8, 2)), narrow)
    report = _exact(graph, tmp_path)
    out = tmp_path / "artifact"
    entry = json.loads((out / ENTRY).read_text())
    assert entry["inputs"][0]["dtype"] == "int32" and entry["inputs"][0]["vocab"] == 3000, entry
    assert report["bit_exact"]
    for bad in (3000, -1):
        ids = np.zeros((2, 5), np.int64)
        ids[1, 3] = bad
        with pytest.raises(InputRangeError, match="not a token id"):
            CpuTarget().run(out, [ids])
        with pytest.raises(InputRangeError):
            graph.run(ids)
    # what bench feeds: integral float ids, staged as int32 by the loaded model
    ids = np.array([[0, 2999, 7, 1500, 3]], np.float64)  # staged as int32 (model.staged, as bench's tvm_runner)
    want = [graph.run(ids.astype(np.int64))[o] for o in graph.outputs]
    assert_same_integers(CpuModel.load(out).run(ids), want, graph.outputs, "float ids")
    with pytest.raises(InputRangeError, match="not integers"):
        CpuModel.load(out).run(ids + 0.5)


def test_slice_select_and_strided_slices(tmp_path: Path) -> None:
    """A select in the middle axis of (4,3,8), a step-3 slice of the last axis (single-element
    blocks), a slice of the first axis (blocks of 24 = 3 vectors), and a select of the last axis."""
    m = GraphMaker((4, 3, 8), F(7, 3), seed=92)
    mid = m.select("mid", "input", 2, 1)
    last = m.slice("every3", "input", 3, 1, 8, 3)
    first = m.slice("rows", "input", 1, 1, 4, 2)
    col = m.select("col", first, 3, 7)
    graph = m.graph(mid, last, col)
    assert sum(n.startswith("fxq_slice") for n in _kernels(graph)) == 4
    _exact(graph, tmp_path)


def _softmax_graph(out_fmt: F, exp_bits: int | None = None, in_fmt: F = F(8, 3)) -> IntegerGraph:
    m = GraphMaker((2, 4, 6), in_fmt, seed=93)
    full = m.input("full_mask", (2, 4, 6), F(2, 0))
    keys = m.input("key_mask", (1, 1, 6), F(2, 0))
    rows = m.input("row_mask", (1, 4, 1), F(2, 0))
    outs = []
    for name, mask, causal in (("sm_full", full, False), ("sm_keys", keys, True), ("sm_rows", rows, False),
                               ("sm_causal", None, True), ("sm_plain", None, False)):
        outs.append(m.softmax(name, "input", out_fmt, mask=mask, causal=causal))
        if exp_bits is not None:
            m.ops[-1].attrs["exp_bits"] = exp_bits
    return m.graph(*outs)


def _softmax_inputs(graph: IntegerGraph, n: int = 4) -> list[np.ndarray]:
    """Scores at every integer corner; masks with zeros, an all-masked row and an all-masked sample."""
    rng = np.random.default_rng(5)
    fmt = graph.inputs[0].fmt
    scores = rng.integers(fmt.qmin, fmt.qmax + 1, size=(n, 2, 4, 6))
    scores[0] = fmt.qmin
    scores[1, 0, 0] = [fmt.qmax, fmt.qmin] * 3  # the widest spread in a row: the table's last entry
    full = rng.integers(-2, 2, size=(n, 2, 4, 6))
    full[2, 1, 3] = 0  # one row with no kept entry
    keys = rng.integers(0, 2, size=(n, 1, 1, 6))
    keys[0, :, :, 0] = 0  # causal: query 0 keeps only key 0, masked here -> an empty row
    keys[3] = 0
    rows = rng.integers(0, 2, size=(n, 1, 4, 1))
    return _floats(graph, [scores, full, keys, rows])


@pytest.mark.parametrize(("out_fmt", "exp_bits", "in_fmt"), [
    (F(8, 7), None, F(8, 3)),  # the BERT-style output, default E = 15
    (F(9, 8), 8, F(8, 0)),     # 9 bits in uint8; E = 8; <8,0> scores: a 13-entry table (the index cap)
    (F(6, 4), 20, F(2, 0)),    # 2-bit scores, E = 20, an output with 1.0 = 16 (no saturation at FL < BW - 1)
])
def test_softmax_masks_causal_and_formats(out_fmt: F, exp_bits: int | None, in_fmt: F, tmp_path: Path) -> None:
    graph = _softmax_graph(out_fmt, exp_bits, in_fmt)
    ref = graph.run(*graph.quantize_inputs(*_softmax_inputs(graph)))
    assert not ref["sm_full"][2, 1, 3].any() and not ref["sm_keys"][0, :, 0].any()  # the empty rows are all 0
    assert ref["sm_plain"].max() > 0
    _exact(graph, tmp_path, _softmax_inputs(graph))


def test_nine_bit_softmax_feeds_slice_and_matmul(tmp_path: Path) -> None:
    """A causal <9,8> softmax (uint8 storage) read by a select and by attention x V, and output itself."""
    m = GraphMaker((2, 4, 4), F(8, 2), seed=94)
    v = m.input("v", (2, 4, 8), F(8, 4))
    p = m.softmax("softmax", "input", F(9, 8), causal=True)
    ctx = m.matmul("context", p, v, F(8, 4))
    first = m.select("first_query", p, 2, 0)
    graph = m.graph(ctx, first, p)
    _exact(graph, tmp_path)


def test_layernorm_constant_rows_eps0_relu_no_beta_left_shift(tmp_path: Path) -> None:
    """Rows of 16 (sample 0 constant: variance 0), eps 0 with constant rows (D = 0, sigma = 0: the
    output is beta), ReLU, no beta, gamma at FL -12 (accumulator FL 4 < output FL 6: a saturating left
    shift), a row of one entry and a row of 200."""
    from fxquant.fixed_point import layernorm_eps

    m = GraphMaker((3, 16), F(8, 3), seed=95)
    a = m.layernorm("ln", "input", F(8, 6), F(8, 4))
    m.ops[-1].attrs["relu"] = True
    b = m.layernorm("ln_eps0", "input", F(8, 6), F(8, 5), eps=0.0)
    c = m.layernorm("ln_shift", a, F(6, -12), F(8, 6), bias=False)
    one = m.input("one", (4, 1), F(8, 4))
    d = m.layernorm("ln_one", one, F(8, 6), F(8, 3), eps=1e-3)
    long = m.input("long", (1, 200), F(7, 2))
    e = m.layernorm("ln_long", long, F(8, 7), F(8, 5))
    assert m.ops[-1].attrs["eps"] == layernorm_eps(1e-5, 200, F(7, 2))
    graph = m.graph(a, b, c, d, e)
    xs = format_inputs(graph, n=4, seed=6)
    ref = graph.run(*graph.quantize_inputs(*xs))
    assert (ref["ln_eps0"][0] == ref["ln_eps0"][0, 0]).all()  # a constant row
    _exact(graph, tmp_path, xs)


def test_refusals_name_the_op(tmp_path: Path) -> None:
    """A 9-bit softmax output read by a requantize, token ids read by something other than an
    embedding, a matmul of unequal ranks: each named precisely by ``check``."""
    m = GraphMaker((4, 4), F(8, 3), seed=96)
    p = m.softmax("softmax", "input", F(9, 8))
    m.requantize("rq", p, F(8, 7))
    ids = m.input("ids", (4,), F(8, 0))
    m.embedding("emb", ids, 10, 4, F(8, 6))
    m.requantize("ids_rq", ids, F(8, 0))
    vec = m.input("vec", (4,), F(8, 3))
    m._op("mm", "matmul", ("input", vec), (4,), F(8, 3))
    problems = {p.layer: str(p) for p in CpuTarget().check(m.graph("rq", "emb", "ids_rq", "mm"))}
    assert "only matmul, slice read it" in problems["rq"], problems
    assert "reads the token ids 'ids'" in problems["ids_rq"], problems
    assert "equal ranks >= 2" in problems["mm"], problems
    assert "softmax" not in problems and "ids" not in problems and "emb" not in problems, problems


# ------------------------------------------------------------------------------ property: run-time inputs
def _attention_graph() -> IntegerGraph:
    """LN -> q, k -> Q K^T -> masked causal softmax (<8,7>) -> x V: every row kernel in one build."""
    m = GraphMaker((4, 8), F(8, 4), seed=97)
    mask = m.input("mask", (1, 4), F(2, 0))
    h = m.layernorm("ln", "input", F(8, 6), F(8, 5))
    q, k = m.dense("q", h, 8, F(6, 5), F(8, 4)), m.dense("k", h, 8, F(6, 5), F(8, 4))
    s = m.matmul("scores", q, m.transpose("k_t", k, (1, 0)), F(8, 2))
    p = m.softmax("softmax", s, F(8, 7), mask=mask, causal=True)
    return m.graph(m.matmul("context", p, h, F(8, 4)), p)


@pytest.fixture(scope="module")
def attention_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[IntegerGraph, Path]:
    graph = _attention_graph()
    out = tmp_path_factory.mktemp("cpu_attention") / "artifact"
    base.export(CpuTarget(), graph, out, token_inputs(graph, seed=1))
    return graph, out


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_inputs_on_one_build(attention_build: tuple[IntegerGraph, Path], data: st.DataObject) -> None:
    """Any integers in the input formats (any batch): the built library equals the reference."""
    graph, out = attention_build
    n = data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, size=(n, 4, 8))
    if data.draw(st.booleans()):
        x[:, data.draw(st.integers(0, 3))] = data.draw(st.sampled_from([-128, 127, 0]))  # a constant row
    mask = rng.integers(-2, 2, size=(n, 1, 4))
    got = CpuTarget().run(out, [x, mask])
    ref = graph.run(x, mask)
    assert_same_integers(got, [ref[o] for o in graph.outputs], graph.outputs, "random inputs")


def test_large_shapes_take_the_parallel_loops(tmp_path: Path) -> None:
    """Work beyond ``PARALLEL_MIN_WORK`` at batch 2: the row kernels and the matmul run their
    ``T.parallel`` loops (8 heads of 64 x 64: Q K^T, a causal softmax, LayerNorm over 64)."""
    m = GraphMaker((8, 64, 64), F(8, 3), seed=98)
    s = m.matmul("scores", "input", "input", F(8, 1))
    p = m.softmax("softmax", s, F(8, 7), causal=True)
    ln = m.layernorm("ln", "input", F(8, 6), F(8, 4))
    ctx = m.matmul("context", p, ln, F(8, 4))
    _exact(m.graph(ctx), tmp_path, n=3)


def test_transformer_block_lowers_to_fxquant_kernels_only() -> None:
    """The zoo's encoder block: every function of the lowered module is ``main`` or an fxquant
    kernel (no op left to TVM's default legalization), one per transformer kind it holds."""
    from tests.conformance.zoo import CASES

    graph, _ = CASES["transformer_block"].build()
    names = _kernels(graph)
    assert all(n == "main" or n.startswith("fxq_") for n in names), names
    for kind in ("layernorm", "matmul", "softmax", "linear", "lut", "add"):
        assert any(n.startswith(f"fxq_{kind}") for n in names), (kind, names)


def test_layernorm_square_root_equals_isqrt_at_the_edges() -> None:
    """The kernel's ``floor(sqrt(x))`` (a float64 square root plus one correction each way) equals
    ``math.isqrt`` on every edge of its domain: 0, 1, ``2^62``, and ``k^2 - 1``, ``k^2``, ``k^2 + 1`` for
    ``k`` near every power of two up to ``2^31`` and random large ``k`` (where a double rounds)."""
    import math

    import tvm
    from tvm.script import tirx as T

    from fxquant.backends.cpu.transformer_kernels import _isqrt_fp64

    rng = np.random.default_rng(7)
    ks = [1 << p for p in range(32)] + [(1 << p) - 1 for p in range(1, 32)] + list(rng.integers(1 << 26, 1 << 31, 200))
    xs = {0, 1, 2, 3, 1 << 62, (1 << 62) - 1}
    for k in ks:
        xs.update(v for v in (int(k) ** 2 - 1, int(k) ** 2, int(k) ** 2 + 1, int(k) ** 2 + 2 * int(k)) if 0 <= v <= 1 << 62)
    xs.update(int(v) for v in rng.integers(0, (1 << 62) + 1, 500, dtype=np.int64))
    x = np.array(sorted(xs), np.int64)

    @T.prim_func
    def roots(a_h: T.handle, b_h: T.handle):
        T.func_attr({"global_symbol": "main", "tir.noalias": True})
        n = T.int64()
        a = T.match_buffer(a_h, (n,), "int64")
        b = T.match_buffer(b_h, (n,), "int64")
        for i in range(n):
            b[i] = _isqrt_fp64(a[i])

    lib = tvm.compile(tvm.IRModule({"main": roots}), target=resolve_target("host").tvm_target())
    out = tvm.runtime.tensor(np.zeros_like(x))
    lib["main"](tvm.runtime.tensor(x), out)
    want = np.array([math.isqrt(int(v)) for v in x], np.int64)
    bad = np.flatnonzero(out.numpy() != want)
    assert bad.size == 0, [(int(x[i]), int(out.numpy()[i]), int(want[i])) for i in bad[:5]]
