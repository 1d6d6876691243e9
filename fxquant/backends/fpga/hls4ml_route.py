"""Second route to HLS, for cross-checking: QONNX export -> hls4ml (Vitis backend) -> its g++ C-sim.

Runs after lowering; independent of :mod:`.codegen`. :func:`fxquant.export.qonnx.to_qonnx` writes
the graph as float ONNX ops with QONNX ``Quant`` nodes (``scale = 2^-FL``, round half even,
saturate); the qonnx clean-up and channels-last passes prepare it for hls4ml's QONNX front end,
which builds ``ap_fixed`` types from the ``Quant`` nodes ("auto" precisions; anything it cannot
infer gets :data:`DEFAULT_PRECISION`, wide enough not to round any accumulator of a <= 16-bit
model). One front-end requirement is met on a copy of the model first, exactly: every bias-less
``Gemm`` gets a zero bias (qonnx's ``GemmToMatMul`` needs the ``C`` input).

The hls4ml outputs are floats on the output grid; they are compared with ``IntegerGraph.run``
as ``y * 2^FL`` (exact in float64, no rounding: an off-grid value is a mismatch) and, given a
generated fxquant project, with its C-simulation. Known hls4ml 1.3 limits: grouped (non-depthwise)
convolutions and channel ``cat`` after the channels-last conversion do not convert.
"""

from __future__ import annotations

import contextlib
import io as _io
import time
from pathlib import Path
from typing import Any

import numpy as np

from fxquant.errors import ExportError, ToolchainError, UsageError
from fxquant.fixed_point import dequantize
from fxquant.integer_graph import IntegerGraph

from .plan import check_int_inputs

DEFAULT_PRECISION = "fixed<64,32>"
HLS4ML_IO = {"parallel": "io_parallel", "stream": "io_stream"}


def _prepare_for_hls4ml(model: Any) -> Any:
    """Add a zero bias to every bias-less Gemm (in place)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}

    def weight_dims(name: str) -> list[int]:
        while name not in inits:  # the weight initializer sits behind its Quant node
            name = producer[name].input[0]
        return list(inits[name].dims)

    for node in model.graph.node:
        if node.op_type == "Gemm" and len(node.input) == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            dims = weight_dims(node.input[1])
            bias = numpy_helper.from_array(np.zeros(dims[0] if trans_b else dims[1], dtype=np.float32),
                                           f"{node.name}_zero_bias")
            model.graph.initializer.append(bias)
            node.input.append(bias.name)
    return model


def hls4ml_csim(graph: IntegerGraph, out_dir: Path, int_inputs: np.ndarray, *, reuse: int = 1,
                io: str = "parallel", project_dir: Path | None = None) -> dict[str, Any]:
    """Convert ``graph`` with hls4ml, compile its C-sim and compare it bit for bit.

    Returns ``n``, ``mismatches`` / ``bit_exact`` against ``graph.run``, ``compile_seconds``,
    ``run_seconds``, ``hls4ml_version`` and, with ``project_dir`` (a generated fxquant project),
    ``disagreements_with_fxquant`` (samples where the two C-simulations differ).
    """
    if io not in HLS4ML_IO:
        raise UsageError(f"io={io!r} is not an FPGA io mode", f"use one of {', '.join(HLS4ML_IO)}")
    try:
        import hls4ml
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.transformation.channels_last import ConvertToChannelsLastAndClean
        from qonnx.transformation.gemm_to_matmul import GemmToMatMul
        from qonnx.util.cleanup import cleanup_model
    except ImportError as exc:
        raise ToolchainError(f"the hls4ml route needs hls4ml and qonnx: {exc}",
                             "pip install 'fxquant[fpga]'") from exc
    from fxquant.export.qonnx import to_qonnx

    x = check_int_inputs(graph.inputs[0], int_inputs)
    out_value = graph.value(graph.outputs[0])
    model = cleanup_model(ModelWrapper(_prepare_for_hls4ml(to_qonnx(graph))))
    model = cleanup_model(model.transform(ConvertToChannelsLastAndClean()).transform(GemmToMatMul()))
    log = _io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):  # hls4ml prints its topology; keep it out of the CLI
            config = hls4ml.utils.config.config_from_onnx_model(
                model, granularity="name", backend="Vitis", default_precision=DEFAULT_PRECISION,
                default_reuse_factor=reuse)
            hls_model = hls4ml.converters.convert_from_onnx_model(
                model, output_dir=str(Path(out_dir) / "hls4ml_prj"), io_type=HLS4ML_IO[io], backend="Vitis",
                hls_config=config)
            hls_model.compile()
    except Exception as exc:  # hls4ml raises bare Exception/ValueError/RuntimeError for unsupported graphs
        raise ExportError(f"hls4ml could not convert or compile the QONNX model: {str(exc).splitlines()[0]}",
                          "grouped convolutions and channel cat are not supported by hls4ml 1.3") from exc
    compile_seconds = time.perf_counter() - start
    xf = dequantize(x, graph.inputs[0].fmt.frac_bits).astype(np.float32)
    if xf.ndim == 4:
        xf = xf.transpose(0, 2, 3, 1)  # hls4ml runs channels-last
    start = time.perf_counter()
    y = np.asarray(hls_model.predict(np.ascontiguousarray(xf)), dtype=np.float64).reshape(len(x), -1)
    run_seconds = time.perf_counter() - start
    if len(out_value.shape) == 3:
        c, h, w = out_value.shape
        y = y.reshape(len(x), h, w, c).transpose(0, 3, 1, 2).reshape(len(x), -1)
    got = np.ldexp(y, out_value.fmt.frac_bits)  # exact; off-grid values stay non-integral
    want = graph.run(x)[graph.outputs[0]].reshape(len(x), -1)
    bad = np.any(got != want, axis=1)
    report: dict[str, Any] = {
        "n": int(len(x)), "mismatches": int(bad.sum()), "bit_exact": not bool(bad.any()),
        "compile_seconds": round(compile_seconds, 3), "run_seconds": round(run_seconds, 4),
        "hls4ml_version": hls4ml.__version__, "default_precision": DEFAULT_PRECISION,
    }
    if project_dir is not None:
        from .csim import build

        ours = build(project_dir).run(x)
        report["disagreements_with_fxquant"] = int(np.any(ours != got, axis=1).sum())
    return report
