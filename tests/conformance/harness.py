"""The two outcomes a (graph, target) pair may have, as assertions shared by every conformance test.

* :func:`assert_bit_exact` — ``base.export`` succeeds, its report says bit-exact in the schema's
  terms, and an independent ``target.run`` of the placed artifact equals ``IntegerGraph.run``
  (the verifier is not the only judge).
* :func:`assert_refused` — ``target.check`` lists problems that name layers of the graph,
  ``base.export`` raises :class:`UnsupportedOpError` naming every one, nothing is left behind and
  an earlier artifact at the destination is left as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

from fxquant.backends import base
from fxquant.backends.base import Problem, Target
from fxquant.errors import UnsupportedOpError
from fxquant.integer_graph import IntegerGraph

ARTIFACT = "artifact"


def reference_outputs(graph: IntegerGraph, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    ref = graph.run(*graph.quantize_inputs(*inputs))
    return [ref[name] for name in graph.outputs]


def assert_same_integers(got: Sequence[np.ndarray], want: Sequence[np.ndarray], outputs: Sequence[str],
                         what: str) -> None:
    """``got`` equals ``want`` output by output: same count, shape, integer dtype and every integer."""
    assert len(got) == len(want), f"{what}: {len(got)} outputs, the graph has {len(want)}"
    for name, g, w in zip(outputs, got, want):
        g = np.asarray(g)
        assert np.issubdtype(g.dtype, np.integer), f"{what}: output {name!r} has dtype {g.dtype}, not integers"
        assert g.shape == w.shape, f"{what}: output {name!r} has shape {g.shape}, the reference {w.shape}"
        bad = np.argwhere(g.astype(np.int64) != w)
        assert bad.size == 0, (f"{what}: output {name!r} differs at {len(bad)} of {w.size} integers, first at "
                               f"{tuple(bad[0])}: expected {w[tuple(bad[0])]}, got {g[tuple(bad[0])]}")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{ARTIFACT}."))


def assert_bit_exact(target: Target, graph: IntegerGraph, inputs: Sequence[np.ndarray], tmp_path: Path,
                     **options: object) -> dict:
    """Export ``graph`` for ``target`` into ``tmp_path`` and check the result twice (see module doc)."""
    out = tmp_path / ARTIFACT
    report = base.export(target, graph, out, inputs, **options)
    n = int(np.asarray(inputs[0]).shape[0])
    v = report["verification"]
    assert report["schema"] == base.REPORT_SCHEMA and report["target"] == target.name
    assert report["graph_fingerprint"] == base.graph_fingerprint(graph)
    assert v["ran"] == target.ran and v["n"] == n, v
    assert (v["mismatches"], v["mismatched_elements"], v["first_mismatch"], v["bit_exact"]) == (0, 0, None, True), v
    assert report["bit_exact"] is True and report["reference_check"] is None
    assert json.loads((out / base.REPORT_FILE).read_text()) == json.loads(json.dumps(report))
    assert _leftovers(tmp_path) == []
    # the placed artifact, run again by the suite, against the reference computed by the suite
    ints = graph.quantize_inputs(*inputs)
    got = target.run(out, [x.copy() for x in ints])
    assert_same_integers(got, reference_outputs(graph, inputs), graph.outputs, f"{target.name} artifact")
    assert base.verified_artifact(target, graph, out) == json.loads(json.dumps(report))
    return report


GRAPH_LAYER = "graph"
"""The layer name of a problem of the whole graph (e.g. its number of inputs)."""


def problem_layers(graph: IntegerGraph) -> set[str]:
    """Names a problem may carry: every op, every graph input, and ``graph`` for the whole graph."""
    return {op.name for op in graph.ops} | {v.name for v in graph.inputs} | {GRAPH_LAYER}


def assert_refused(target: Target, graph: IntegerGraph, inputs: Sequence[np.ndarray], tmp_path: Path,
                   problems: list[Problem], **options: object) -> None:
    """``problems`` (non-empty, from ``check``) name the graph's layers; export raises listing them all."""
    assert problems, f"{target.name} refuses nothing"
    assert all(isinstance(p, Problem) for p in problems), problems
    unknown = [p for p in problems if p.layer not in problem_layers(graph)]
    assert not unknown, f"problems naming no layer of the graph: {unknown}"
    kinds = {op.name: op.kind for op in graph.ops}
    wrong_kind = [p for p in problems if p.layer in kinds and p.kind != kinds[p.layer]]
    assert not wrong_kind, f"problems with the wrong op kind: {wrong_kind}"
    out = tmp_path / ARTIFACT
    with pytest.raises(UnsupportedOpError) as err:
        base.export(target, graph, out, inputs, **options)
    message = str(err.value)
    missing = [str(p) for p in problems if str(p) not in message]
    assert not missing, f"export's error does not list {missing}: {message}"
    assert not out.exists() and _leftovers(tmp_path) == []
    # an earlier artifact at out_dir survives a refused export untouched
    out.mkdir()
    (out / "earlier").write_text("earlier artifact")
    with pytest.raises(UnsupportedOpError):
        base.export(target, graph, out, inputs, **options)
    assert [p.name for p in out.iterdir()] == ["earlier"] and _leftovers(tmp_path) == []
