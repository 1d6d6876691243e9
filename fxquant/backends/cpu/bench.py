"""Side-by-side CPU latency of a run: PyTorch eager FP32, ORT FP32, ORT QDQ and fxquant-TVM, one process.

Only verified artifacts are timed (:func:`fxquant.bench.verified_artifact_dir`): the TVM library
is loaded from ``RUN/cpu/`` after the ``cpu`` target's report certifies it bit-exact for the run's
integer graph and a re-run on held-out inputs (through the target's ``run``) agrees; the QDQ model
likewise from ``RUN/onnx-qdq/``. The float baselines (PyTorch eager on the trained float model,
ORT on ``RUN/onnx-fp32/``) are not integer-exact and are marked ``verified: false``.

For each batch size the engines are timed in turns (:func:`fxquant.bench.time_runners`); reported
per engine: p50 / p90 latency in ms, throughput (inputs/s at p50), and the ratio to ORT FP32 at
p50. **Every engine runs with the same thread count** ``threads`` (default: the host's cores):
ORT ``intra_op_num_threads``, ``torch.set_num_threads`` and TVM's thread pool
(``runtime.config_threadpool``). Every engine takes the same float32 numpy input and returns numpy
(fxquant-TVM quantizes the input in its first kernel; the input is copied into a reused TVM
tensor, the output read through DLPack); these copies are part of each call. Every figure is
written with the CPU model and flags (:func:`fxquant.bench.machine`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fxquant.bench import (Engine, baseline_engine, machine, onnx_engine, time_engines, time_runners,
                           verified_artifact_dir, write_bench)

REFERENCE = "ORT FP32"
TVM_AFFINITY_BIG = 1
"""``runtime.config_threadpool`` mode: workers on the (big) cores."""


def tvm_runner(model: Any, x: np.ndarray) -> Callable[[], Any]:
    """One call of a loaded CPU module on float32 ``x`` (staged once; output read through DLPack)."""
    return lambda: np.from_dlpack(model.run_tvm(model.staged(0, x)))


def set_tvm_threads(threads: int) -> int:
    """Size TVM's thread pool to ``threads``; the pool size TVM reports afterwards."""
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(TVM_AFFINITY_BIG, threads)
    return int(tvm.get_global_func("runtime.NumThreads")())


def cpu_engine(dep: Any, threads: int) -> Engine:
    """fxquant-TVM on the verified ``RUN/cpu`` library (the files the cpu target built and verified)."""
    from fxquant.backends.cpu.build import CpuModel
    from fxquant.backends.registry import get_target

    target = get_target("cpu")
    out_dir, report = verified_artifact_dir(target, dep)
    model = CpuModel.load(out_dir)  # what CpuTarget.run loads, after its host check
    return Engine("fxquant-TVM", f"{target.name}/{report['artifact']['library']}", report["graph_fingerprint"],
                  True, lambda x: tvm_runner(model, x))


def torch_engine(dep: Any, threads: int) -> Engine:
    """PyTorch eager on the trained float model (quantizers stripped, BN folded)."""
    import torch

    from fxquant.backends.base import graph_fingerprint
    from fxquant.passes import StripQuantizers

    float_model = copy.deepcopy(dep.model)
    StripQuantizers()(float_model)
    float_model.eval()
    torch.set_num_threads(threads)

    def make(x: np.ndarray) -> Callable[[], Any]:
        xt = torch.from_numpy(np.asarray(x, np.float32))

        def run() -> Any:
            with torch.inference_mode():
                return float_model(xt)

        return run

    return Engine("PyTorch eager FP32", f"(trained float model of {dep.model_file.path.name})",
                  graph_fingerprint(dep.graph), False, make)


def bench_cpu(run_dir: Path, *, batches: tuple[int, ...] = (1, 64), threads: int | None = None,
              budget_s: float = 2.0) -> dict[str, Any]:
    """Time every engine on the run's verified artifacts; write ``RUN/bench-cpu.json`` / ``.md``.

    The returned report carries the markdown table under ``"markdown"`` (the CLI prints it).
    """
    from fxquant.backends.registry import get_target
    from fxquant.deployment import load_deployment

    threads = threads or os.cpu_count() or 1
    dep = load_deployment(run_dir)
    engines = [cpu_engine(dep, threads), onnx_engine(get_target("onnx-qdq"), dep, threads, "ORT fxquant QDQ"),
               baseline_engine(dep, threads), torch_engine(dep, threads)]
    engines = [engines[2], engines[3], engines[1], engines[0]]  # ORT FP32 first: the ratio's reference
    tvm_threads = set_tvm_threads(threads)
    x_all, _ = dep.held_out(max(batches))
    rows = time_engines(engines, x_all, batches, budget_s)
    sizes = {e.artifact: (dep.run.path / e.artifact).stat().st_size for e in engines
             if (dep.run.path / e.artifact).is_file()}
    result = {"target": "cpu", "machine": machine(threads), "tvm_num_threads": tvm_threads,
              "ort_intra_op_threads": threads, "torch_threads": threads, "rows": rows, "sizes_bytes": sizes}
    return write_bench(dep.run.path, "cpu", result, markdown(result))


def markdown(result: dict[str, Any]) -> str:
    from fxquant.bench import render_markdown

    m = result["machine"]
    table = render_markdown(f"CPU: {m['cpu']} ({m['cores']} cores; {' '.join(m['flags'])})", result["rows"],
                            m["threads"])
    lines = ["", "| artifact | bytes |", "|---|---:|"] + [f"| `{k}` | {v} |" for k, v in result["sizes_bytes"].items()]
    return table + "\n".join(lines) + "\n"


__all__ = ["bench_cpu", "set_tvm_threads", "time_runners", "tvm_runner"]
