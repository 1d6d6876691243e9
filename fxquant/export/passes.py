"""onnx-ir passes for QDQ graphs (usable in any ``onnx_ir.passes.PassManager`` pipeline).

``FoldTransparentQdq`` runs after the QDQ exporter (:func:`fxquant.export.onnx_qdq.to_qdq` runs it
itself) or on any QDQ model. Before → after::

    x_int ─ DequantizeLinear(s, z) ─ MaxPool ─ QuantizeLinear(s, z) ─ y_int
    x_int ─ MaxPool ─ y_int

Exact by the commutation rule of ``docs/number_format.md``: with the same scale ``s > 0`` and zero
point ``z``, ``DQ`` is monotone and affine, so ``Q(maxpool(DQ(x))) = maxpool(x)`` and
``Q(flatten(DQ(x))) = flatten(x)`` bit for bit (``Q(DQ(k)) = k`` for every storable ``k``).
Folded ops: MaxPool and Resize (int8/uint8 only: the types ONNX MaxPool accepts, and the integer
types onnxruntime's Resize takes; nearest Resize copies pixels), Flatten, Reshape, Transpose,
Squeeze, Unsqueeze. Only per-tensor (scalar) constant scales and zero points with
equal values and types are folded; a ``Q`` whose output is a graph output is kept.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_LAYOUT_OPS = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
_INT8_OPS = ("MaxPool", "Resize")
"""Folded only onto int8/uint8 tensors."""
_INT8_DTYPES = (np.dtype(np.int8), np.dtype(np.uint8))


def _scalar_const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    return array if array.size == 1 else None


def _same_quantization(dq: ir.Node, q: ir.Node) -> bool:
    """Both nodes use equal scalar constant scales and zero points of the same type."""
    if len(dq.inputs) != 3 or len(q.inputs) != 3 or dq.attributes.get("axis") != q.attributes.get("axis"):
        return False
    for a, b in zip(dq.inputs[1:], q.inputs[1:]):
        ca, cb = _scalar_const(a), _scalar_const(b)
        if ca is None or cb is None or ca.dtype != cb.dtype or ca.item() != cb.item():
            return False
    return True


class FoldTransparentQdq(ir.passes.InPlacePass):
    """``DQ → op → Q`` with the same quantization becomes ``op`` on the integer tensor."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.domain != "" or node.op_type not in _LAYOUT_OPS + _INT8_OPS or len(node.outputs) != 1:
                continue
            dq = node.inputs[0].producer() if node.inputs[0] is not None else None
            out = node.outputs[0]
            users = list(out.consumers())
            if dq is None or dq.op_type != "DequantizeLinear" or out.is_graph_output() or len(users) != 1:
                continue
            q = users[0]
            int_in = dq.inputs[0]
            if (q.op_type != "QuantizeLinear" or q.inputs[0] is not out or q.outputs[0].is_graph_output()
                    or not _same_quantization(dq, q) or int_in is None
                    or (node.op_type in _INT8_OPS and _scalar_const(dq.inputs[2]).dtype not in _INT8_DTYPES)):
                continue
            node.replace_input_with(0, int_in)
            out.type = int_in.type
            q.outputs[0].replace_all_uses_with(out)
            model.graph.remove(q, safe=True)
            if not dq.outputs[0].uses():
                model.graph.remove(dq, safe=True)
            modified = True
        return ir.passes.PassResult(model, modified)
