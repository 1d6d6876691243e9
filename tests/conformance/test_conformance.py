"""Every zoo case on every registry target, against the integer reference (``IntegerGraph.run``).

The model is ONNX's backend test suite: one set of cases (:mod:`tests.conformance.zoo`), one
small interface per backend (:class:`fxquant.backends.base.Target`), and what a target cannot do
declared as data in :data:`EXPECTED_UNSUPPORTED` -- never skipped. For each ``<case>-<target>``:

* not declared: ``check`` finds no problem, ``export`` is bit-exact (report and an independent
  re-run, :func:`harness.assert_bit_exact`);
* declared: ``check`` lists problems, one of which matches the declared reason (a regular
  expression), and ``export`` raises :class:`UnsupportedOpError` leaving nothing behind. A
  declared case that now builds fails too, so the table stays true.

A target whose ``unavailable()`` is not ``None`` is skipped with that reason, except the targets
in :data:`MUST_RUN`, whose toolchains this project's machines and CI always have: for them a
missing toolchain is a failure.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import numpy as np
import pytest

from fxquant.backends.registry import TARGETS, get_target
from tests.conformance.harness import assert_bit_exact, assert_refused
from tests.conformance.zoo import CASES, TRANSFORMER_CASES

MUST_RUN = ("onnx-qdq", "qonnx", "cpu", "cuda", "fpga")
"""Targets whose ``unavailable()`` must be ``None`` wherever the suite runs (CUDA: codegen + llvm check)."""

_ACT8 = r"-bit (output|input); this target holds 2-8-bit activations"
_W8 = r"-bit weights; this target holds 2-8 bits"
_INT32 = r"worst-case accumulator \d+ exceeds (the )?int32"

EXPECTED_UNSUPPORTED: dict[tuple[str, str], str] = {
    # (case name pattern (fnmatch), target name or "*"): regex one of check's problems must match
    # -- the vision-zoo ops (issue 13): every target builds them; tables on 12-bit inputs need
    # -- activations wider than the int8 kernels of cpu and cuda
    ("lut_activations", "cuda"): _ACT8,
    # -- qonnx: biases are float32 initializers
    ("linear_wide_bias", "qonnx"): r"bias is not exactly representable in float32",
    # -- cpu: int8 activations, int32 accumulators
    ("mixed", "cpu"): _ACT8,
    ("fpga_residual", "cpu"): _ACT8,
    ("lut_activations", "cpu"): _ACT8,
    ("fpga_mlp", "cpu"): _ACT8,
    ("fpga_cnn", "cpu"): _ACT8,
    ("requantize_extremes", "cpu"): _ACT8,
    ("widths_9_to_16", "cpu"): _ACT8,
    ("linear_acc_*_int32", "cpu"): _ACT8,
    ("conv_acc_near_int32", "cpu"): _ACT8,
    ("linear_w16_acc_over_int32", "cpu"): _INT32,
    # -- cuda: int8 weights; int8 activations, int16 (9..16 bits) only between the kernels that take it
    ("fpga_residual", "cuda"): _W8,
    ("fpga_mlp", "cuda"): _W8,
    ("fpga_cnn", "cuda"): _ACT8,
    ("widths_9_to_16", "cuda"): _ACT8,
    ("linear_acc_*_int32", "cuda"): _ACT8,
    ("conv_acc_near_int32", "cuda"): _ACT8,
    ("linear_w16_acc_*_int32", "cuda"): _W8,
    # -- transformers (issue 14)
    # -- onnx-qdq: builds every transformer case (softmax and layernorm as exact int64 subgraphs)
    # -- qonnx: float ONNX + Quant has no bit-exact softmax or layernorm (embedding and slice build)
    **{(case, "qonnx"): r"QONNX has no exact integer (softmax|LayerNorm)"
       for case in ("attention_head", "causal_attention", "layernorm_block", "transformer_block")},
    # -- cpu: every transformer kind has a kernel; activations stay 2..8 bits (a 10-bit tied head, a 16-bit
    # -- LayerNorm input; a 9-bit softmax output is the one wider value, uint8 storage)
    **{(case, "cpu"): _ACT8 for case in ("embedding_lookup", "layernorm_block")},
    # -- cuda: builds every transformer case (9..16-bit values in int16 where both kernels take it)
    # -- fpga: builds every transformer case
}
"""What each target cannot build, as data (like ``onnx.backend.test.BackendTest.exclude``)."""

TARGET_OPTIONS: dict[str, dict[str, object]] = {}
"""Build options the suite passes per target (none: every target is tested as the CLI builds it)."""


def declared_refusal(case: str, target: str) -> str | None:
    """The declared reason regex of ``case`` on ``target`` (several matching entries: joined by ``|``)."""
    reasons = [why for (pattern, t), why in EXPECTED_UNSUPPORTED.items()
               if t in (target, "*") and fnmatch.fnmatchcase(case, pattern)]
    return "|".join(f"(?:{r})" for r in reasons) or None


PAIRS = [(case, target) for case in CASES for target in TARGETS]


def _target(name: str):
    target = get_target(name)
    why = target.unavailable()
    if why is not None:
        if name in MUST_RUN:
            pytest.fail(f"target {name!r} must run here but is unavailable: {why}")
        pytest.skip(f"target {name!r} unavailable on this machine: {why}")
    return target


@pytest.mark.parametrize(("case", "target_name"), PAIRS, ids=[f"{c}-{t}" for c, t in PAIRS])
def test_case_on_target(case: str, target_name: str, tmp_path: Path) -> None:
    target = _target(target_name)
    graph, inputs = CASES[case].build()
    options = TARGET_OPTIONS.get(target_name, {})
    problems = target.check(graph, **options)
    declared = declared_refusal(case, target_name)
    if declared is None:
        assert not problems, (f"{target_name} refuses {case!r}, which EXPECTED_UNSUPPORTED does not declare: "
                              + "; ".join(map(str, problems)))
        assert_bit_exact(target, graph, inputs, tmp_path, **options)
        return
    assert problems, (f"EXPECTED_UNSUPPORTED declares {case!r} unsupported on {target_name} ({declared}), but "
                      "check finds no problem: remove the entry")
    assert any(re.search(declared, str(p), re.IGNORECASE) for p in problems), (
        f"{target_name} refuses {case!r}, but not for the declared reason /{declared}/: "
        + "; ".join(map(str, problems)))
    assert_refused(target, graph, inputs, tmp_path, problems, **options)


def test_expected_unsupported_names_real_cases_and_targets() -> None:
    """Every entry matches at least one zoo case and names a registered target (no dead entries)."""
    for pattern, target in EXPECTED_UNSUPPORTED:
        assert target == "*" or target in TARGETS, f"no target {target!r}"
        assert fnmatch.filter(CASES, pattern), f"pattern {pattern!r} matches no zoo case"
        re.compile(EXPECTED_UNSUPPORTED[pattern, target])


@pytest.mark.parametrize("name", MUST_RUN)
def test_must_run_targets_are_registered_and_available(name: str) -> None:
    assert name in TARGETS
    assert get_target(name).unavailable() is None


def _two_bad_pools():
    """Two tables on 13-bit inputs (beyond MAX_LUT_BITS) on two branches: every target must name
    both (check lists all at once), whether it lacks tables or refuses their width."""
    from fxquant.fixed_point import MAX_LUT_BITS
    from tests.conformance.zoo import F, GraphMaker

    bits = MAX_LUT_BITS + 1
    m = GraphMaker((2, 3, 3), F(bits, 8), seed=50)
    attrs = {"function": "sigmoid", "params": {}, "table": np.zeros(1 << bits, np.int64)}
    for name, src in (("avg_a", "input"), ("avg_b", m.relu("relu", "input"))):
        m._op(name, "lut", (src,), (2, 3, 3), F(8, 7), attrs=attrs)
    return m.graph(m.add("add", "avg_a", "avg_b", F(8, 3), relu=False))


@pytest.mark.parametrize("target_name", list(TARGETS))
def test_check_names_every_offending_layer(target_name: str) -> None:
    problems = get_target(target_name).check(_two_bad_pools())
    assert {"avg_a", "avg_b"} <= {p.layer for p in problems}, problems


KNOWN_CHECK_GAPS: dict[str, str] = {
    "cpu": "CpuTarget.check stops at the activation widths of a 16-bit input and does not list the int32 "
           "accumulator overflow of the same layer (kernel_problems bounds it as an int8 kernel)",
}
"""Targets whose ``check`` misses a problem it should list: strict xfails, so a fix shows up."""


@pytest.mark.parametrize("target_name", [n for n in TARGETS if get_target(n).limits.get("acc_bits") == 32])
def test_check_lists_the_accumulator_beside_the_widths(target_name: str, request: pytest.FixtureRequest) -> None:
    """A 16-bit x 8-bit linear over int32: a target declaring int32 accumulators lists the
    accumulator even when it also refuses the widths (``check`` lists *every* problem at once)."""
    target = get_target(target_name)
    if target_name in KNOWN_CHECK_GAPS:
        request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN_CHECK_GAPS[target_name]))
    graph, _ = CASES["linear_acc_over_int32"].build()
    assert any(re.search(_INT32, str(p)) and p.layer == "fc" for p in target.check(graph))
