"""QONNX export: validity, bit-exactness (lowered to standard ops in ORT, and the qonnx package)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from tests.export.integer_graphs import (F, GraphMaker, cnn, matmul_graph, mixed, mlp, reshaped, residual,
                                        sample_inputs)

from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.util.cleanup import cleanup_model

from fxquant.errors import UnsupportedOpError, UsageError
from fxquant.export.onnx_qdq import check_artifact
from fxquant.export.qonnx import QONNX_DOMAIN, lower_quant, to_qonnx
from fxquant.export.verify import verify_onnx

GRAPHS = {"mlp": mlp, "cnn": cnn, "residual": residual, "mixed": mixed, "matmul": matmul_graph,
          "reshaped": reshaped}


@pytest.mark.parametrize("name", GRAPHS)
def test_qonnx_is_valid_and_bit_exact(name: str) -> None:
    graph = GRAPHS[name]()
    model = to_qonnx(graph)
    check_artifact(model, name)
    assert model.ir_version <= 10
    assert {o.domain: o.version for o in model.opset_import} == {"": 13, QONNX_DOMAIN: 1}
    report = verify_onnx(model, graph, sample_inputs(graph), "qonnx")
    assert report["mismatches"] == 0 and report["top1_agreement"] == 1.0


def test_quant_nodes_carry_every_format() -> None:
    graph = mixed()
    model = to_qonnx(graph)
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    quants = [n for n in model.graph.node if n.op_type == "Quant"]
    weights = sum(op.weight is not None for op in graph.ops)
    requantizing = sum(op.kind not in ("maxpool2d", "flatten", "relu") for op in graph.ops)
    assert len(quants) == len(graph.inputs) + weights + requantizing
    formats = {(int(consts[n.input[3]]), float(consts[n.input[1]])) for n in quants}
    assert (7, 2.0) in formats and (2, 2.0 ** -3) in formats  # <7,-1> and <2,3>
    for n in quants:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs == {"signed": 1, "narrow": 0, "rounding_mode": b"ROUND"} and n.domain == QONNX_DOMAIN


def test_lowering_rejects_other_quant_forms() -> None:
    model = to_qonnx(mlp())
    node = next(n for n in model.graph.node if n.op_type == "Quant")
    next(a for a in node.attribute if a.name == "signed").i = 0
    with pytest.raises(UnsupportedOpError, match="has no lowering"):
        lower_quant(model)


def test_unrepresentable_bias_raises() -> None:
    m = GraphMaker((4,), F(16, 0))
    graph = m.graph(m.linear("fc", "input", 2, F(16, 0), F(16, 0)))
    graph.ops[0].bias = np.array([(1 << 25) + 1, 0])
    with pytest.raises(UnsupportedOpError, match=r"fc \(linear\): bias is not exactly representable in float32"):
        to_qonnx(graph)


@pytest.mark.parametrize("name", ["cnn", "residual", "mixed"])
def test_qonnx_package_executes_it_bit_exactly(name: str) -> None:
    graph = GRAPHS[name]()
    x = sample_inputs(graph, n=4)
    model = cleanup_model(ModelWrapper(to_qonnx(graph)), override_inpsize=4)
    out = execute_onnx(model, {model.graph.input[0].name: x})[model.graph.output[0].name]
    fmt = graph.values[graph.outputs[0]].fmt
    np.testing.assert_array_equal(np.ldexp(out.astype(np.float64), fmt.frac_bits),
                                  graph.run(*graph.quantize_inputs(x))[graph.outputs[0]])


def test_opset_must_keep_ir_version_10() -> None:
    assert to_qonnx(mlp(), opset=21).ir_version == 10
    with pytest.raises(UsageError, match="IR version"):
        to_qonnx(mlp(), opset=23)
