"""ONNX Runtime latency and size: fp32 vs fxquant QDQ vs onnxruntime ``quantize_static`` (U8S8).

Not a test. Builds two IntegerGraphs with random integer weights (latency does not depend on the
values): a digits-CNN-shaped net (1x8x8 input) and a ResNet-20-shaped net (3x32x32, 16/32/64
channels, 1x1 projection shortcuts, 8x8 average pool). For each it exports ``to_fp32`` (float
baseline) and the ``onnx-qdq`` target with 8-bit and with 7-bit weights through the backend contract
(``benchmarks/verified.py``: exported, verified bit-exact against ``IntegerGraph.run`` and read
back through ``verified_artifact``; only that file is timed), and runs ``onnxruntime.quantization.quantize_static`` on the fp32
model (QDQ format, uint8 activations, int8 weights, per-tensor MinMax calibration on the same
random inputs); then it times one CPU session per model (``ORT_ENABLE_ALL``, ``--threads``
intra-op threads) at batch 1 and 64: median of ``--runs`` timed runs after 5 warm-up runs.

    .venv/bin/python benchmarks/onnx_latency.py --runs 50 --threads 1

prints a Markdown table (milliseconds, serialized bytes with the theoretical ``Σ params·bits/8`` of
the integer graph, speed-up of each model over fp32, and what was timed: the verified artifact's
directory and its verification, or "float baseline, not verified"). ``--out`` keeps the artifacts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from integer_graphs import F, GraphMaker  # noqa: E402  (test helpers build the random graphs)
from verified import FLOAT_BASELINE, artifact_label, verified_export  # noqa: E402

from fxquant.export.onnx_qdq import to_fp32  # noqa: E402
from fxquant.export.verify import session  # noqa: E402
from fxquant.integer_graph import IntegerGraph  # noqa: E402

A8, W8, W7 = F(8, 3), F(8, 7), F(7, 6)


def digits_cnn(w: F = W8) -> IntegerGraph:
    m = GraphMaker((1, 8, 8), F(8, 4))
    h = m.pool("pool1", m.conv("conv1", "input", 16, w, A8))
    h = m.pool("pool2", m.conv("conv2", h, 32, w, A8))
    h = m.linear("fc1", m.flatten("flat", h), 64, w, A8, relu=True)
    return m.graph(m.linear("fc2", h, 10, w, F(8, 2)))


def resnet20(w: F = W8) -> IntegerGraph:
    m = GraphMaker((3, 32, 32), F(8, 5))
    h = m.conv("stem", "input", 16, w, A8)
    for stage, width in enumerate((16, 32, 64)):
        for block in range(3):
            name, stride = f"layer{stage + 1}.{block}", 2 if stage and not block else 1
            y = m.conv(f"{name}.conv1", h, width, w, A8, stride=stride)
            y = m.conv(f"{name}.conv2", y, width, w, A8, relu=False)
            if stride != 1:
                h = m.conv(f"{name}.shortcut", h, width, w, A8, k=1, stride=stride, pad=0, relu=False)
            h = m.add(f"{name}.add", y, h, A8)
    h = m.flatten("flat", m.pool("avgpool", h, "avgpool2d", 8, A8))
    return m.graph(m.linear("fc", h, 10, w, F(8, 2)))


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray) -> None:
        self._batches = iter([{name: x[i:i + 1]} for i in range(len(x))])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def ort_static(fp32: onnx.ModelProto, name: str, x: np.ndarray, work: Path) -> onnx.ModelProto:
    src, dst = work / "fp32.onnx", work / "ort_u8s8.onnx"
    onnx.save(fp32, src)
    quantize_static(src, dst, _Reader(name, x), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=False)
    return onnx.load(dst)


def median_ms(model: onnx.ModelProto, name: str, x: np.ndarray, runs: int, threads: int) -> float:
    sess = session(model, threads=threads)
    for _ in range(5):
        sess.run(None, {name: x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="keep the exported artifacts here (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table(args.out or Path(tmp), args.runs, args.threads)


def table(work: Path, runs: int, threads: int) -> None:
    rng = np.random.default_rng(0)
    print("| network | model | bytes (Σ params·bits/8) | batch 1 ms | batch 64 ms | x fp32 (b1) | x fp32 (b64) "
          "| timed |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for net, build in (("digits-CNN", digits_cnn), ("ResNet-20", resnet20)):
        graph, graph7 = build(), build(W7)
        name = graph.inputs[0].name
        x64 = rng.standard_normal((64, *graph.inputs[0].shape)).astype(np.float32)
        fp32 = to_fp32(graph)
        rows = [("ORT fp32", fp32, str(fp32.ByteSize()), FLOAT_BASELINE)]
        for label, g, slug in (("fxquant QDQ, 8-bit weights (u8, U8U8 kernel)", graph, "qdq8"),
                               ("fxquant QDQ, 7-bit weights (s8, U8S8 kernel)", graph7, "qdq7")):
            out_dir, report = verified_export("onnx-qdq", g, work / net / slug, [x64[:8]])
            model = onnx.load(str(out_dir / report["artifact"]["file"]))  # the certified file, nothing else
            rows.append((label, model, f"{model.ByteSize()} ({g.param_bits() // 8})", artifact_label(out_dir, report)))
        (work / net).mkdir(parents=True, exist_ok=True)
        ort = ort_static(fp32, name, x64[:16], work / net)
        rows.append(("ORT quantize_static U8S8", ort, str(ort.ByteSize()),
                     "onnxruntime's own quantized model, not verified (not fxquant's format)"))
        base = None
        for label, model, size, timed in rows:
            ms = [median_ms(model, name, x, runs, threads) for x in (x64[:1], x64)]
            base = base or ms
            print(f"| {net} | {label} | {size} | {ms[0]:.3f} | {ms[1]:.3f} | "
                  f"{base[0] / ms[0]:.2f} | {base[1] / ms[1]:.2f} | {timed} |")


if __name__ == "__main__":
    main()
