"""Run exported ONNX models in onnxruntime and recover their integers; ``verify_onnx`` for tests.

:func:`session` is the one onnxruntime session builder (CPU, ``ORT_ENABLE_ALL``, so the fused
integer kernels are what runs), used by the targets' ``run`` (:mod:`fxquant.export.targets`),
``verify_onnx`` and ``bench``. A model output is ``k * 2^-FL`` in float32; ``k = out * 2^FL`` is
recovered exactly (a power-of-two scaling, :func:`output_integers`) and must equal the reference
integers: **no tolerance** for ``qdq`` and ``qonnx``. The export path verifies through
:func:`fxquant.backends.base.verify` (the one report schema); ``verify_onnx(model, graph, x,
flavour)`` checks an in-memory model on float inputs ``x`` against
``graph.run(*graph.quantize_inputs(x))`` (exporter tests, ``benchmarks/``). Token ids and masks
are int64 model inputs (:func:`fxquant.export.onnx_builder.integer_inputs`): they are fed the
integers themselves (:func:`input_feed`), every other input the float32 ``k * 2^-FL``.

Why exact equality holds (measured with onnxruntime 1.32 on AVX2, ``docs/onnx_export.md``):

* QLinearConv / QGemm / QLinearMatMul accumulate in int32 and requantize with
  ``nearbyint(float(acc) * 2^(FL_out-FL_acc))`` (ties to even); QLinearAdd, QLinearAveragePool,
  the int16 ops (run in float32) and the QONNX graph (lowered to float32 ops) compute in float32.
  With power-of-two scales all of this is exact **while float32 holds the accumulator**,
  ``|acc| <= 2^24`` in units of ``2^-FL_acc``. The QDQ exporter computes 8-bit Conv/Gemm
  ops whose worst-case accumulator is larger with ConvInteger/MatMulInteger and a float64
  requantization instead; the ops still at risk (int16 ones, MatMul, QONNX) are listed in the model's
  ``fxquant.float32_risk_ops`` metadata (:func:`fxquant.export.onnx_builder.float32_risks`), only
  they can differ (double rounding, one LSB), and a mismatch error names them.
* MLAS's x86 U8S8 GEMM (used without VNNI) adds pairs of uint8*int8 products in int16 with
  saturation, so int8 weights with ``|w| > 64`` can give wrong sums. ``to_qdq(ort_x86=True)``
  (default) avoids it by storing such weights as uint8 (exact U8U8 kernel).

The ``fp32`` flavour (float weights, no quantizers) is not expected to match: it is reported
(``max_abs_int_diff`` in output LSBs, top-1 agreement) and never raises.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from fxquant.errors import ExportError, UsageError
from fxquant.export.onnx_builder import META_FLOAT32_RISKS
from fxquant.integer_graph import IntegerGraph

FLAVOURS = ("qdq", "qonnx", "fp32")


def session(model: onnx.ModelProto | Path, *, threads: int = 1,
            optimized_path: str | None = None) -> ort.InferenceSession:
    """A CPU onnxruntime session with all graph optimizations, on a model or a model file."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def input_floats(k: np.ndarray, frac_bits: int, what: str) -> np.ndarray:
    """The float32 feed ``k * 2^-FL`` of input integers ``k`` (exact, or :class:`ExportError`)."""
    k = np.asarray(k)
    x = np.ldexp(k.astype(np.float64), -frac_bits).astype(np.float32)
    if not np.array_equal(np.ldexp(x.astype(np.float64), frac_bits), k):
        raise ExportError(f"{what}: integers at frac_bits={frac_bits} are not exact in float32",
                          "keep input integers within 24 bits and frac_bits within float32's exponent range")
    return x


def input_feed(value_info: onnx.ValueInfoProto, k: np.ndarray, frac_bits: int) -> np.ndarray:
    """The feed of a model input from its integers ``k``: int64 ``k`` itself for an integer input
    (token ids, masks: :func:`fxquant.export.onnx_builder.integer_inputs`), else :func:`input_floats`."""
    if value_info.type.tensor_type.elem_type == onnx.TensorProto.INT64:
        k = np.asarray(k)
        if k.size and not np.array_equal(k, np.rint(k)):
            raise ExportError(f"input {value_info.name!r} is an integer input and got non-integers",
                              "feed token ids and masks as integers")
        return k.astype(np.int64)
    return input_floats(k, frac_bits, f"input {value_info.name!r}")


def output_integers(out: np.ndarray, frac_bits: int) -> np.ndarray:
    """``k = out * 2^FL`` of a float output (exact: a power-of-two scaling), int64 when every
    ``k`` is an integer. Otherwise the float array is returned unchanged: a value off the grid
    must count as a mismatch, never be rounded into agreement."""
    k = np.ldexp(np.asarray(out, dtype=np.float64), frac_bits)
    return k.astype(np.int64) if np.all(np.isfinite(k)) and np.array_equal(k, np.rint(k)) else k


def verify_onnx(model: onnx.ModelProto, graph: IntegerGraph, x: np.ndarray, flavour: str) -> dict[str, Any]:
    """Run ``model`` in onnxruntime on ``x`` and compare with the integer reference (module doc).

    Returns ``n``, ``max_abs_int_diff``, ``mismatches`` (differing output integers),
    ``top1_agreement`` (first 2-D output), ``model_bytes``, ``theoretical_param_bytes``
    (``graph.param_bits() / 8``) and ``float32_risk_ops`` (from the model's metadata). Raises
    :class:`ExportError` naming the first mismatching output and sample for ``qdq``/``qonnx``.
    """
    if flavour not in FLAVOURS:
        raise UsageError(f"unknown ONNX flavour {flavour!r}", f"use one of {', '.join(FLAVOURS)}")
    if len(graph.inputs) != 1:
        raise UsageError(f"verify_onnx takes one input array, the graph has {len(graph.inputs)} inputs",
                         "verify single-input graphs")
    inp = graph.inputs[0]
    x = np.asarray(x, dtype=np.float32)
    if x.shape[1:] != tuple(inp.shape):
        raise UsageError(f"verify input has shape {x.shape}, graph input {inp.name!r} needs (N, {inp.shape})",
                         "pass a batch of model inputs")
    runnable = model
    if flavour == "qonnx":
        from fxquant.export.qonnx import lower_quant

        runnable = lower_quant(model)
    ints = graph.quantize_inputs(x)
    feed = x if model.graph.input[0].type.tensor_type.elem_type != onnx.TensorProto.INT64 else ints[0]
    outs = session(runnable).run(graph.outputs, {inp.name: feed})
    ref = graph.run(*ints)
    risks = json.loads(next((p.value for p in model.metadata_props if p.key == META_FLOAT32_RISKS), "[]"))
    report: dict[str, Any] = {"flavour": flavour, "n": int(x.shape[0]), "max_abs_int_diff": 0.0, "mismatches": 0,
                              "top1_agreement": None, "model_bytes": model.ByteSize(),
                              "theoretical_param_bytes": graph.param_bits() / 8, "float32_risk_ops": risks}
    for name, out in zip(graph.outputs, outs):
        k = output_integers(out, graph.values[name].fmt.frac_bits)
        diff = np.abs(k - ref[name])
        wrong = diff != 0
        report["max_abs_int_diff"] = max(report["max_abs_int_diff"], float(diff.max(initial=0.0)))
        report["mismatches"] += int(wrong.sum())
        if report["top1_agreement"] is None and out.ndim == 2:
            report["top1_agreement"] = float(np.mean(out.argmax(axis=1) == ref[name].argmax(axis=1)))
        if flavour != "fp32" and wrong.any():
            sample = int(np.argwhere(wrong)[0][0])
            hint = (f"ops whose accumulator can exceed 2^24 (float32 requantization): {', '.join(risks)}"
                    if risks else "int8 weights with |w| > 64 saturate in onnxruntime's x86 U8S8 kernel; "
                    "export with to_qdq(ort_x86=True), else report this as an exporter bug")
            raise ExportError(f"{flavour} ONNX output {name!r} differs from the integer reference at sample "
                              f"{sample} (max |Δk| = {diff.max():g}, {int(wrong.sum())} integers)", hint)
    return report
