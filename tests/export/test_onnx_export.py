"""export_onnx: files, report, atomic writes, error cases."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from tests.export.integer_graphs import cnn, sample_inputs

from fxquant.errors import RunDirError, UsageError
from fxquant.export.onnx_qdq import export_onnx


def test_writes_each_flavour_and_merges_the_report(tmp_path: Path) -> None:
    graph = cnn()
    x = sample_inputs(graph, n=8)
    reports = {fl: export_onnx(graph, tmp_path, flavour=fl, verify_inputs=x) for fl in ("qdq", "qonnx", "fp32")}
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["export_report.json", "model.fp32.onnx", "model.onnx", "model.qonnx.onnx"]
    on_disk = json.loads((tmp_path / "export_report.json").read_text())
    assert set(on_disk) == {"qdq", "qonnx", "fp32"}
    for fl, rep in reports.items():
        assert on_disk[fl] == rep and rep["flavour"] == fl and rep["n"] == 8
        assert rep["size_bytes"] == Path(rep["path"]).stat().st_size
        assert rep["theoretical_bytes"] == graph.param_bits() / 8
    assert reports["qdq"]["bit_exact"] and reports["qonnx"]["bit_exact"] and not reports["fp32"]["bit_exact"]
    assert onnx.load(tmp_path / "model.onnx").opset_import[0].version == 21


def test_opset_is_passed_through(tmp_path: Path) -> None:
    rep = export_onnx(cnn(), tmp_path, flavour="qdq", opset=17)
    assert rep["opset"] == 17


def test_unknown_flavour_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="'tflite'"):
        export_onnx(cnn(), tmp_path, flavour="tflite")


def test_unwritable_directory_is_a_run_dir_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match="cannot write"):
        export_onnx(cnn(), blocker / "out")


def test_corrupt_report_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "export_report.json").write_text("{not json")
    with pytest.raises(RunDirError, match="unreadable"):
        export_onnx(cnn(), tmp_path)
    assert not (tmp_path / "model.onnx").exists()
