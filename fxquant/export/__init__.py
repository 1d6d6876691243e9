"""Export an :class:`~fxquant.integer_graph.IntegerGraph` to ONNX (QDQ, QONNX, float).

Modules, one job each (import them directly; nothing heavy is imported here so that
``import fxquant.export`` stays fast and does not need ``onnx``):

* :mod:`fxquant.export.targets`: the ``onnx-qdq`` and ``qonnx`` deployment targets of the backend
  contract (:mod:`fxquant.backends.base`; check, build ``model.onnx``, run in onnxruntime) and the
  FP32 baseline writer (``RUN/onnx-fp32``, not a target).
* :mod:`fxquant.export.limits`: what the exporters can write exactly, as ``Problem`` lists (the
  targets' ``check``; no onnx import).
* :mod:`fxquant.export.onnx_builder`: shared graph building (names, constants, the float form of
  each op, metadata keys).
* :mod:`fxquant.export.onnx_qdq`: ``to_qdq`` (QuantizeLinear/DequantizeLinear, integer storage)
  and ``to_fp32`` (dequantized weights, float activations: the float baseline).
* :mod:`fxquant.export.qonnx`: ``to_qonnx`` (QONNX ``Quant`` nodes) and the lowering of ``Quant``
  to standard ops used to run it in onnxruntime.
* :mod:`fxquant.export.passes`: onnx-ir passes (``FoldTransparentQdq``).
* :mod:`fxquant.export.verify`: the onnxruntime session, exact integer recovery of outputs, and
  ``verify_onnx`` (an in-memory model against ``IntegerGraph.run``).

``docs/onnx_export.md`` describes the graphs, what onnxruntime fuses them to and the exactness
conditions.
"""
