"""fxquant-TVM CUDA latency goals table (not a test): build on a host with nvcc, run on a GPU host.

Networks (random integer weights; latency does not depend on the values): ResNet-20
(3x32x32, ``benchmarks/onnx_latency.py``), an MLP 1024-1024-1024-10 with 8-bit and with 4-bit
(packed) weights, and single int8 linear layers S x S x S (S = 1024, 2048, 4096) for the GEMM
comparison with ``torch._int_mm``.

    .venv/bin/python benchmarks/cuda_latency.py build --out build/cuda_bench [--arch sm_90]
    python benchmarks/cuda_latency.py run --out build/cuda_bench [--iters 200]

``build`` (needs TVM + nvcc, no GPU) exports each network for the ``cuda`` target through the
backend contract (``benchmarks/verified.py``: check, build, the kernels' integer logic verified
bit-exact against ``IntegerGraph.run`` on the CPU, ``report.json``) into ``<out>/<name>/``.
``run`` (needs torch with CUDA, numpy and apache-tvm-ffi; nvcc not needed) first reads every
directory back through :func:`fxquant.backends.base.verified_artifact` against the same graph
(a directory that was never verified, failed, or holds another graph is refused, nothing timed),
then runs its ``run_cuda.py`` (GPU bit-exactness, then p50 latency per batch:
fxquant CUDA-graph replay vs torch FP32 / bf16 eager and ORT CUDA EP), times each GEMM kernel
alone against ``torch._int_mm`` and bf16 / fp32 ``matmul`` (CUDA-graph replay), and writes
``<out>/summary.json`` with the acceptance table of ``docs/gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GEMM_SIZES = (1024, 2048, 4096)
NET_BATCHES = (1, 64, 256)


def networks() -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests" / "export"))
    from integer_graphs import F, GraphMaker
    from onnx_latency import resnet20

    def mlp(weight_bits: int) -> Any:
        w = F(weight_bits, weight_bits - 1)
        m = GraphMaker((1024,), F(8, 4))
        h = m.linear("fc1", "input", 1024, w, F(8, 3), relu=True)
        h = m.linear("fc2", h, 1024, w, F(8, 3), relu=True)
        return m.graph(m.linear("fc3", h, 10, w, F(8, 2)))

    def gemm(size: int) -> Any:
        m = GraphMaker((size,), F(8, 4))
        return m.graph(m.linear("fc", "input", size, F(8, 7), F(8, 2), bias=False))

    nets = {"resnet20": resnet20(), "mlp-int8": mlp(8), "mlp-int4": mlp(4)}
    nets.update({f"gemm{s}": gemm(s) for s in GEMM_SIZES})
    return nets


def build(out: Path, arch: str, only: list[str] | None) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from verified import artifact_label, verified_export

    rng = np.random.default_rng(0)
    for name, graph in networks().items():
        if only and name not in only:
            continue
        x = (rng.standard_normal((4, *graph.inputs[0].shape)) * 3).astype(np.float32)
        _, report = verified_export("cuda", graph, out / name, [x], arch=arch)
        # carry-size budget (64 MiB to a GPU session): GEMM dirs time the kernel alone, and the
        # float baselines of mlp-int4 are those of mlp-int8 (same network in float)
        drop = ("fp32.onnx", "baseline_weights.npz") if name.startswith("gemm") else ("fp32.onnx",) \
            if name == "mlp-int4" else ()
        for f in drop:
            (out / name / f).unlink()
        print(f"{name}: built in {report['artifact']['build_seconds']} s; {artifact_label(out / name, report)}")


def time_gemm(d: Path, size: int, iters: int) -> dict[str, float]:
    """The GEMM kernel alone (int8 in, int8 out, bias + requantize epilogue) vs torch at M=N=K=size."""
    import torch
    import tvm_ffi
    from run_cuda import graph_replay, p50_us

    plan = json.loads((d / "plan.json").read_text())
    (launch,) = [launch for launch in plan["launches"] if launch["kernel"].startswith("fxq_linear")]
    kernel = tvm_ffi.load_module(str(d / "kernels.so"))[launch["kernel_large"]]
    with np.load(d / "params.npz") as f:
        w, b = (torch.from_numpy(f[k]).cuda() for k in ("fc.weight", "fc.bias"))
    a = torch.randint(-128, 128, (size, size), dtype=torch.int8, device="cuda")
    y = torch.empty((size, size), dtype=torch.int8, device="cuda")
    wt = w[:size, :size].t()
    ah, wh = a.to(torch.bfloat16), wt.to(torch.bfloat16)
    af, wf = a.float(), wt.float()
    cases = {"fxquant dp4a": lambda: kernel(a, w, b, y), "torch _int_mm": lambda: torch._int_mm(a, wt),
             "torch bf16 matmul": lambda: ah @ wh, "torch fp32 matmul": lambda: af @ wf}
    return {name: round(p50_us(graph_replay(fn), iters), 2) for name, fn in cases.items()}


def run(out: Path, iters: int, only: list[str] | None) -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from verified import artifact_label

    from fxquant.backends.base import verified_artifact
    from fxquant.backends.registry import get_target

    summary: dict[str, Any] = {"networks": {}, "gemm": {}}
    nets = networks()
    for d in sorted(p for p in out.iterdir() if (p / "plan.json").is_file()):
        if only and d.name not in only:
            continue
        # the one gate: only an artifact certified bit-exact for exactly this graph is timed
        report = verified_artifact(get_target("cuda"), nets[d.name], d)
        print(f"timing {artifact_label(d, report)}; run_cuda.py checks it on the GPU first")
        sys.path.insert(0, str(d))
        import run_cuda

        print(f"## {d.name}")
        is_gemm = d.name.startswith("gemm")
        args = ["--dir", str(d), "--iters", str(iters), "--batches", *map(str, NET_BATCHES)]
        status = run_cuda.main(args + (["--verify-only"] if is_gemm else []))
        result = json.loads((d / "cuda_bench.json").read_text())
        result["timed"] = artifact_label(d, report)
        summary["networks"][d.name] = result
        if is_gemm and not status:
            summary["gemm"][d.name] = time_gemm(d, int(d.name[4:]), iters)
            print(summary["gemm"][d.name])
        sys.path.remove(str(d))
        del sys.modules["run_cuda"]
    summary["acceptance"] = acceptance(summary)
    from fxquant.io import atomic_write_json

    atomic_write_json(out / "summary.json", summary)
    print("| goal | measured | met |\n|---|---|---|")
    for row in summary["acceptance"]:
        print(f"| {row['goal']} | {row['measured']} | {row['met']} |")


def acceptance(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals of docs/gpu.md against the measured p50s."""
    rows = []

    def p50(net: str, batch: int, backend: str) -> float | None:
        result = summary["networks"].get(net, {})
        return next((r["p50_us"] for r in result.get("rows", []) if r["batch"] == batch and r["backend"] == backend),
                    None)

    for net in ("resnet20", "mlp-int8"):
        tvm, fp32, bf16 = (p50(net, 256, b) for b in ("fxquant graph", "torch fp32 eager", "torch bf16 eager"))
        if tvm and fp32 and bf16:
            rows.append({"goal": f"{net} b256 <= 0.3x torch fp32 eager", "measured": round(tvm / fp32, 3),
                         "met": tvm <= 0.3 * fp32})
            rows.append({"goal": f"{net} b256 no slower than torch bf16 eager", "measured": round(tvm / bf16, 3),
                         "met": tvm <= bf16})
    for name, t in summary["gemm"].items():
        ratio = t["fxquant dp4a"] / t["torch _int_mm"]
        rows.append({"goal": f"{name} int8 GEMM within 2x of torch _int_mm", "measured": round(ratio, 2),
                     "met": ratio <= 2.0})
    for net, result in summary["networks"].items():
        rows.append({"goal": f"{net} bit-exact on the GPU", "measured": result.get("verification"),
                     "met": bool(result.get("verification", {}).get("bit_exact"))})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("build", "run"))
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "cuda_bench")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    if args.mode == "build":
        sys.path.insert(0, str(ROOT))
        build(args.out, args.arch, args.only)
    else:
        run(args.out, args.iters, args.only)


if __name__ == "__main__":
    main()
