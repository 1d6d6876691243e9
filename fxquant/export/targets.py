"""The ONNX deployment targets of the backend contract (:mod:`fxquant.backends.base`).

* ``onnx-qdq`` (:class:`OnnxQdqTarget`, alias ``onnx``): :func:`fxquant.export.onnx_qdq.to_qdq`,
  run by onnxruntime's CPU provider with all graph optimizations (the fused integer kernels).
* ``qonnx`` (:class:`QonnxTarget`): :func:`fxquant.export.qonnx.to_qonnx`; onnxruntime has no
  ``Quant`` kernel, so ``run`` executes :func:`~fxquant.export.qonnx.lower_quant` of the file
  (``Div → Round → Clip → Mul``, the same numbers as QONNX's ``Quant``).

Both write ``model.onnx`` into the build directory (``onnx.checker`` full check and strict shape
inference first) and run it on input integers ``k`` fed as float32 ``k * 2^-FL`` (exact; token
ids and masks, int64 model inputs, as the int64 ``k`` itself:
:func:`~fxquant.export.verify.input_feed`), reading the outputs back as ``k = out * 2^FL`` (:func:`fxquant.export.verify.output_integers`: a value off
the grid stays a float and counts as a mismatch). ``check`` lists every reason a graph has no exact
form at once (:func:`~fxquant.export.onnx_qdq.qdq_problems`,
:func:`~fxquant.export.qonnx.qonnx_problems`, widths from :mod:`fxquant.legality`), so the
exporter never meets something ``check`` could have listed.

The FP32 ONNX baseline (:func:`~fxquant.export.onnx_qdq.to_fp32`) is **not** a target: it is not
integer-exact, only the float network bench compares against. :func:`write_fp32_baseline` writes
it to ``RUN/onnx-fp32/`` with the fingerprint of the graph it was made from.

onnx and onnxruntime are imported inside the methods (``fxquant --help`` stays fast).
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from fxquant.backends.base import Problem, Target, graph_fingerprint
from fxquant.errors import ExportError
from fxquant.integer_graph import OP_KINDS, IntegerGraph
from fxquant.io import atomic_write, atomic_write_json

MODEL_FILE = "model.onnx"
FP32_DIR = "onnx-fp32"
FP32_REPORT = "baseline.json"
SUPPORTED_BITS = (2, 16)
"""Widths the exporters store: int4/int8/uint8 and int16 (``docs/onnx_export.md``)."""
_HANDLED = ("conv2d", "linear", "matmul", "add", "cat", "avgpool2d", "requantize", "relu", "maxpool2d", "flatten",
            "reshape", "mul_pow2", "clamp", "lut", "mul", "transpose", "upsample_nearest", "conv_transpose2d",
            "embedding", "slice", "constant")
"""The op kinds both exporters emit (each counts where the integer graph defines it)."""
_QDQ_ONLY = ("softmax", "layernorm")
"""Kinds only the QDQ exporter writes exactly (int64 subgraphs, :mod:`fxquant.export.onnx_integer`);
QONNX refuses them with :data:`fxquant.export.limits.QONNX_NO_EXACT_FORM`."""


def _ort_version() -> str:
    try:
        return metadata.version("onnxruntime")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def write_model(model: Any, path: Path) -> int:
    """Serialize an ``onnx.ModelProto`` to ``path`` atomically (:mod:`fxquant.io`); its size in bytes."""
    data = model.SerializeToString()
    atomic_write(path, lambda f: f.write(data))
    return len(data)


def model_facts(model: Any, graph: IntegerGraph, size_bytes: int) -> dict[str, Any]:
    """The build facts of an ONNX artifact (relative file name, sizes, opset, IR version, op types)."""
    from fxquant.export.onnx_builder import META_FLOAT32_RISKS

    props = {p.key: p.value for p in model.metadata_props}
    return {"file": MODEL_FILE, "size_bytes": size_bytes, "theoretical_bytes": graph.param_bits() / 8,
            "opset": next(o.version for o in model.opset_import if not o.domain), "ir_version": model.ir_version,
            "op_types": sorted({n.op_type for n in model.graph.node}),
            "float32_risk_ops": json.loads(props.get(META_FLOAT32_RISKS, "[]"))}


class _OnnxTarget(Target):
    ops: ClassVar[frozenset[str]] = frozenset(k for k in _HANDLED if k in OP_KINDS)
    limits: ClassVar[dict[str, Any]] = {"weight_bits": SUPPORTED_BITS, "act_bits": SUPPORTED_BITS}
    ran: ClassVar[str] = (f"onnxruntime {_ort_version()} CPUExecutionProvider, ORT_ENABLE_ALL, "
                          "1 intra-op thread")

    def check(self, graph: IntegerGraph, **options: Any) -> list[Problem]:
        """The contract's check, each problem once (the exporters' own rules repeat the shared
        transformer bounds, so that :func:`~fxquant.export.onnx_qdq.to_qdq` called directly refuses too)."""
        return list(dict.fromkeys(super().check(graph, **options)))

    def check_graph(self, graph: IntegerGraph, **options: Any) -> list[Problem]:
        from fxquant.legality import width_problems

        problems = self.exporter_problems(graph, **options)
        listed = {p.layer for p in problems}  # an off (32-bit) format is listed once, by the exporter
        widths = width_problems(graph, weight_bits=self.limits["weight_bits"], act_bits=self.limits["act_bits"])
        return problems + [p for p in widths if p.layer not in listed]

    def exporter_problems(self, graph: IntegerGraph, **options: Any) -> list[Problem]:
        raise NotImplementedError

    def runnable(self, model: Any) -> Any:
        """The model onnxruntime executes for this artifact."""
        return model

    def run(self, out_dir: Path, int_inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        import onnx

        from fxquant.export.onnx_builder import META_VALUE_FORMATS
        from fxquant.export.verify import input_feed, output_integers, session

        path = Path(out_dir) / MODEL_FILE
        if not path.is_file():
            raise ExportError(f"{out_dir} has no {MODEL_FILE}", f"run `fxquant export --target {self.name}`")
        model = onnx.load(str(path))
        graph_outputs = [o.name for o in model.graph.output]
        props = {p.key: p.value for p in model.metadata_props}
        if META_VALUE_FORMATS not in props:
            raise ExportError(f"{path} has no {META_VALUE_FORMATS} metadata: not an fxquant export",
                              f"run `fxquant export --target {self.name}` again")
        values = json.loads(props[META_VALUE_FORMATS])
        feed = {i.name: input_feed(i, k, values[i.name]["frac_bits"])
                for i, k in zip(model.graph.input, int_inputs, strict=True)}
        outs = session(self.runnable(model)).run(graph_outputs, feed)
        return [output_integers(out, values[name]["frac_bits"]) for name, out in zip(graph_outputs, outs)]


class OnnxQdqTarget(_OnnxTarget):
    """QDQ ONNX (QuantizeLinear/DequantizeLinear, integer storage) run by onnxruntime's fused kernels."""

    name = "onnx-qdq"
    summary = ("ONNX QDQ (integer storage, scales 2^-FL), onnxruntime CPU integer kernels; softmax and layernorm "
               "as exact int64 subgraphs, token ids and masks as int64 inputs")
    ops: ClassVar[frozenset[str]] = frozenset(k for k in _HANDLED + _QDQ_ONLY if k in OP_KINDS)
    option_defaults: ClassVar[dict[str, Any]] = {"opset": 21}

    def exporter_problems(self, graph: IntegerGraph, **options: Any) -> list[Problem]:
        from fxquant.export.limits import check_opset, qdq_problems

        return qdq_problems(graph, opset=check_opset(options["opset"]))

    def build(self, graph: IntegerGraph, out_dir: Path, **options: Any) -> dict[str, Any]:
        from fxquant.export.onnx_qdq import check_artifact, to_qdq

        model = to_qdq(graph, opset=options.get("opset", self.option_defaults["opset"]))
        check_artifact(model, f"QDQ model for {out_dir}")
        return model_facts(model, graph, write_model(model, Path(out_dir) / MODEL_FILE))


class QonnxTarget(_OnnxTarget):
    """QONNX (float ops + ``Quant`` nodes, qonnx tools / hls4ml); run lowered to standard ops."""

    name = "qonnx"
    summary = "QONNX Quant nodes (qonnx, hls4ml front end); run lowered to Div/Round/Clip/Mul in onnxruntime"
    option_defaults: ClassVar[dict[str, Any]] = {"opset": 13}
    ran: ClassVar[str] = (f"onnxruntime {_ort_version()} CPUExecutionProvider, ORT_ENABLE_ALL, 1 intra-op thread, "
                          "on lower_quant(model.onnx) (Quant as Div/Round/Clip/Mul)")

    def check(self, graph: IntegerGraph, **options: Any) -> list[Problem]:
        """As every target's, except that a kind QONNX cannot express exactly (softmax, layernorm) is
        named once, with its reason (:data:`~fxquant.export.limits.QONNX_NO_EXACT_FORM`), not also
        as an undeclared kind."""
        from fxquant.export.limits import QONNX_NO_EXACT_FORM

        generic = {Problem(op.name, op.kind, f"op kind {op.kind!r} is not supported by target {self.name!r}")
                   for op in graph.ops if op.kind in QONNX_NO_EXACT_FORM}
        return [p for p in super().check(graph, **options) if p not in generic]

    def exporter_problems(self, graph: IntegerGraph, **options: Any) -> list[Problem]:
        from fxquant.export.limits import QONNX_MAX_IR_VERSION, check_opset, qonnx_problems

        check_opset(options["opset"], QONNX_MAX_IR_VERSION)
        return qonnx_problems(graph)

    def build(self, graph: IntegerGraph, out_dir: Path, **options: Any) -> dict[str, Any]:
        from fxquant.export.onnx_qdq import check_artifact
        from fxquant.export.qonnx import to_qonnx

        model = to_qonnx(graph, opset=options.get("opset", self.option_defaults["opset"]))
        check_artifact(model, f"QONNX model for {out_dir}")
        return model_facts(model, graph, write_model(model, Path(out_dir) / MODEL_FILE))

    def runnable(self, model: Any) -> Any:
        from fxquant.export.qonnx import lower_quant

        return lower_quant(model)


def write_fp32_baseline(graph: IntegerGraph, out_dir: Path, *, opset: int = 21) -> dict[str, Any]:
    """Write the FP32 ONNX baseline of ``graph`` (not a target: not integer-exact) to
    ``out_dir/model.onnx`` with ``baseline.json`` (build facts + ``graph_fingerprint``)."""
    from fxquant.export.limits import exportable_problems, raise_problems
    from fxquant.export.onnx_qdq import check_artifact, to_fp32

    raise_problems(exportable_problems(graph))
    model = to_fp32(graph, opset=opset)
    check_artifact(model, f"FP32 baseline for {out_dir}")
    out_dir = Path(out_dir)
    facts = {**model_facts(model, graph, write_model(model, out_dir / MODEL_FILE)),
             "graph_fingerprint": graph_fingerprint(graph), "integer_exact": False}
    atomic_write_json(out_dir / FP32_REPORT, facts)
    return facts


def fp32_baseline(graph: IntegerGraph, out_dir: Path) -> dict[str, Any]:
    """The FP32 baseline's facts in ``out_dir``, written first if missing or made from another graph."""
    try:
        facts = json.loads((Path(out_dir) / FP32_REPORT).read_text())
    except (OSError, json.JSONDecodeError):
        facts = None
    if (not isinstance(facts, dict) or facts.get("graph_fingerprint") != graph_fingerprint(graph)
            or not (Path(out_dir) / MODEL_FILE).is_file()):
        facts = write_fp32_baseline(graph, out_dir)
    return facts


__all__ = ["FP32_DIR", "MODEL_FILE", "OnnxQdqTarget", "QonnxTarget", "fp32_baseline", "write_fp32_baseline"]
