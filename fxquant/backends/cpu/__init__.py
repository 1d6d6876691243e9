"""TVM CPU backend with fxquant's own low-bit x86 kernels (AVX2; AVX-512 VNNI for linear layers).

``export_cpu`` builds an :class:`~fxquant.integer_graph.IntegerGraph` into a shared library +
``params.npz`` bit-exact with :meth:`IntegerGraph.run`; ``bench_cpu`` times it next to ONNX
Runtime. TVM is imported only when one of them is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fxquant.integer_graph import IntegerGraph


def export_cpu(graph: IntegerGraph, out_dir: Path, *, mcpu: str = "host",
               verify_inputs: np.ndarray | None = None) -> dict[str, Any]:
    """Build, write ``fxquant_cpu.so`` + ``params.npz`` + ``cpu_report.json``, verify bit-exactly."""
    from fxquant.backends.cpu.build import export_cpu as _export

    return _export(graph, out_dir, mcpu=mcpu, verify_inputs=verify_inputs)


def bench_cpu(graph: IntegerGraph, out_dir: Path, *, batches: tuple[int, ...] = (1, 64),
              onnx_fp32: Path | None = None, onnx_qdq: Path | None = None, torch_model: Any = None,
              budget_s: float = 2.0) -> dict[str, Any]:
    """Time PyTorch FP32, ORT FP32, ORT QDQ int8 and fxquant-TVM side by side; write JSON + markdown."""
    from fxquant.backends.cpu.bench import bench_cpu as _bench

    return _bench(graph, out_dir, batches=batches, onnx_fp32=onnx_fp32, onnx_qdq=onnx_qdq, torch_model=torch_model,
                  budget_s=budget_s)


__all__ = ["bench_cpu", "export_cpu"]
