"""End to end: train the digits CNN for one epoch, lower it through the run directory
(``fxquant.deployment.load_integer_graph``), export every ONNX flavour with ``export_onnx`` and check
QDQ and QONNX bit-exact on held-out digits, with a fully integer graph after onnxruntime's fusion."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from fxquant.export.onnx_qdq import export_onnx
from fxquant.export.verify import session
from tests.helpers import trained_digits_run



@pytest.mark.slow
def test_trained_digits_cnn_exports_bit_exact(tmp_path: Path) -> None:
    run = tmp_path / "run"
    graph, x = trained_digits_run(run, 8, 200)
    out = run / "export"
    reports = {fl: export_onnx(graph, out, flavour=fl, verify_inputs=x) for fl in ("qdq", "qonnx", "fp32")}
    for fl in ("qdq", "qonnx"):
        report = reports[fl]
        assert report["n"] == 200 and report["bit_exact"] and report["top1_agreement"] == 1.0
    assert reports["fp32"]["top1_agreement"] > 0.9
    optimized = tmp_path / "optimized.onnx"
    session(onnx.load(out / "model.onnx"), optimized_path=str(optimized))
    ops = [n.op_type for n in onnx.load(optimized).graph.node]
    assert ops.count("QuantizeLinear") == 1 == ops.count("DequantizeLinear")
    assert "QLinearConv" in ops and "QGemm" in ops and not {"Conv", "Gemm"} & set(ops)
