"""Two in-test targets that exercise the harness itself (never registered, never in ``docs/``).

:class:`ReferenceTarget` "builds" by saving the graph and "runs" :meth:`IntegerGraph.run`: every
case it accepts must pass. :class:`OffByOneTarget` returns the reference plus one on a single
integer: the verifier in :func:`fxquant.backends.base.export` and the suite's own comparison must
both catch it. Together they show the suite can pass and can fail.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fxquant.backends.base import Problem, Target
from fxquant.integer_graph import OP_KINDS, IntegerGraph
from fxquant.legality import avg_window_problems

GRAPH_FILE = "graph.pkl"


class ReferenceTarget(Target):
    name = "reference"
    summary = "IntegerGraph.run on a pickled graph (harness self-test)"
    ran = "IntegerGraph.run (pickled)"
    ops = frozenset(OP_KINDS)
    limits = {}

    def check_graph(self, graph: IntegerGraph, **options: Any) -> list[Problem]:
        return avg_window_problems(graph, reciprocal=True)

    def build(self, graph: IntegerGraph, out_dir: Path, **options: Any) -> dict[str, Any]:
        (Path(out_dir) / GRAPH_FILE).write_bytes(pickle.dumps(graph))
        return {"files": [GRAPH_FILE]}

    def run(self, out_dir: Path, int_inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        graph: IntegerGraph = pickle.loads((Path(out_dir) / GRAPH_FILE).read_bytes())
        out = graph.run(*int_inputs)
        return [out[name] for name in graph.outputs]


class OffByOneTarget(ReferenceTarget):
    name = "off-by-one"
    ran = "IntegerGraph.run plus one on the last integer of the last output"

    def run(self, out_dir: Path, int_inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        outs = [o.copy() for o in super().run(out_dir, int_inputs)]
        outs[-1].reshape(-1)[-1] += 1
        return outs
