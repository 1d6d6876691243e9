"""FoldTransparentQdq: structure (node counts), numerics (ORT before == after), idempotence."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir
from tests.export.integer_graphs import cnn, mixed, sample_inputs

from fxquant.export.onnx_qdq import check_artifact, to_qdq
from fxquant.export.passes import FoldTransparentQdq
from fxquant.export.verify import session, verify_onnx


def _count(model: ir.Model) -> Counter[str]:
    return Counter(node.op_type for node in model.graph)


def test_folds_maxpool_and_flatten_onto_integers() -> None:
    graph = cnn()
    before = ir.from_proto(to_qdq(graph, fold_transparent=False))
    counts = _count(before)
    result = FoldTransparentQdq()(before)
    after = _count(result.model)
    assert result.modified
    assert after["MaxPool"] == counts["MaxPool"] == 2 and after["Flatten"] == 1
    assert counts["QuantizeLinear"] - after["QuantizeLinear"] == 3  # 2 MaxPool + 1 Flatten
    assert counts["DequantizeLinear"] - after["DequantizeLinear"] == 3
    for node in result.model.graph:
        if node.op_type in ("MaxPool", "Flatten"):
            assert node.inputs[0].producer().op_type != "DequantizeLinear"
    folded = ir.to_proto(result.model)
    check_artifact(folded, "folded cnn")
    x = sample_inputs(graph)
    verify_onnx(folded, graph, x, "qdq")
    np.testing.assert_array_equal(session(folded).run(None, {"input": x})[0],
                                  session(to_qdq(graph, fold_transparent=False)).run(None, {"input": x})[0])


def test_is_idempotent() -> None:
    model = ir.from_proto(to_qdq(mixed(), fold_transparent=False))
    assert FoldTransparentQdq()(model).modified
    assert not FoldTransparentQdq()(model).modified


def test_runs_in_a_pass_manager_and_to_qdq_option() -> None:
    graph = cnn()
    manager = ir.passes.PassManager([FoldTransparentQdq()])
    result = manager(ir.from_proto(to_qdq(graph, fold_transparent=False)))
    assert result.modified
    assert _count(ir.from_proto(to_qdq(graph))) == _count(result.model)
