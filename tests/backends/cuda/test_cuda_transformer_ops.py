"""The transformer kinds on the CUDA kernels (issue 14): ``embedding`` (token ids int32 end to end),
``slice`` / select, ``softmax`` (mask, causal), ``layernorm``, and the token-wise ``linear``.

Each graph's plan is built from the unscheduled TIR for llvm (the CPU check of the kernels'
integer logic, :mod:`fxquant.backends.cuda.cpu_check`) and compared, bit for bit, with
:meth:`fxquant.integer_graph.IntegerGraph.run` -- the integer reference, computed independently in
numpy (:mod:`fxquant.integer_ops_transformer`). Property tests draw formats and shapes at the
edges of the legality bounds; one test compiles the CUDA source for sm_80 with nvcc.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.conformance.zoo import GraphMaker, token_inputs

from fxquant.backends.cuda import build
from fxquant.backends.cuda.cpu_check import build_llvm, run_plan
from fxquant.backends.cuda.plan import LayerNormSpec, SoftmaxSpec, graph_problems, plan_graph
from fxquant.backends.cuda.target import check_ids
from fxquant.errors import InputRangeError, UnsupportedOpError
from fxquant.fixed_point import FixedPoint as F
from fxquant.integer_graph import IntegerGraph

PROPERTY = settings(max_examples=8, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_cuda_cpu(graph: IntegerGraph, ints: list[np.ndarray]) -> list[np.ndarray]:
    """The plan of ``graph`` run on its llvm build for integer inputs (id inputs as int32)."""
    assert graph_problems(graph) == []
    plan = plan_graph(graph)
    inputs = {}
    for v, k in zip(graph.inputs, ints):
        inputs[v.name] = (k.astype(np.int32) if v.name in plan.id_inputs
                          else np.ldexp(k.astype(np.float64), -v.fmt.frac_bits).astype(np.float32))
    return run_plan(plan.to_json(), plan.params, build_llvm(plan), inputs)


def assert_bit_exact(graph: IntegerGraph, ints: list[np.ndarray]) -> None:
    ref = graph.run(*ints)
    got = run_cuda_cpu(graph, ints)
    for name, g in zip(graph.outputs, got):
        np.testing.assert_array_equal(g, ref[name], err_msg=name)


def _rand_ints(rng: np.random.Generator, fmt: F, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(fmt.qmin, fmt.qmax + 1, size=shape, dtype=np.int64)


# ------------------------------------------------------------------------------------ embedding
def embedding_graph(vocab: int = 1000, ids_bits: int = 12) -> IntegerGraph:
    """ids <12,0> (a vocabulary wider than int8) into a (V, 8) table, exact; positions <4,0> into a
    requantized table; their sum; a tied head (the token table) into 8-bit logits."""
    m = GraphMaker((6,), F(ids_bits, 0), seed=90, name="ids")
    pos = m.input("pos", (6,), F(4, 0))
    tok = m.embedding("tok_emb", "ids", vocab, 8, F(6, 5))
    pe = m.embedding("pos_emb", pos, 6, 8, F(6, 5), out_fmt=F(5, 3))
    h = m.add("embed_sum", tok, pe, F(8, 4), relu=False)
    table = next(op.weight for op in m.ops if op.name == "tok_emb")
    return m.graph(m.dense("lm_head", h, vocab, F(6, 5), F(8, 0), weight=table, bias=False))


@pytest.mark.parametrize("batch", [1, 5])
def test_embedding_with_wide_token_ids_and_a_tied_head_is_bit_exact(batch: int) -> None:
    graph = embedding_graph()
    plan = plan_graph(graph)
    assert set(plan.id_inputs) == {"ids", "pos"}
    assert not any(launch.args == ("float:ids",) for launch in plan.launches)  # ids are never quantized
    assert any(arg == "int:ids" for launch in plan.launches for arg in launch.args)
    xs = token_inputs(graph, seed=batch, n=batch)
    ints = graph.quantize_inputs(*xs)
    ints[0][0, :2] = (0, 999)  # the first and last rows of the table
    assert_bit_exact(graph, ints)


def test_id_inputs_are_range_checked_never_clipped() -> None:
    spec = {"name": "ids", "rows": 20, "op": "tok_emb", "dtype": "int32"}
    np.testing.assert_array_equal(check_ids(np.array([[0, 19]]), spec), [[0, 19]])
    for bad in (20, -1):
        with pytest.raises(InputRangeError, match=rf"'tok_emb' \(embedding\): token id {bad} outside \[0, 20\)"):
            check_ids(np.array([[3, bad]]), spec)


def test_an_id_input_also_read_by_another_op_is_an_int8_activation() -> None:
    m = GraphMaker((4,), F(6, 0), seed=91, name="ids")
    e = m.embedding("emb", "ids", 20, 4, F(8, 6))
    r = m.requantize("ids_copy", "ids", F(6, 0))
    graph = m.graph(e, r)
    assert plan_graph(graph).id_inputs == {}
    ints = graph.quantize_inputs(*token_inputs(graph, n=3))
    assert_bit_exact(graph, ints)


def test_embedding_of_computed_ids_reads_their_int16_storage() -> None:
    """Ids <10,0> also sliced (so not an int32 id input): the window's ids are int16 activations."""
    m = GraphMaker((6,), F(10, 0), seed=98, name="ids")
    window = m.slice("window", "ids", 1, 1, 5)
    graph = m.graph(m.embedding("emb", window, 500, 4, F(8, 6)), m.embedding("emb_all", "ids", 500, 4, F(8, 6)))
    plan = plan_graph(graph)
    assert plan.id_inputs == {} and [s.ids_dtype for s in plan.kernels.values() if hasattr(s, "ids_dtype")] == ["int16"] * 2
    ints = graph.quantize_inputs(*token_inputs(graph, n=4))
    assert_bit_exact(graph, ints)


# ------------------------------------------------------------------------------------ slice
def test_select_and_strided_slices_on_every_axis() -> None:
    m = GraphMaker((5, 6, 3), F(7, 3), seed=92)
    outs = [m.select("cls", "input", 1, 0), m.select("last_feature", "input", 3, 2),
            m.slice("strided", "input", 2, 1, 6, 2), m.slice("tail", "input", 1, 4, 5),
            m.select("mid", m.slice("s2", "input", 1, 1, 5, 3), 2, 5)]
    graph = m.graph(*outs)
    rng = np.random.default_rng(0)
    assert_bit_exact(graph, [_rand_ints(rng, F(7, 3), (4, 5, 6, 3))])


# ------------------------------------------------------------------------------------ softmax
def softmax_graph(shape: tuple[int, ...], in_fmt: F, out_fmt: F, *, mask_shape: tuple[int, ...] | None = None,
                  causal: bool = False, exp_bits: int | None = None) -> IntegerGraph:
    m = GraphMaker(shape, in_fmt, seed=93)
    mask = m.input("mask", mask_shape, F(2, 0)) if mask_shape is not None else None
    p = m.softmax("softmax", "input", out_fmt, mask=mask, causal=causal)
    if exp_bits is not None:
        m.ops[-1].attrs["exp_bits"] = exp_bits
    return m.graph(p)


def test_causal_softmax_with_a_padding_mask_broadcast_over_heads_and_queries() -> None:
    graph = softmax_graph((2, 5, 5), F(8, 2), F(8, 7), mask_shape=(1, 1, 5), causal=True)
    rng = np.random.default_rng(1)
    scores = _rand_ints(rng, F(8, 2), (6, 2, 5, 5))
    mask = rng.integers(0, 2, size=(6, 1, 1, 5))
    mask[0] = 0  # every entry masked: the row is all 0
    mask[1] = 1
    mask[2, ..., 0] = 0  # causal row 0 keeps only key 0, masked: all 0
    scores[3] = -128  # ties at qmin
    ints = [scores, mask]
    assert_bit_exact(graph, ints)
    assert (graph.run(*ints)["softmax"][0] == 0).all()


@seed(20261203)
@PROPERTY
@given(data=st.data())
def test_softmax_over_formats_masks_and_table_widths(data: st.DataObject) -> None:
    """Scores 2..12 bits (int16 above 8) at FL -2..8 (tables up to 2^12 entries), outputs of 2..16
    bits (1.0 saturating when FL > BW - 2), exp_bits 8 / 15 / 20, rows of 1..40, optional mask and causal."""
    bits = data.draw(st.integers(2, 12))
    in_fmt = F(bits, data.draw(st.integers(-2, 8)))
    out_fmt = F(data.draw(st.integers(2, 16)), data.draw(st.integers(0, 16)))
    q, length = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 40))
    causal = data.draw(st.booleans())
    shape = (q, length)
    mask_shape = data.draw(st.sampled_from([None, (1, length), (q, length), (q, 1)]))
    graph = softmax_graph(shape, in_fmt, out_fmt, mask_shape=mask_shape, causal=causal,
                          exp_bits=data.draw(st.sampled_from([8, 15, 20])))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    ints = [_rand_ints(rng, in_fmt, (3, *shape))]
    if mask_shape is not None:
        ints.append(rng.integers(0, 2, size=(3, *mask_shape)))
    assert isinstance(plan_graph(graph).kernels[plan_graph(graph).launches[-1].kernel], SoftmaxSpec)
    assert_bit_exact(graph, ints)


# ------------------------------------------------------------------------------------ layernorm
def layernorm_graph(shape: tuple[int, ...], in_fmt: F, w_fmt: F, out_fmt: F, *, eps: float = 1e-5,
                    bias: bool = True, relu: bool = False) -> IntegerGraph:
    m = GraphMaker(shape, in_fmt, seed=94)
    h = m.layernorm("ln", "input", w_fmt, out_fmt, eps=eps, bias=bias)
    m.ops[-1].attrs["relu"] = relu
    return m.graph(h)


@pytest.mark.parametrize("n", [1, 2, 16, 100, 768])
def test_layernorm_rows_constant_saturated_and_random(n: int) -> None:
    """Rows of every length class (1: always constant), a constant row (D = eps only), qmin/qmax rows."""
    graph = layernorm_graph((3, n), F(8, 3), F(8, 6), F(8, 4))
    rng = np.random.default_rng(n)
    x = _rand_ints(rng, F(8, 3), (4, 3, n))
    x[0, 0] = -128
    x[0, 1] = 7
    x[1, 0, ::2], x[1, 0, 1::2] = -128, 127
    assert_bit_exact(graph, [x])


def test_layernorm_with_zero_eps_on_a_constant_row_gives_beta() -> None:
    graph = layernorm_graph((2, 8), F(6, 2), F(8, 6), F(8, 0), eps=0.0)
    x = np.zeros((2, 2, 8), np.int64)
    x[1, 1] = np.arange(8) - 4
    assert_bit_exact(graph, [x])


@seed(20261204)
@PROPERTY
@given(data=st.data())
def test_layernorm_over_formats_eps_relu_and_beta(data: st.DataObject) -> None:
    in_fmt = F(data.draw(st.integers(2, 16)), data.draw(st.integers(-3, 12)))  # int16 storage above 8 bits
    w_fmt = F(data.draw(st.integers(2, 8)), data.draw(st.integers(0, 8)))
    out_fmt = F(data.draw(st.integers(2, 16)), data.draw(st.integers(-2, 12)))
    shape = data.draw(st.sampled_from([(7,), (2, 5), (2, 2, 33)]))
    graph = layernorm_graph(shape, in_fmt, w_fmt, out_fmt, eps=data.draw(st.sampled_from([0.0, 1e-5, 1e-2, 4.0])),
                            bias=data.draw(st.booleans()), relu=data.draw(st.booleans()))
    assert isinstance(plan_graph(graph).kernels[plan_graph(graph).launches[-1].kernel], LayerNormSpec)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    assert_bit_exact(graph, [_rand_ints(rng, in_fmt, (3, *shape))])


# ------------------------------------------------------------------------------------ token-wise linear, the block
def encoder_block() -> IntegerGraph:
    """Embeddings -> LN -> two causal heads (token-wise q/k/v, batched matmuls, causal softmax with a
    padding mask) -> residual -> LN -> CLS select -> classifier: every transformer kernel at once."""
    m = GraphMaker((5,), F(10, 0), seed=95, name="ids")
    mask = m.input("mask", (1, 1, 5), F(2, 0))
    h = m.embedding("tok_emb", "ids", 300, 8, F(7, 5), out_fmt=F(8, 4))
    x = m.layernorm("ln1", h, F(8, 6), F(8, 5))
    q = m.transpose("q_heads", m.reshape("q_split", m.dense("q", x, 8, F(6, 5), F(8, 4)), (5, 2, 4)), (1, 0, 2))
    k = m.transpose("k_heads", m.reshape("k_split", m.dense("k", x, 8, F(6, 5), F(8, 4)), (5, 2, 4)), (1, 2, 0))
    v = m.transpose("v_heads", m.reshape("v_split", m.dense("v", x, 8, F(6, 5), F(8, 4)), (5, 2, 4)), (1, 0, 2))
    p = m.softmax("softmax", m.matmul("scores", q, k, F(8, 2)), F(8, 7), mask=mask, causal=True)
    ctx = m.reshape("merge", m.transpose("ctx_t", m.matmul("context", p, v, F(8, 4)), (1, 0, 2)), (5, 8))
    r = m.add("residual", h, ctx, F(8, 4), relu=False)
    cls = m.select("cls", m.layernorm("ln2", r, F(8, 6), F(8, 5)), 1, 0)
    return m.graph(m.linear("classifier", cls, 3, F(6, 5), F(8, 3)))


@pytest.mark.parametrize("batch", [1, 3, 64])  # 64: the token-wise linear's large-batch GEMM
def test_encoder_block_is_bit_exact(batch: int) -> None:
    graph = encoder_block()
    ints = graph.quantize_inputs(*token_inputs(graph, seed=batch, n=batch))
    ints[1][:, ..., 3:] = 0  # padding
    assert_bit_exact(graph, ints)


def test_wide_activations_travel_in_int16_between_kernels_that_take_them() -> None:
    """A <9,8> causal softmax into attention x V, a 16-bit requantize into a layernorm of 12-bit
    output, a 10-bit token-wise linear output: int16 buffers, bit-exact."""
    m = GraphMaker((4, 8), F(8, 4), seed=97)
    s = m.matmul("scores", m.dense("q", "input", 8, F(6, 5), F(8, 4)), m.transpose("x_t", "input", (1, 0)), F(8, 2))
    p = m.softmax("softmax", m.reshape("heads", s, (1, 4, 4)), F(9, 8), causal=True)
    ctx = m.reshape("ctx", m.matmul("context", p, m.reshape("v", "input", (1, 4, 8)), F(8, 4)), (4, 8))
    wide = m.requantize("to16", m.layernorm("ln", ctx, F(8, 6), F(8, 4)), F(16, 10))
    out = m.layernorm("ln16", wide, F(7, 5), F(12, 8), eps=1e-2, bias=False)
    logits = m.dense("head", ctx, 5, F(8, 7), F(10, 3))
    graph = m.graph(out, logits)
    plan = plan_graph(graph)
    dtypes = {launch.out: launch.out_dtype for launch in plan.launches}
    assert (dtypes["softmax#out"], dtypes["to16"], dtypes["ln16#out"], dtypes["head"], dtypes["scores"]) == (
        "int16", "int16", "int16", "int16", "int8")
    rng = np.random.default_rng(3)
    x = _rand_ints(rng, F(8, 4), (5, 4, 8))
    x[0] = -128
    assert_bit_exact(graph, [x])


def test_wide_activations_are_refused_where_a_kernel_reads_or_writes_int8_only() -> None:
    m = GraphMaker((4, 8), F(8, 4), seed=96)
    s = m.softmax("softmax", "input", F(9, 8))
    h = m.dense("fc", s, 4, F(6, 5), F(8, 4))  # the dp4a GEMM reads int8 only
    g = m.lut("gelu", h, "gelu", F(10, 4))  # a table of int8 entries
    graph = m.graph(g)
    problems = graph_problems(graph)
    assert [(p.layer, p.kind) for p in problems] == [("fc", "linear"), ("gelu", "lut")]
    assert problems[0].reason.startswith("9-bit input; this target holds 2-8-bit activations for linear "
                                         "(input 'softmax'")
    assert problems[1].reason.startswith("10-bit output; this target holds 2-8-bit activations")
    with pytest.raises(UnsupportedOpError, match=r"fc \(linear\): 9-bit input.*gelu \(lut\): 10-bit output"):
        plan_graph(graph)


@pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")
def test_transformer_kernels_compile_for_sm_80(tmp_path: Path) -> None:
    plan = plan_graph(encoder_block())
    source = build.cuda_source(plan, "sm_80")
    for prefix in ("fxq_embedding", "fxq_layernorm", "fxq_softmax", "fxq_slice", "fxq_linear"):
        names = [name for name in plan.kernels if name.startswith(prefix)]
        assert names, prefix
        assert all(f"{name}_kernel(" in source for name in names)
    (tmp_path / "k.cu").write_text(source)
    build.nvcc_compile(tmp_path / "k.cu", tmp_path / "k.so", "sm_80")
    assert (tmp_path / "k.so").stat().st_size > 0


def test_runner_float_baseline_of_the_transformer_kinds_matches_numpy() -> None:
    """run_cuda.py's torch float network (the latency baseline) on softmax (causal, mask), layernorm,
    embedding and select, against float64 numpy formulas of the same dequantized weights."""
    import torch

    from fxquant.backends.cuda.run_cuda import torch_float_model
    from fxquant.fixed_point import LAYERNORM_FRAC_BITS

    m = GraphMaker((4,), F(6, 0), seed=99, name="ids")
    mask = m.input("mask", (1, 1, 4), F(2, 0))
    h = m.embedding("emb", "ids", 20, 4, F(8, 6))
    ln = m.layernorm("ln", h, F(8, 6), F(8, 4))
    s = m.matmul("scores", m.reshape("r1", ln, (1, 4, 4)), m.transpose("t", m.reshape("r2", ln, (1, 4, 4)), (0, 2, 1)),
                 F(8, 3))
    p = m.softmax("softmax", s, F(8, 7), mask=mask, causal=True)
    graph = m.graph(p, m.select("cls", ln, 1, 0))
    ops, ints = build.float_graph(graph)
    model = torch_float_model({"float_graph": ops, "outputs": graph.outputs},
                              {k: torch.from_numpy(v) for k, v in ints.items()}, torch.float64)
    rng = np.random.default_rng(5)
    ids, keep = rng.integers(0, 20, size=(3, 4)), rng.integers(0, 2, size=(3, 1, 1, 4))
    keep[:, ..., 0] = 1
    got_p, got_cls = model({"ids": torch.from_numpy(ids), "mask": torch.from_numpy(keep.astype(np.float64))})
    emb, ln_op = graph.ops[0], graph.ops[1]
    x = np.ldexp(emb.weight[ids].astype(np.float64), -6)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    eps = ln_op.attrs["eps"] / 4 ** 3 * 2.0 ** (-2 * 6)
    y = (x - mu) / np.sqrt(var + eps) * np.ldexp(ln_op.weight, -6) + np.ldexp(ln_op.bias, -(6 + LAYERNORM_FRAC_BITS))
    np.testing.assert_allclose(got_cls.numpy(), y[:, 0], rtol=1e-9, atol=1e-9)
    scores = np.einsum("bqd,bkd->bqk", y, y)[:, None]
    allowed = (keep != 0) & np.tril(np.ones((4, 4), bool))
    e = np.where(allowed, np.exp(scores - np.where(allowed, scores, -np.inf).max(-1, keepdims=True)), 0.0)
    np.testing.assert_allclose(got_p.numpy(), e / e.sum(-1, keepdims=True), rtol=1e-9, atol=1e-12)
