"""TVM CPU backend with fxquant's own low-bit x86 kernels (AVX2; AVX-512 VNNI for linear layers).

:class:`fxquant.backends.cpu.target.CpuTarget` (registry name ``cpu``) builds an
:class:`~fxquant.integer_graph.IntegerGraph` into a shared library + ``params.npz`` bit-exact with
:meth:`IntegerGraph.run`; :func:`fxquant.backends.base.export` checks, builds, verifies and places
it. TVM is imported only when a build or run happens. See ``docs/tvm_cpu.md``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fxquant.integer_graph import IntegerGraph


def bench_cpu(graph: IntegerGraph, out_dir: Path, *, batches: tuple[int, ...] = (1, 64),
              onnx_fp32: Path | None = None, onnx_qdq: Path | None = None, torch_model: Any = None,
              budget_s: float = 2.0) -> dict[str, Any]:
    """Time PyTorch FP32, ORT FP32, ORT QDQ int8 and fxquant-TVM side by side; write JSON + markdown."""
    from fxquant.backends.cpu.bench import bench_cpu as _bench

    return _bench(graph, out_dir, batches=batches, onnx_fp32=onnx_fp32, onnx_qdq=onnx_qdq, torch_model=torch_model,
                  budget_s=budget_s)


__all__ = ["bench_cpu"]
