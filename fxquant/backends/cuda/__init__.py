"""TVM CUDA backend: an IntegerGraph as standalone int8 CUDA kernels (dp4a, packed int4 weights).

``export_cuda`` writes the CUDA source, an nvcc-built shared library loadable with only the
``apache-tvm-ffi`` wheel, the integer parameters and ``run_cuda.py`` (bit-exactness check and
latency table on a GPU host). TVM is imported only when it is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fxquant.integer_graph import IntegerGraph


def export_cuda(graph: IntegerGraph, out_dir: Path, *, arch: str = "sm_90",
                verify_inputs: np.ndarray | None = None) -> dict[str, Any]:
    """Write ``kernels.cu`` (+ ``kernels.so``), params, ``run_cuda.py`` and ``cuda_report.json``.

    With ``verify_inputs`` (float NCHW / NC), the kernels' integer logic is checked on the CPU
    against ``graph.run`` and the inputs + reference outputs are saved as ``reference.npz`` for
    the GPU-side check. Without nvcc, raises :class:`fxquant.errors.ToolchainError` after writing
    everything else.
    """
    from fxquant.backends.cuda.build import export_cuda as _export

    return _export(graph, out_dir, arch=arch, verify_inputs=verify_inputs)


__all__ = ["export_cuda"]
