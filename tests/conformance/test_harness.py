"""The harness can pass and can fail: a target that computes the reference passes every zoo case
it accepts; a target off by one integer is caught by the verifier *and* by the suite's own check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fxquant.backends import base
from fxquant.errors import ExportError
from tests.conformance.harness import ARTIFACT, assert_bit_exact, assert_refused, assert_same_integers
from tests.conformance.reference_target import OffByOneTarget, ReferenceTarget
from tests.conformance.test_conformance import EXPECTED_UNSUPPORTED, declared_refusal
from tests.conformance.zoo import CASES


@pytest.mark.parametrize("case", list(CASES))
def test_reference_target_passes_the_zoo(case: str, tmp_path: Path) -> None:
    target = ReferenceTarget()
    graph, inputs = CASES[case].build()
    assert target.check(graph) == []
    assert_bit_exact(target, graph, inputs, tmp_path)


def test_reference_target_refuses_through_the_shared_rules(tmp_path: Path) -> None:
    """The refusal path of the harness on a graph no target may build (tables on 13-bit inputs)."""
    from tests.conformance.test_conformance import _two_bad_pools

    graph = _two_bad_pools()
    target = ReferenceTarget()
    problems = target.check(graph)
    assert {p.layer for p in problems} == {"avg_a", "avg_b"}
    assert_refused(target, graph, [np.zeros((2, *graph.inputs[0].shape))], tmp_path, problems)


def test_off_by_one_is_caught_by_the_verifier(tmp_path: Path) -> None:
    graph, inputs = CASES["mlp"].build()
    with pytest.raises(ExportError, match="1 of 8 samples differ"):
        base.export(OffByOneTarget(), graph, tmp_path / ARTIFACT, inputs)
    assert list(tmp_path.iterdir()) == []


def test_off_by_one_is_caught_by_the_suites_own_comparison(tmp_path: Path) -> None:
    graph, inputs = CASES["cnn"].build()
    target = OffByOneTarget()
    target.build(graph, tmp_path)
    ints = graph.quantize_inputs(*inputs)
    ref = graph.run(*ints)
    with pytest.raises(AssertionError, match="differs at 1 of"):
        assert_same_integers(target.run(tmp_path, ints), [ref[n] for n in graph.outputs], graph.outputs, "t")
    with pytest.raises(AssertionError, match="dtype float64"):
        assert_same_integers([ref[n].astype(np.float64) for n in graph.outputs],
                             [ref[n] for n in graph.outputs], graph.outputs, "t")


def test_refusal_check_rejects_problems_naming_no_layer(tmp_path: Path) -> None:
    graph, inputs = CASES["avgpool_3x3"].build()
    with pytest.raises(AssertionError, match="naming no layer"):
        assert_refused(ReferenceTarget(), graph, inputs, tmp_path, [base.Problem("nope", "avgpool2d", "x")])
    with pytest.raises(AssertionError, match="refuses nothing"):
        assert_refused(ReferenceTarget(), graph, inputs, tmp_path, [])


def test_declared_refusal_matches_patterns_and_wildcards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EXPECTED_UNSUPPORTED, ("conv_*", "fpga"), "groups")
    monkeypatch.setitem(EXPECTED_UNSUPPORTED, ("conv_g*", "fpga"), "dilation")
    assert declared_refusal("conv_groups", "fpga") == "(?:groups)|(?:dilation)"
    assert declared_refusal("conv_dilation", "fpga") == "(?:groups)"
    assert declared_refusal("xconv_groups", "fpga") is None
    assert declared_refusal("linear_wide_bias", "qonnx") == f"(?:{EXPECTED_UNSUPPORTED['linear_wide_bias', 'qonnx']})"
    assert declared_refusal("mlp", "cpu") is None
