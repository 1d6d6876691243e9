"""fxquant-TVM CPU latency goals table (not a test).

Builds IntegerGraphs with random integer weights (latency does not depend on the values) --
the digits-CNN (1x8x8) and ResNet-20 (3x32x32, 40.8 M MACs) of ``benchmarks/onnx_latency.py``,
and an MLP W-W-W-10 (``--mlp-width W``, default 1024) with 8-bit and with 4-bit weights -- exports each with
:func:`fxquant.backends.cpu.export_cpu` (verified bit-exact against ``IntegerGraph.run``) and
with ``to_fp32`` / ``to_qdq`` (ONNX), then runs :func:`fxquant.backends.cpu.bench_cpu`, which
times ORT FP32, ORT int8 QDQ and fxquant-TVM interleaved in this one process.

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

from fxquant.backends.cpu import bench_cpu, export_cpu  # noqa: E402
from fxquant.backends.cpu.bench import tvm_runner, time_runners  # noqa: E402
from fxquant.backends.cpu.build import CpuModel  # noqa: E402
from fxquant.export.onnx_qdq import to_fp32, to_qdq  # noqa: E402
from fxquant.integer_graph import IntegerGraph  # noqa: E402


def mlp(weight_bits: int, width: int = 1024) -> IntegerGraph:
    w = F(weight_bits, weight_bits - 1)
    m = GraphMaker((width,), F(8, 4))
    h = m.linear("fc1", "input", width, w, F(8, 3), relu=True)
    h = m.linear("fc2", h, width, w, F(8, 3), relu=True)
    return m.graph(m.linear("fc3", h, 10, w, F(8, 2)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timing per batch size")
    ap.add_argument("--only", nargs="*", default=None, help="network names to run")
    ap.add_argument("--mlp-width", type=int, default=1024, help="MLP hidden width (1024: int8 weights "
                    "about 2 MB, beyond the 512 KB L2 of one core; 4-bit weights half of it)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    nets = {"digits-CNN": (digits_cnn(), (1, 64)), "ResNet-20": (resnet20(), (1, 64)),
            "MLP-int8": (mlp(8, args.mlp_width), (1,)), "MLP-int4": (mlp(4, args.mlp_width), (1,))}
    results = {}
    for name, (graph, batches) in nets.items():
        if args.only and name not in args.only:
            continue
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        x = rng.standard_normal((8, *graph.inputs[0].shape)).astype(np.float32)
        report = export_cpu(graph, out, verify_inputs=x)
        onnx.save(to_fp32(graph), out / "fp32.onnx")
        onnx.save(to_qdq(graph), out / "qdq.onnx")
        print(f"## {name}: bit-exact on {report['verification']['samples']} samples, build {report['build_s']} s")
        results[name] = bench_cpu(graph, out, batches=batches, onnx_fp32=out / "fp32.onnx",
                                  onnx_qdq=out / "qdq.onnx", budget_s=args.budget)
    if "MLP-int8" in results and "MLP-int4" in results:
        # the goal ratio, timed side by side (the two bench_cpu calls above ran at different times)
        x = rng.standard_normal((1, args.mlp_width)).astype(np.float32)
        runners = {k: tvm_runner(CpuModel.load(args.out / k), x) for k in ("MLP-int8", "MLP-int4")}
        times = time_runners(runners, 2 * args.budget, rounds=6)
        p50 = {k: float(np.percentile(v, 50)) * 1e3 for k, v in times.items()}
        print(f"MLP batch 1, side by side: int4 {p50['MLP-int4']:.3f} ms / int8 {p50['MLP-int8']:.3f} ms = "
              f"{p50['MLP-int4'] / p50['MLP-int8']:.2f}x")


if __name__ == "__main__":
    main()
