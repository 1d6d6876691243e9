"""fxquant-TVM CPU latency goals table (not a test).

Builds IntegerGraphs with random integer weights (latency does not depend on the values) --
the digits-CNN (1x8x8) and ResNet-20 (3x32x32, 40.8 M MACs) of ``benchmarks/onnx_latency.py``,
and an MLP W-W-W-10 (``--mlp-width W``, default 1024) with 8-bit and with 4-bit weights -- and
exports each through the backend contract (``benchmarks/verified.py``) for the ``cpu`` target
(fxquant-TVM) and the ``onnx-qdq`` target (ORT int8 QDQ): each artifact is verified bit-exact
against ``IntegerGraph.run`` and read back through ``verified_artifact`` before anything is timed.
The ORT FP32 model (``to_fp32``) is the float baseline, not integer-exact. The three run
interleaved in this one process (:func:`fxquant.backends.cpu.bench.time_runners`); every row names
the artifact it timed and its verification.

    TVM_NUM_THREADS=2 .venv/bin/python benchmarks/cpu_latency.py --out /tmp/cpu_bench [--budget 2]

Goals: digits-CNN and ResNet-20 at batch 1 and 64: fxquant-TVM <= 0.5x ORT FP32 (p50);
MLP with 4-bit weights at batch 1: <= 0.5x of the same MLP with 8-bit weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "export"))
from integer_graphs import F, GraphMaker  # noqa: E402
from onnx_latency import digits_cnn, resnet20  # noqa: E402
from verified import FLOAT_BASELINE, artifact_label, verified_export  # noqa: E402

from fxquant.backends.cpu.bench import time_runners, tvm_runner  # noqa: E402
from fxquant.backends.cpu.build import CpuModel  # noqa: E402
from fxquant.export.onnx_qdq import to_fp32  # noqa: E402
from fxquant.export.verify import session  # noqa: E402
from fxquant.integer_graph import IntegerGraph  # noqa: E402


def mlp(weight_bits: int, width: int = 1024) -> IntegerGraph:
    w = F(weight_bits, weight_bits - 1)
    m = GraphMaker((width,), F(8, 4))
    h = m.linear("fc1", "input", width, w, F(8, 3), relu=True)
    h = m.linear("fc2", h, width, w, F(8, 3), relu=True)
    return m.graph(m.linear("fc3", h, 10, w, F(8, 2)))


def ort_runner(path: Path, x: np.ndarray, threads: int):
    sess = session(onnx.load(str(path)), threads=threads)
    name = sess.get_inputs()[0].name
    return lambda: sess.run(None, {name: x})


def p50_ms(times: list[float]) -> float:
    return float(np.percentile(times, 50)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per batch size")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (TVM: TVM_NUM_THREADS)")
    ap.add_argument("--only", nargs="*", default=None, help="network names to run")
    ap.add_argument("--mlp-width", type=int, default=1024, help="MLP hidden width (1024: int8 weights "
                    "about 2 MB, beyond the 512 KB L2 of one core; 4-bit weights half of it)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    nets = {"digits-CNN": (digits_cnn(), (1, 64)), "ResNet-20": (resnet20(), (1, 64)),
            "MLP-int8": (mlp(8, args.mlp_width), (1,)), "MLP-int4": (mlp(4, args.mlp_width), (1,))}
    cpu_dirs: dict[str, Path] = {}
    print("| network | batch | engine | p50 ms | x ORT FP32 | timed |\n|---|---:|---|---:|---:|---|")
    for name, (graph, batches) in nets.items():
        if args.only and name not in args.only:
            continue
        x = rng.standard_normal((max(batches), *graph.inputs[0].shape)).astype(np.float32)
        cpu_dir, cpu_report = verified_export("cpu", graph, args.out / name / "cpu", [x[:8]])
        qdq_dir, qdq_report = verified_export("onnx-qdq", graph, args.out / name / "onnx-qdq", [x[:8]])
        fp32 = args.out / name / "fp32.onnx"
        onnx.save(to_fp32(graph), fp32)
        cpu_dirs[name] = cpu_dir
        model = CpuModel.load(cpu_dir)
        timed = {"ORT FP32": FLOAT_BASELINE, "ORT int8 QDQ": artifact_label(qdq_dir, qdq_report),
                 "fxquant-TVM": artifact_label(cpu_dir, cpu_report)}
        for batch in batches:
            xb = x[:batch]
            runners = {"ORT FP32": ort_runner(fp32, xb, args.threads),
                       "ORT int8 QDQ": ort_runner(qdq_dir / qdq_report["artifact"]["file"], xb, args.threads),
                       "fxquant-TVM": tvm_runner(model, xb)}
            p50 = {k: p50_ms(v) for k, v in time_runners(runners, args.budget).items()}
            for engine, ms in p50.items():
                print(f"| {name} | {batch} | {engine} | {ms:.3f} | {ms / p50['ORT FP32']:.2f} | {timed[engine]} |")
    if "MLP-int8" in cpu_dirs and "MLP-int4" in cpu_dirs:
        # the goal ratio, timed side by side (the per-network tables above ran at different times)
        x = rng.standard_normal((1, args.mlp_width)).astype(np.float32)
        runners = {k: tvm_runner(CpuModel.load(cpu_dirs[k]), x) for k in ("MLP-int8", "MLP-int4")}
        p50 = {k: p50_ms(v) for k, v in time_runners(runners, 2 * args.budget, rounds=6).items()}
        print(f"MLP batch 1, side by side: int4 {p50['MLP-int4']:.3f} ms / int8 {p50['MLP-int8']:.3f} ms = "
              f"{p50['MLP-int4'] / p50['MLP-int8']:.2f}x (verified cpu artifacts {cpu_dirs['MLP-int4']}, "
              f"{cpu_dirs['MLP-int8']})")


if __name__ == "__main__":
    main()
