"""The zoo covers what the conformance suite promises: every op kind, widths 2..16, FL < 0 and
FL > BW, saturating inputs and ties, accumulators at the int32 edge; cases are reproducible."""

from __future__ import annotations

import math
import re

import numpy as np

from fxquant.backends.base import graph_fingerprint
from fxquant.integer_graph import OP_KINDS
from fxquant.legality import int_max
from tests.conformance.zoo import CASES

INT32_MAX = int_max(32)


def _graphs():
    return {name: case.build()[0] for name, case in CASES.items()}


def test_every_op_kind_has_a_case() -> None:
    used = {op.kind for g in _graphs().values() for op in g.ops}
    assert set(OP_KINDS) - used == set(), f"op kinds without a zoo case: {sorted(set(OP_KINDS) - used)}"


def test_conv_attributes_and_pool_windows_are_covered() -> None:
    convs = [op.attrs for g in _graphs().values() for op in g.ops if op.kind == "conv2d"]
    assert any(tuple(a.get("stride", (1, 1))) not in ((1, 1),) for a in convs)
    assert any(len(set(a.get("stride", (1, 1)))) == 2 for a in convs), "no conv with unequal strides"
    assert any(tuple(a.get("padding", (0, 0))) not in ((0, 0), (1, 1)) for a in convs)
    assert any(tuple(a.get("dilation", (1, 1))) != (1, 1) for a in convs)
    assert any(a.get("groups", 1) > 1 for a in convs)
    pools = [(op.kind, op.attrs) for g in _graphs().values() for op in g.ops if op.kind.endswith("pool2d")]
    for kind in ("avgpool2d", "maxpool2d"):
        assert any(tuple(a.get("stride", a["kernel"])) != tuple(a["kernel"]) for k, a in pools if k == kind), kind
    assert any(tuple(a.get("padding", (0, 0))) != (0, 0) for k, a in pools if k == "maxpool2d")


def test_two_input_ops_see_different_formats() -> None:
    graphs = _graphs()
    for kind in ("add", "cat", "matmul"):
        assert any(len({g.values[i].fmt for i in op.inputs}) > 1
                   for g in graphs.values() for op in g.ops if op.kind == kind), kind
    assert any(op.kind == "matmul" and op.inputs[0] != op.inputs[1] for g in graphs.values() for op in g.ops)
    assert any(len(g.inputs) > 1 for g in graphs.values())


def test_every_width_and_frac_bits_corner() -> None:
    acts = {v.fmt for g in _graphs().values() for v in g.values.values()}
    weights = {op.weight_fmt for g in _graphs().values() for op in g.ops if op.weight_fmt is not None}
    for what, fmts in (("activation", acts), ("weight", weights)):
        assert set(range(2, 17)) - {f.bits for f in fmts} == set(), what
        assert any(f.frac_bits < 0 for f in fmts), f"no {what} with FL < 0"
        assert any(f.frac_bits > f.bits for f in fmts), f"no {what} with FL > BW"


def test_inputs_saturate_and_tie() -> None:
    """Every input saturates and ties, except token ids: they are checked, never clipped, so they
    span their valid range ``[0, V)`` exactly (both ends) as integers instead."""
    for name, case in CASES.items():
        graph, xs = case.build()
        assert len(xs) == len(graph.inputs), name
        vocab = {op.inputs[0]: op.weight.shape[0] for op in graph.ops if op.kind == "embedding"}
        for v, x, k in zip(graph.inputs, xs, graph.quantize_inputs(*xs)):
            if v.name in vocab:
                assert np.array_equal(x, k) and k.min() == 0 and k.max() == vocab[v.name] - 1, f"{name}: {v.name}"
                continue
            assert (k == v.fmt.qmin).any() and (k == v.fmt.qmax).any(), f"{name}: input {v.name} never saturates"
            scaled = np.ldexp(x, v.fmt.frac_bits)
            assert (scaled - np.floor(scaled) == 0.5).any(), f"{name}: input {v.name} has no rounding tie"


def test_some_requantize_rounds_an_exact_tie() -> None:
    """Round half to even is only tested where an accumulator sits exactly half-way between two steps."""
    from fxquant.legality import requantize_shift

    ties = set()
    for name, case in CASES.items():
        graph, xs = case.build()
        if name == "avgpool_3x3":
            continue
        env = graph.run(*graph.quantize_inputs(*xs), keep_all=True)
        for op in graph.ops:
            shift = requantize_shift(graph, op)
            if op.kind == "requantize" and shift is not None and shift < 0:
                k = env[op.inputs[0]]
                if ((k % (1 << -shift)) == (1 << (-shift - 1))).any():
                    ties.add(name)
    assert "elementwise" in ties and len(ties) >= 5, ties


def test_accumulator_edge_cases() -> None:
    graphs = _graphs()
    for name, g in graphs.items():
        bound = max(g.accumulator_bound(op) for op in g.ops)
        if name.endswith("near_int32"):
            assert INT32_MAX - (1 << 23) < bound <= INT32_MAX, (name, bound)
        if name.endswith("over_int32"):
            assert INT32_MAX < bound <= INT32_MAX + (1 << 23), (name, bound)
    assert any(n.endswith("near_int32") for n in graphs) and any(n.endswith("over_int32") for n in graphs)


def test_saturated_sample_reaches_the_near_int32_bound() -> None:
    """Sample 0 saturates to qmin everywhere: with weights of -128 the accumulator is the bound itself."""
    for name in ("linear_acc_near_int32", "linear_w16_acc_near_int32"):
        graph, xs = CASES[name].build()
        (k,) = graph.quantize_inputs(*xs)
        (op,) = graph.ops
        acc = int(k[0].astype(np.int64) @ op.weight[0].astype(np.int64))
        assert acc == graph.accumulator_bound(op) == 511 << 22, name


def test_names_make_unambiguous_ids_and_builds_are_reproducible() -> None:
    for name, case in CASES.items():
        assert re.fullmatch(r"[a-z0-9_]+", name), name  # ids are <case>-<target>; target names hold '-'
        (g1, x1), (g2, x2) = case.build(), case.build()
        assert g1 is not g2 and graph_fingerprint(g1) == graph_fingerprint(g2), name
        assert all(np.array_equal(a, b) for a, b in zip(x1, x2, strict=True)), name
        assert all(x.shape[0] >= 3 for x in x1), name


MAX_OPS = 12
MORE_OPS = {"transformer_block": 14}
"""Cases allowed more ops, by name: an encoder block is LN, q/k/v, K^T, two matmuls, softmax, two adds,
LN and a three-op MLP (14); every target refuses it by op kind before building anything."""


def test_graphs_are_tiny() -> None:
    """TVM, nvcc and g++ builds dominate the suite's runtime: no case may grow big unnoticed."""
    for name, g in _graphs().items():
        assert len(g.ops) <= MORE_OPS.get(name, MAX_OPS), name
        assert sum(op.weight.size for op in g.ops if op.weight is not None) <= 20_000, name
        assert max(math.prod(v.shape) for v in g.values.values()) <= 4096, name
