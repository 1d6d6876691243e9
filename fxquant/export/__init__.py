"""Export an :class:`~fxquant.integer_graph.IntegerGraph` to ONNX (QDQ, QONNX, float).

Modules, one job each (import them directly; nothing heavy is imported here so that
``import fxquant.export`` stays fast and does not need ``onnx``):

* :mod:`fxquant.export.onnx_builder`: shared graph building (names, constants, the float form of
  each op, metadata keys).
* :mod:`fxquant.export.onnx_qdq`: ``to_qdq`` (QuantizeLinear/DequantizeLinear, integer storage),
  ``to_fp32`` (dequantized weights, float activations) and ``export_onnx`` (files + report).
* :mod:`fxquant.export.qonnx`: ``to_qonnx`` (QONNX ``Quant`` nodes) and the lowering of ``Quant``
  to standard ops used to run it in onnxruntime.
* :mod:`fxquant.export.passes`: onnx-ir passes (``FoldTransparentQdq``).
* :mod:`fxquant.export.verify`: ``verify_onnx``, onnxruntime against ``IntegerGraph.run``.

``docs/onnx_export.md`` describes the graphs, what onnxruntime fuses them to and the exactness
conditions.
"""
