"""Latency measurement shared by every ``fxquant bench`` target.

:func:`measure` times a callable after warm-up and reports p50/p90 latency (ms) and throughput
(inputs/s). :func:`bench_onnx` compares, in one process and on the same inputs, ORT running the
FP32 export against ORT running the fxquant QDQ export, batch 1 and 64, with file sizes, and
writes ``bench.json`` + ``bench.md`` into the run directory. Ratios are taken within one run,
never across machines.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fxquant.io import atomic_write_json, atomic_write_text


def measure(fn: Callable[[], Any], batch: int, warmup: int = 5, min_iters: int = 20,
            min_seconds: float = 0.5) -> dict[str, float]:
    """p50/p90 latency (ms) and throughput (inputs/s) of ``fn`` over ≥ ``min_iters`` calls."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_iters or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    p50 = float(np.percentile(times, 50)) * 1e3
    return {"p50_ms": p50, "p90_ms": float(np.percentile(times, 90)) * 1e3,
            "throughput": batch / (p50 / 1e3), "iters": len(times)}


def machine() -> dict[str, Any]:
    """CPU model, flags of interest and thread count, recorded with every figure."""
    from fxquant.host import host_cpu

    info = host_cpu()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512bw", "avx_vnni", "amx_int8", "amx_tile")
    return {"cpu": info.model, "flags": [f for f in wanted if f in info.flags], "cores": os.cpu_count()}


def render_markdown(title: str, rows: list[dict[str, Any]], baseline: str) -> str:
    """A table of ``name, batch, p50, p90, throughput, ratio vs baseline`` rows."""
    lines = [f"## {title}", "", "| engine | batch | p50 ms | p90 ms | inputs/s | vs " + baseline + " |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['throughput']:.0f} | {r.get('ratio', float('nan')):.2f}x |")
    return "\n".join(lines) + "\n"


def onnx_exports(run_dir: Path, graph) -> dict[str, Path]:
    """``{"fp32": …, "qdq": …}`` ONNX files of a run, exported (and verified) here if missing."""
    from fxquant.export.onnx_qdq import export_onnx

    paths = {}
    for flavour, name in (("fp32", "model.fp32.onnx"), ("qdq", "model.onnx")):
        if not (Path(run_dir) / name).exists():
            export_onnx(graph, Path(run_dir), flavour=flavour)
        paths[flavour] = Path(run_dir) / name
    return paths


def bench_onnx(run_dir: Path, batches: tuple[int, ...] = (1, 64)) -> dict[str, Any]:
    """ORT FP32 vs ORT fxquant-QDQ on the run's exports (made here if missing)."""
    from fxquant.deployment import load_deployment
    from fxquant.export.verify import session

    dep = load_deployment(run_dir)
    run, graph = dep.run, dep.graph
    paths = onnx_exports(run.path, graph)
    x_all, _ = dep.held_out(max(batches))
    rows: list[dict[str, Any]] = []
    for batch in batches:
        x = np.resize(x_all, (batch, *x_all.shape[1:])).astype(np.float32)
        base = None
        for flavour, engine in (("fp32", "ORT FP32"), ("qdq", "ORT fxquant QDQ")):
            sess = session(paths[flavour], threads=os.cpu_count() or 1)
            feed = {sess.get_inputs()[0].name: x}
            stats = measure(lambda: sess.run(None, feed), batch)
            base = base or stats["p50_ms"]
            rows.append({"engine": engine, "batch": batch, **stats, "ratio": stats["p50_ms"] / base})
    sizes = {flavour: p.stat().st_size for flavour, p in paths.items()}
    report = {"machine": machine(), "rows": rows, "sizes_bytes": sizes,
              "size_ratio_qdq_vs_fp32": sizes["qdq"] / sizes["fp32"],
              "theoretical_bytes": graph.param_bits() / 8}
    atomic_write_json(run.path / "bench.json", report)
    md = render_markdown(f"ONNX Runtime on {report['machine']['cpu']}", rows, "ORT FP32")
    md += f"\nSizes: FP32 {sizes['fp32']} B, QDQ {sizes['qdq']} B ({report['size_ratio_qdq_vs_fp32']:.3f}x); " \
          f"Σ params·bits/8 = {report['theoretical_bytes']:.0f} B\n"
    atomic_write_text(run.path / "bench.md", md)
    report["markdown"] = md
    return report
