"""The shared legality rules: each rule on hand-computed cases, every offender listed at once."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from tests.conformance.zoo import F, GraphMaker

from fxquant import legality
from fxquant.errors import UnsupportedOpError
from fxquant.integer_graph import Op, Value


def test_accumulator_rule_boundary() -> None:
    assert legality.fits(2**31 - 1) and not legality.fits(2**31)
    assert legality.fits(2**63 - 1, 64) and not legality.fits(2**15, 16)
    legality.require_fits(2**31 - 1, "op 'fc'")
    with pytest.raises(UnsupportedOpError, match="op 'fc': the accumulator can reach 2147483648, beyond int32"):
        legality.require_fits(2**31, "op 'fc'")


def test_dot_and_add_bounds_by_hand() -> None:
    w = np.array([[1, -2, 3], [-4, 0, 0]])
    # rows: 6 * 128 + |b| = 768 + 5 ; 4 * 128 + 1000 = 1512
    assert legality.dot_bound(w, np.array([5, -1000]), 128) == 1512
    assert legality.dot_bound(w, None, 128) == 768
    # a packed kernel's offset: (|w| + 8) summed = 6 + 24 = 30 for the first row
    assert legality.dot_bound(w, None, 128, weight_offset=8) == 30 * 128
    assert legality.dot_bound(np.ones((2, 3, 2, 2)), None, 2) == 24  # conv weights: fan-in 12
    assert legality.add_bound((0, 3), (8, 8)) == 128 + 1024
    assert legality.add_bound((1,), (4,)) == 16


def test_avg_window_shift_and_guard() -> None:
    assert [legality.avg_window_shift(k) for k in [(1, 1), (2, 2), (4, 2), (8, 8), (3, 3), (2, 3)]] == [
        0, 2, 3, 6, None, None]
    assert legality.require_avg_window((4, 4), (0, 0), "op 'gap'") == 4
    with pytest.raises(UnsupportedOpError, match="op 'p': average pooling over \\(3, 3\\)"):
        legality.require_avg_window((3, 3), (0, 0), "op 'p'")
    with pytest.raises(UnsupportedOpError, match="padding \\(1, 0\\)"):
        legality.require_avg_window((2, 2), (1, 0), "op 'p'")


def test_reference_divides_any_window_by_the_one_reciprocal() -> None:
    """The reference takes a 3x3 window (sum * M at FL + s); targets without the multiply refuse it."""
    from fxquant.fixed_point import reciprocal, requantize

    m = GraphMaker((1, 6, 6), F(8, 4))
    graph = m.graph(m.pool("avg", "input", kind="avgpool2d", k=3))
    x = np.arange(36, dtype=np.int64).reshape(1, 1, 6, 6) - 18
    mult, shift = reciprocal(9)
    want = requantize(x.reshape(1, 1, 2, 3, 2, 3).sum(axis=(3, 5)) * mult, 4 + shift, F(8, 4))
    np.testing.assert_array_equal(graph.run(x)["avg"], want)
    assert legality.avg_window_problems(graph, reciprocal=True) == []
    assert [p.layer for p in legality.avg_window_problems(graph)] == ["avg"]
    assert legality.requantize_shift(graph, graph.ops[0]) == -shift


def test_pool_dilation_ceil_and_table_rules() -> None:
    from fxquant.elementwise import lut_attrs

    m = GraphMaker((1, 8, 8), F(8, 4))
    m.pool_ceil("ceil_same", "input", "maxpool2d", kernel=(2, 2), stride=(2, 2), ceil_mode=True)  # 8 -> 4 either way
    m.pool_ceil("ceil_edge", "input", "maxpool2d", kernel=(3, 3), stride=(2, 2), ceil_mode=True)  # 3 -> 4 windows
    m.pool_ceil("dilated", "input", "maxpool2d", kernel=(2, 2), stride=(1, 1), dilation=(2, 2))
    m.lut("table", "input", "sigmoid", F(8, 7))
    m.requantize("wide", "input", F(13, 8))
    m._op("wide_table", "lut", ("wide",), (1, 8, 8), F(8, 7), attrs={"table": np.zeros(1 << 13, np.int64)})
    m._op("short_table", "lut", ("input",), (1, 8, 8), F(8, 7), attrs={"table": np.zeros(10, np.int64)})
    bad = lut_attrs("exp", F(8, 4), F(8, 7))["table"] * 4
    m._op("off_grid", "lut", ("input",), (1, 8, 8), F(8, 7), attrs={"table": bad})
    graph = m.graph("ceil_same")
    assert [(p.layer, p.reason) for p in legality.window_problems(graph)] == [
        ("ceil_edge", "max pooling with a ceil_mode edge window"), ("dilated", "max pooling with dilation (2, 2)")]
    assert legality.window_problems(graph, dilation=True, ceil_mode=True) == []
    assert [p.layer for p in legality.lut_problems(graph)] == ["wide_table", "short_table", "off_grid"]
    assert "13-bit input" in legality.lut_problems(graph)[0].reason
    assert [p.layer for p in legality.lut_problems(graph, max_bits=16)] == ["short_table", "off_grid"]


def _bad_graph():
    m = GraphMaker((2, 8, 8), F(8, 4))
    a = m.conv("conv", "input", 4, F(12, 10), F(8, 3))
    b = m.pool("avg3", a, kind="avgpool2d", k=3)
    c = m.pool("max", a, k=2)
    m.ops[-1].attrs["padding"] = (2, 0)
    d = m.pool("avg2pad", c, kind="avgpool2d", k=2)
    m.ops[-1].attrs["padding"] = (1, 1)
    graph = m.graph(b, d)
    graph.ops.append(Op("fc", "linear", (a,), "fc", F(10, 4), weight=np.full((3, 4), 300), weight_fmt=F(8, 6)))
    graph.values["fc"] = Value("fc", (3,), F(10, 4))
    return graph


def test_every_rule_lists_every_offender() -> None:
    graph = _bad_graph()
    widths = legality.width_problems(graph, weight_bits=(2, 8), act_bits=(2, 8))
    assert [(p.layer, p.reason.split(";")[0]) for p in widths] == [("conv", "12-bit weights"), ("fc", "10-bit output")]
    assert [(p.layer, p.reason) for p in legality.fit_problems(graph)] == [
        ("fc", "weights need 10 bits, more than their 8-bit format")]
    assert [(p.layer, p.reason) for p in legality.avg_window_problems(graph)] == [
        ("avg3", "average window (3, 3) is not a power of two"), ("avg2pad", "average pooling with padding (1, 1)")]
    assert [p.layer for p in legality.window_problems(graph)] == ["max"]
    shapes = legality.shape_problems(graph, max_outputs=1)
    assert [(p.layer, p.kind) for p in shapes] == [("fc", "linear"), ("graph", "outputs")]
    assert "[4, 8, 8]" in shapes[0].reason
    assert legality.shape_problems(graph) == shapes[:1]


def test_grouped_conv_and_inputs() -> None:
    m = GraphMaker((4, 4, 4), F(8, 4))
    m.conv("g", "input", 4, F(8, 6), F(8, 3))
    m.ops[-1].attrs["groups"] = 2
    graph = m.graph("g")
    graph.inputs.append(Value("y", (4,), F(8, 4)))
    assert [(p.layer, p.kind) for p in legality.shape_problems(graph, max_inputs=1)] == [
        ("g", "conv2d"), ("graph", "inputs")]
    assert legality.shape_problems(graph, groups=True) == []


def test_accumulator_problems_use_the_graph_bound() -> None:
    m = GraphMaker((4,), F(8, 4))
    graph = m.graph(m.linear("fc", "input", 2, F(8, 7), F(8, 2), bias=False))
    graph.ops[0].weight = np.array([[127, 127, 127, 127], [1, 0, 0, 0]])
    assert graph.accumulator_bound(graph.ops[0]) == 4 * 127 * 128  # 65024: over int16, under int17
    (problem,) = legality.accumulator_problems(graph, 16)
    assert problem.layer == "fc" and "65024 exceeds int16" in problem.reason
    assert legality.accumulator_problems(graph, 17) == []


def test_format_problems_name_the_producer() -> None:
    m = GraphMaker((4,), F(8, 4))
    graph = m.graph(m.linear("fc", "input", 3, F(8, 7), F(32, 0)))
    (problem,) = legality.format_problems(graph)
    assert problem.layer == "fc" and "no integer form" in problem.reason


def test_add_shapes_and_arity() -> None:
    m = GraphMaker((4,), F(8, 4))
    m.requantize("q", "input", F(8, 3))
    graph = m.graph(m._op("add3", "add", ("input", "q", "q"), (4,), F(8, 3)))
    graph.values["wide"] = Value("wide", (6,), F(8, 4))
    graph.ops.append(Op("bcast", "add", ("input", "wide"), "bcast", F(8, 3)))
    graph.values["bcast"] = Value("bcast", (6,), F(8, 3))
    assert [(p.layer, p.reason) for p in legality.shape_problems(graph, add_arity=2)] == [
        ("add3", "add of 3 inputs; this target adds 2"), ("bcast", "add of shapes [[4], [6]]; no kernel broadcasts")]
    assert [p.layer for p in legality.shape_problems(graph)] == ["bcast"]


def test_average_pool_bound_covers_ceil_mode_edge_windows() -> None:
    """A 4x4 window (M = 1) whose ceil-mode edge windows hold 12 and 9 cells (M ~ 2^17/12): the
    worst case is an edge window's sum times its M, which an all-qmin input reaches exactly."""
    from fxquant.fixed_point import reciprocal

    m = GraphMaker((1, 6, 6), F(8, 4))
    graph = m.graph(m.pool_ceil("avg", "input", "avgpool2d", kernel=(4, 4), stride=(3, 3), ceil_mode=True))
    op = graph.ops[0]
    bound = graph.accumulator_bound(op)
    assert bound == 128 * 12 * reciprocal(12)[0] > 128 * 16
    x = np.full((1, 1, 6, 6), -128, np.int64)
    from fxquant.integer_graph import _windows, avg_divisors

    sums = _windows(x, op, 0).sum(axis=(-1, -2))[0, 0]
    reached = max(abs(int(s)) * reciprocal(int(d))[0] for s, d in zip(sums.ravel(), avg_divisors(op, 6, 6).ravel()))
    assert reached == bound


# ------------------------------------------------------------------------------------ transformer kinds
def _transformer_graph():
    """One offender per transformer rule, on separate branches: every one is listed at once."""
    from fxquant.fixed_point import layernorm_eps

    m = GraphMaker((4,), F(4, 0), name="ids")  # ids reach 7: a 9-row table is not addressable
    m.embedding("emb_rows", "ids", 9, 2, F(8, 6))
    frac = m.input("frac_ids", (4,), F(8, 1))
    m.embedding("emb_frac", frac, 3, 2, F(8, 6))
    s16 = m.input("scores16", (2, 4), F(16, 12))  # exp table of ~45,000 entries
    m.softmax("sm_table", s16, F(8, 7))
    long = m.input("long", (1, 1 << 17), F(4, 0))  # row sum 2^17 * 2^15 > int32
    m.softmax("sm_sum", long, F(8, 7))
    m.softmax("sm_mask", s16, F(8, 7), mask=m.input("mask", (3, 4), F(2, 0)))
    wide = m.input("wide", (2, 2048), F(16, 8))  # 2048^3 2^32 / 4 > 2^62
    m._op("ln_d", "layernorm", (wide,), (2, 2048), F(8, 4), weight=np.ones(2048, np.int64), weight_fmt=F(8, 6),
          attrs={"dim": 2, "eps": layernorm_eps(1e-5, 2048, F(16, 8))})
    m._op("ln_eps", "layernorm", ("ids",), (4,), F(8, 4), weight=np.ones(4, np.int64), weight_fmt=F(8, 6),
          attrs={"dim": 1, "eps": 1e-5})
    m._op("sl", "slice", ("ids",), (0,), F(4, 0), attrs={"dim": 1, "start": 3, "stop": 3})
    return m.graph("emb_rows")


def test_transformer_rules_list_every_offender() -> None:
    graph = _transformer_graph()
    problems = {p.layer: str(p) for p in legality.transformer_problems(graph)}
    assert set(problems) == {"emb_rows", "emb_frac", "sm_table", "sm_sum", "sm_mask", "ln_d", "ln_eps", "sl"}
    assert "the table has 9 rows (ids need 5 bits)" in problems["emb_rows"]
    assert "token ids at <8,1>" in problems["emb_frac"]
    assert re.search(r"exponential table of \d+ entries for scores at <16,12>", problems["sm_table"])
    assert "row sum 131072 * 2^15 exceeds int32" in problems["sm_sum"]
    assert "does not broadcast" in problems["sm_mask"]
    assert "beyond 2^62" in problems["ln_d"]
    assert "eps 1e-05 is not a non-negative integer" in problems["ln_eps"]
    assert "slice 3:3:1 of an axis of 4 is not resolved" in problems["sl"]


def test_transformer_bounds_by_hand() -> None:
    from fxquant.fixed_point import exp_table_size
    from fxquant.integer_graph import layernorm_h_bound

    # <8,4>: (E + 1) ln2 2^4 = 177.4...: entries 0..178 (index 178 is the first zero)
    assert exp_table_size(F(8, 4)) == 179 and exp_table_size(F(6, 4)) == 64 and exp_table_size(F(8, -2)) == 4
    assert legality.layernorm_d_bound(768, 16, 0) == 768**3 * 65535**2 // 4 < 2**62
    assert legality.layernorm_d_bound(1626, 16, 0) >= 2**62 > legality.layernorm_d_bound(1625, 16, 0)
    m = GraphMaker((4, 8), F(8, 4))
    sm = m.softmax("sm", "input", F(8, 7))
    ln = m.layernorm("ln", sm, F(8, 6), F(8, 4), bias=False)
    emb_ids = m.input("ids", (4,), F(5, 0))
    m.embedding("emb", emb_ids, 10, 3, F(8, 6), out_fmt=F(8, 3))
    g = m.graph(ln, "emb")
    ops = {op.name: op for op in g.ops}
    assert g.accumulator_bound(ops["sm"]) == 8 << 15
    gamma_max = int(np.abs(ops["ln"].weight).max())
    assert g.accumulator_bound(ops["ln"]) == gamma_max * layernorm_h_bound(8)
    assert layernorm_h_bound(8) >= math.isqrt(7 << 32) + 1  # sqrt(n - 1) at 16 fractional bits
    assert g.accumulator_bound(ops["emb"]) == int(np.abs(ops["emb"].weight).max())
    assert legality.requantize_shift(g, ops["sm"]) == -(15 + 4)  # e * r at K = E + FL_out + G
    assert legality.requantize_shift(g, ops["ln"]) == 4 - (6 + 16)
    assert legality.requantize_shift(g, ops["emb"]) == 3 - 6
    assert legality.transformer_problems(g) == []


def test_a_target_without_the_transformer_kinds_refuses_them_by_kind() -> None:
    """A target that does not declare the kinds names each op by kind (its check must not crash on them)."""
    from fxquant.integer_graph import OP_KINDS
    from tests.conformance.reference_target import ReferenceTarget

    class NoTransformer(ReferenceTarget):
        name = "no-transformer"
        ops = frozenset(OP_KINDS) - {"embedding", "softmax", "layernorm", "slice"}

    graph = _transformer_graph()
    problems = NoTransformer().check(graph)
    by_kind = {p.layer for p in problems if "is not supported by target" in p.reason}
    assert by_kind == {op.name for op in graph.ops}, problems


@pytest.mark.parametrize("target_name", ["onnx-qdq", "qonnx", "cpu", "cuda", "fpga"])
def test_every_target_names_every_illegal_transformer_op(target_name: str) -> None:
    """Every registered target declares the kinds now: its check lists each offender at once."""
    from fxquant.backends.registry import get_target

    graph = _transformer_graph()
    named = {p.layer for p in get_target(target_name).check(graph)}
    assert {op.name for op in graph.ops} <= named, named
