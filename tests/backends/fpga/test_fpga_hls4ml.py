"""Optional second route: QONNX -> hls4ml C-sim, bit-exact against the reference and our C-sim."""

from __future__ import annotations

from pathlib import Path

import hls4ml  # noqa: F401  (hard dependencies: a broken install fails, never skips)
import pytest
import qonnx  # noqa: F401

from fxquant.backends.fpga import generate_project
from fxquant.backends.fpga.hls4ml_route import hls4ml_csim
from fxquant.errors import ExportError

from tests.backends.fpga.fpga_graphs import build_cnn, build_residual

pytestmark = pytest.mark.slow  # imports hls4ml and compiles two projects (~15 s on an idle machine)


def test_hls4ml_agrees_with_reference_and_fxquant(tmp_path: Path) -> None:
    graph, builder = build_cnn()  # mixed 2..16-bit formats, negative FL and FL > BW
    x = builder.inputs(300)
    project = generate_project(graph, tmp_path / "fxq")
    report = hls4ml_csim(graph, tmp_path, x, project_dir=project)
    assert report["n"] == 300 and report["bit_exact"] and report["mismatches"] == 0
    assert report["disagreements_with_fxquant"] == 0


def test_hls4ml_limits_are_export_errors(tmp_path: Path) -> None:
    graph, builder = build_residual()  # grouped conv: not supported by hls4ml 1.3
    with pytest.raises(ExportError, match="hls4ml could not convert"):
        hls4ml_csim(graph, tmp_path, builder.inputs(2))
