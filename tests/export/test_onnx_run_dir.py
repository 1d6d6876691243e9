"""End to end: train the digits CNN for one epoch, load its deployment (trained fake-quant model and
integer graph), export onnx-qdq and qonnx through the backend contract with the reference check,
and refuse an integer graph that is one weight LSB away from the trained model."""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import pytest

from fxquant.backends import base
from fxquant.backends.registry import get_target
from fxquant.deployment import Deployment, load_deployment
from fxquant.errors import ExportError
from fxquant.export.verify import session
from fxquant.integer_graph import IntegerGraph
from tests.helpers import trained_digits_run

N = 200


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Deployment:
    run = tmp_path_factory.mktemp("digits") / "run"
    trained_digits_run(run, 8, 1)
    return load_deployment(run)


def perturbed(graph: IntegerGraph) -> IntegerGraph:
    """A copy with conv1's first weight moved by one LSB (towards zero at the format's edge)."""
    graph = copy.deepcopy(graph)
    op = graph.ops[0]
    assert op.kind == "conv2d" and op.weight is not None and op.weight_fmt is not None
    w = op.weight.reshape(-1)
    w[0] += -1 if w[0] == op.weight_fmt.qmax else 1
    return graph


@pytest.mark.slow
@pytest.mark.parametrize("name", ["onnx-qdq", "qonnx"])
def test_trained_digits_cnn_exports_bit_exact(deployment: Deployment, name: str, tmp_path: Path) -> None:
    x, _ = deployment.held_out(N)
    report = base.export(get_target(name), deployment.graph, tmp_path / name, [x], model=deployment.model)
    reference, verification = report["reference_check"], report["verification"]
    assert reference["n"] == N and reference["mismatched_elements"] == 0 and reference["bit_exact"]
    assert verification["n"] == N and verification["mismatched_elements"] == 0 and report["bit_exact"] is True
    if name == "onnx-qdq":
        optimized = tmp_path / "optimized.onnx"
        session(tmp_path / name / "model.onnx", optimized_path=str(optimized))
        ops = [n.op_type for n in onnx.load(optimized).graph.node]
        assert ops.count("QuantizeLinear") == 1 == ops.count("DequantizeLinear")
        assert "QLinearConv" in ops and "QGemm" in ops and not {"Conv", "Gemm"} & set(ops)


@pytest.mark.slow
def test_a_wrong_integer_graph_is_refused_by_the_reference_check(deployment: Deployment, tmp_path: Path) -> None:
    x, _ = deployment.held_out(N)
    with pytest.raises(ExportError, match="the integer graph does not compute what the trained model computes"):
        base.export(get_target("onnx-qdq"), perturbed(deployment.graph), tmp_path / "onnx-qdq", [x],
                    model=deployment.model)
    assert list(tmp_path.iterdir()) == []
