"""``docs/coverage.md`` is the generator's output, and the generator reads the registry only."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxquant.backends import coverage, registry
from fxquant.backends.base import COVERAGE_DOC
from fxquant.integer_graph import OP_KINDS

ROOT = Path(__file__).resolve().parents[2]


def test_coverage_doc_is_the_generators_output() -> None:
    doc = (ROOT / COVERAGE_DOC).read_text()
    assert doc == coverage.render(), f"{COVERAGE_DOC} is stale: run `{coverage.GENERATOR}`"


def _row(text: str, first_cell: str) -> list[str]:
    (line,) = [l for l in text.splitlines() if l.startswith(f"| {first_cell} |")]
    return [c.strip() for c in line.strip("|").split("|")][1:]


def test_table_follows_each_targets_declared_ops_and_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new registry line is a new column, filled from that class's ``ops`` and ``limits``."""
    from tests.conformance.reference_target import ReferenceTarget

    class NoCat(ReferenceTarget):
        name = "no-cat"
        summary = "reference without cat"
        ops = frozenset(OP_KINDS) - {"cat"}
        limits = {"act_bits": (3, 7)}

    monkeypatch.setitem(registry.TARGETS, "no-cat", f"{__name__}:NoCat")
    monkeypatch.setitem(registry._cache, "no-cat", NoCat())
    text = coverage.render()
    header = _row(text, "op kind")
    assert header[-1] == "`no-cat`" and len(header) == len(registry.TARGETS)
    for kind in OP_KINDS:
        assert _row(text, f"`{kind}`")[-1] == (coverage.NO if kind == "cat" else coverage.YES), kind
    assert _row(text, "`act_bits`")[-1] == "3–7"
    assert _row(text, "`acc_bits`")[-1] == coverage.NO
    assert "reference without cat." in text


def test_every_registered_target_and_op_kind_is_in_the_doc() -> None:
    doc = (ROOT / COVERAGE_DOC).read_text()
    assert _row(doc, "op kind") == [f"`{name}`" for name in registry.TARGETS]
    for kind in OP_KINDS:
        cells = _row(doc, f"`{kind}`")
        assert cells == [coverage.YES if kind in registry.get_target(t).ops else coverage.NO
                         for t in registry.TARGETS], kind
