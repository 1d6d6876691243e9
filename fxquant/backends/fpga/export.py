"""``fxquant export --target fpga``: generate the HLS project, C-simulate it, estimate resources.

Runs :func:`.codegen.generate_project`, then :func:`.csim.run_csim` on the given integer inputs
(bit-exact check against :meth:`IntegerGraph.run`), then :func:`.estimates.estimate`, and writes
everything to ``out_dir/fpga_report.json`` (temp file + ``os.replace``, so a reader never sees a
half-written report). A C-simulation mismatch raises :class:`~fxquant.errors.ExportError` after the
report is written.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fxquant.errors import ExportError
from fxquant.integer_graph import IntegerGraph

from .codegen import TOP, generate_project
from .csim import run_csim
from .estimates import estimate
from .plan import plan_graph

REPORT_NAME = "fpga_report.json"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to ``path`` through a temp file in the same directory and ``os.replace``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_fpga(graph: IntegerGraph, out_dir: Path, *, part: str = "xcu250-figd2104-2L-e", clock_ns: float = 5.0,
                reuse: int = 1, io: str = "parallel", int_inputs: np.ndarray) -> dict[str, Any]:
    """Generate + C-simulate + estimate; write and return the ``fpga_report.json`` content.

    Top-level ``path``, ``bit_exact``, ``n`` and ``mismatches`` summarize ``csim`` (the keys every
    exporter's report shares); ``estimates`` holds the analytic model's numbers.
    """
    out_dir = Path(out_dir)
    generate_project(graph, out_dir, part=part, clock_ns=clock_ns, reuse=reuse, io=io, test_inputs=int_inputs)
    csim = run_csim(out_dir, graph, int_inputs)
    report = {"target": "fpga", "path": str(out_dir.resolve()), "bit_exact": csim["bit_exact"], "n": csim["n"],
              "mismatches": csim["mismatches"], "top": TOP, "part": part, "clock_ns": clock_ns, "reuse": reuse,
              "io": io, "csim": csim,
              "estimates": estimate(plan_graph(graph), part=part, clock_ns=clock_ns, reuse=reuse, io=io)}
    write_json_atomic(out_dir / REPORT_NAME, report)
    if not csim["bit_exact"]:
        raise ExportError(f"FPGA C-simulation differs from the integer reference on {csim['mismatches']} of "
                          f"{csim['n']} inputs (first: {csim['first_mismatch']})",
                          f"see {out_dir / REPORT_NAME}")
    return report
