"""The TVM CUDA target: an IntegerGraph as standalone int8 CUDA kernels (dp4a, packed int4 weights).

The contract (:mod:`fxquant.backends.base`): ``check`` lists every reason the kernels cannot build
a graph (:func:`.plan.graph_problems`: the :mod:`fxquant.legality` rules with this target's
limits); ``build`` plans, generates and compiles (:mod:`.build`) and writes, all relative to
``out_dir``::

    kernels.cu            every kernel + its tvm-ffi host wrapper
    kernels.so            nvcc -shared of kernels.cu (needs only libtvm_ffi at run time)
    kernels_llvm.so       the same kernels' unscheduled TIR built for llvm (the CPU check)
    plan.json             launch sequence, views, input shape / frac bits, float graph, arch
    params.npz            packed int8 / int4 weights, int32 biases
    reference.npz         seeded golden inputs (``input:<name>``) and their IntegerGraph.run outputs
                          (``output:<name>``), for the GPU-side check
    baseline_weights.npz  integer weights of the torch float baselines; fp32.onnx for ORT (where the
                          ONNX exporter has every op's float form)
    run_cuda.py           the GPU-host runner: bit-exactness on reference.npz, latency table

``run`` executes ``kernels_llvm.so`` through the runner's own ``PlanRunner`` on the CPU: **no GPU
result is claimed** (``ran`` says so); the GPU check is ``python run_cuda.py`` on a CUDA host.

Limits: weights 2..8 bits (``__dp4a`` multiplies int8 quads; weights of at most 4 bits are packed
two per byte); activations 2..8 bits (int8), and 9..16 bits (int16) where the producing and every
consuming kernel take int16 (:data:`.plan.WIDE_OUT` / :data:`.plan.WIDE_IN`: element-wise ops,
``matmul``, slices / transposes / views, ``softmax``, ``layernorm``, embedding and GEMM outputs -- never
a GEMM's input); int32 accumulators (average pools: every window divisor's ``sum * M``);
``linear`` token-wise on ``[batch, *tokens, features]``; ``mul`` broadcasting size-1 dims of
equal-rank inputs; ``matmul`` of ``[.., M, K] x [.., K, N]`` with equal leading dims; undilated
average pools; ``embedding``, ``slice`` / select, ``softmax`` (mask, causal) and ``layernorm`` within
:func:`fxquant.legality.transformer_problems`. Any number of graph inputs, each quantized on the
device -- except token ids: an input read only by embeddings is passed as int32 (up to 16-bit ids)
and range-checked on the host (:func:`check_ids`, the reference's :class:`InputRangeError`).
Kernels per op: :mod:`.plan`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fxquant.backends.base import Problem, Target, refuse
from fxquant.backends.cuda import plan as cuda_plan
from fxquant.errors import InputRangeError, RunDirError, UsageError
from fxquant.integer_graph import IntegerGraph


def _check_arch(arch: str) -> None:
    if not re.fullmatch(r"sm_\d+[a-z]?", str(arch)):
        raise UsageError(f"--arch {arch!r} is not a CUDA architecture", "use e.g. sm_80, sm_89, sm_90")


def check_ids(ids: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Token ids of an id input (``plan.json`` input spec with ``rows`` and ``op``) as int32;
    :class:`InputRangeError` (as ``IntegerGraph.run``) for an id outside ``[0, rows)``."""
    rows = int(spec["rows"])
    bad = ids[(ids < 0) | (ids >= rows)]
    if bad.size:
        raise InputRangeError(f"op {spec['op']!r} (embedding): token id {int(bad.reshape(-1)[0])} outside [0, {rows}) "
                              f"({bad.size} of {ids.size} ids)", "feed ids of this vocabulary; ids are never clipped")
    return ids.astype(np.int32)


class CudaTarget(Target):
    name = "cuda"
    summary = "TVM-generated int8 CUDA kernels (dp4a, packed int4 weights), nvcc-built, runnable with tvm-ffi"
    ran = "the CUDA kernels' TIR built for llvm and run on the CPU (not on a GPU)"
    ops = cuda_plan.OPS
    limits = {"act_bits": (2, cuda_plan.MAX_ACT_BITS), "weight_bits": (2, cuda_plan.MAX_WEIGHT_BITS),
              "acc_bits": 32}
    option_defaults = {"arch": "sm_90"}

    def unavailable(self) -> str | None:
        from fxquant.backends.cuda.build import find_nvcc

        if find_nvcc() is None:
            return "nvcc not found (CUDA toolkit on PATH or CUDA_HOME): kernels.so cannot be built"
        from tvm.support.cc import get_cc

        if get_cc() is None:
            return "no C++ compiler (g++, clang++ or $CXX) to link the CPU build of the kernels"
        return None

    def check_graph(self, graph: IntegerGraph, arch: str = "sm_90") -> list[Problem]:
        _check_arch(arch)
        return cuda_plan.graph_problems(graph)

    def build(self, graph: IntegerGraph, out_dir: Path, arch: str = "sm_90") -> dict[str, Any]:
        from fxquant.backends.cuda.build import write_artifact

        problems = self.check(graph, arch=arch)
        if problems:
            raise refuse(self, problems)
        return write_artifact(graph, cuda_plan.plan_graph(graph), Path(out_dir), arch)

    def run(self, out_dir: Path, int_inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        import tvm

        from fxquant.backends.cuda.build import LLVM_LIBRARY, PARAMS, PLAN
        from fxquant.backends.cuda.cpu_check import run_plan

        out_dir = Path(out_dir)
        try:
            plan = json.loads((out_dir / PLAN).read_text())
            with np.load(out_dir / PARAMS) as f:
                params = {k: f[k] for k in f.files}
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{out_dir} holds no CUDA build ({exc})", "run `fxquant export --target cuda` first") from exc
        specs = plan["input_specs"]
        if len(int_inputs) != len(specs):
            raise UsageError(f"the CUDA build in {out_dir} takes {len(specs)} input(s), got {len(int_inputs)}")
        xs = {}
        for spec, k in zip(specs, int_inputs):
            if spec.get("dtype") == "int32":  # token ids: integers end to end, checked here (never clipped)
                xs[spec["name"]] = check_ids(np.asarray(k), spec)
            else:
                xs[spec["name"]] = np.ldexp(np.asarray(k, np.float64), -spec["frac_bits"]).astype(np.float32)  # exact: <= 8 bits
        lib = tvm.runtime.load_module(str(out_dir / LLVM_LIBRARY))
        return run_plan(plan, params, lib, xs)


__all__ = ["CudaTarget"]
