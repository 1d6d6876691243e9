"""Side-by-side CPU latency: PyTorch eager FP32, ORT FP32, ORT int8 QDQ and fxquant-TVM, one process.

For each batch size the backends are timed in turns (blocks of calls after a warm-up, three
rounds), so a noisy shared machine slows all of them alike; reported per backend: p50 / p90
latency in ms, throughput (samples/s at p50), and the ratio to ORT FP32 at p50. ORT runs with
``intra_op_num_threads`` = host cores (``ORT_ENABLE_ALL``); TVM's pool size is ``TVM_NUM_THREADS``
(set it before the process starts). Every backend takes the same float32 numpy input and returns
numpy (fxquant-TVM quantizes the input in its first kernel; the input is copied into a reused
TVM tensor, the output read through DLPack) -- these copies are part of each call.
Every figure is written with the CPU model and flags (:func:`.features.host_cpu`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fxquant.backends.cpu.build import LIBRARY, PARAMS, CpuModel, export_cpu
from fxquant.backends.cpu.features import host_cpu
from fxquant.integer_graph import IntegerGraph
from fxquant.io import atomic_write_json, atomic_write_text

BENCH_JSON, BENCH_MD = "bench_cpu.json", "bench_cpu.md"
REFERENCE = "ORT FP32"
SETTLE_S = 0.1
"""Pause before each timed block, so the previous backend's spinning threads go to sleep."""


def _ort_runner(path: Path, x: np.ndarray) -> Callable[[], Any]:
    from fxquant.export.verify import session

    sess = session(Path(path), threads=host_cpu().cores)
    inp = sess.get_inputs()[0]
    feed = {inp.name: x.astype(np.float32)}
    return lambda: sess.run(None, feed)


def tvm_runner(model: CpuModel, x: np.ndarray) -> Callable[[], Any]:
    return lambda: np.from_dlpack(model.run_tvm(model.staged(0, x)))


def _torch_runner(torch_model: Any, x: np.ndarray) -> Callable[[], Any]:
    import torch

    xt = torch.from_numpy(x.astype(np.float32))
    torch_model.eval()

    def run() -> Any:
        with torch.inference_mode():
            return torch_model(xt)

    return run


def time_runners(runners: dict[str, Callable[[], Any]], budget_s: float, rounds: int = 3,
          min_runs: int = 5) -> dict[str, list[float]]:
    """Blocks of consecutive calls per backend, the backends taking turns for ``rounds`` rounds.

    Blocks rather than single interleaved calls, with a pause before each block: ORT's and TVM's
    thread pools spin after a call, and a pool still spinning steals the cores from the next
    backend (on a 2-core machine this alone made TVM 3x slower at batch 1).
    """
    times: dict[str, list[float]] = {k: [] for k in runners}
    slot = budget_s / (rounds * len(runners))
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(SETTLE_S)
            for _ in range(3):
                run()
            start = time.perf_counter()
            runs = 0
            while runs < min_runs or time.perf_counter() - start < slot:
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
                runs += 1
    return times


def _sizes(out_dir: Path, onnx_fp32: Path | None, onnx_qdq: Path | None) -> dict[str, int]:
    sizes = {"fxquant-TVM library": (out_dir / LIBRARY).stat().st_size,
             "fxquant-TVM params": (out_dir / PARAMS).stat().st_size}
    for label, path in (("ORT FP32 model", onnx_fp32), ("ORT int8 QDQ model", onnx_qdq)):
        if path is not None:
            sizes[label] = Path(path).stat().st_size
    return sizes


def bench_cpu(graph: IntegerGraph, out_dir: Path, *, batches: tuple[int, ...] = (1, 64),
              onnx_fp32: Path | None = None, onnx_qdq: Path | None = None, torch_model: Any = None,
              budget_s: float = 2.0) -> dict[str, Any]:
    """Time every available backend at each batch size; write ``bench_cpu.json`` / ``.md``.

    The returned report carries the markdown table under ``"markdown"`` (the CLI prints it).
    """
    out_dir = Path(out_dir)
    if not (out_dir / LIBRARY).exists() or not (out_dir / PARAMS).exists():
        export_cpu(graph, out_dir)
    model = CpuModel.load(out_dir)
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        x = rng.standard_normal((batch, *graph.inputs[0].shape)).astype(np.float32)
        runners: dict[str, Callable[[], Any]] = {}
        if torch_model is not None:
            runners["PyTorch eager FP32"] = _torch_runner(torch_model, x)
        if onnx_fp32 is not None:
            runners[REFERENCE] = _ort_runner(Path(onnx_fp32), x)
        if onnx_qdq is not None:
            runners["ORT int8 QDQ"] = _ort_runner(Path(onnx_qdq), x)
        runners["fxquant-TVM"] = tvm_runner(model, x)
        times = time_runners(runners, budget_s)
        ref = float(np.percentile(times[REFERENCE], 50)) if REFERENCE in times else None
        for name, ts in times.items():
            p50, p90 = float(np.percentile(ts, 50)), float(np.percentile(ts, 90))
            rows.append({"batch": batch, "backend": name, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3,
                         "throughput_per_s": batch / p50, "runs": len(ts),
                         "vs_ort_fp32": (p50 / ref) if ref else None})
    import tvm

    result = {"cpu": host_cpu().to_dict(), "tvm_num_threads": int(tvm.get_global_func("runtime.NumThreads")()),
              "ort_intra_op_threads": host_cpu().cores,
              "rows": rows, "sizes_bytes": _sizes(out_dir, onnx_fp32, onnx_qdq)}
    table = markdown(result)
    atomic_write_json(out_dir / BENCH_JSON, result)
    atomic_write_text(out_dir / BENCH_MD, table)
    return {**result, "markdown": table}


def markdown(result: dict[str, Any]) -> str:
    cpu = result["cpu"]
    lines = [f"CPU: {cpu['model']} ({cpu['cores']} cores; {' '.join(cpu['flags'])}), "
             f"TVM threads {result['tvm_num_threads']}, ORT intra-op threads {result['ort_intra_op_threads']}", "",
             "| batch | backend | p50 ms | p90 ms | samples/s | x ORT FP32 (p50) |", "|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = "" if r["vs_ort_fp32"] is None else f"{r['vs_ort_fp32']:.2f}"
        lines.append(f"| {r['batch']} | {r['backend']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['throughput_per_s']:.0f} | {ratio} |")
    lines += ["", "| artifact | bytes |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in result["sizes_bytes"].items()]
    return "\n".join(lines) + "\n"
