"""Export an IntegerGraph as standalone CUDA kernels: source, shared library, params, runner.

Pipeline (:class:`fxquant.backends.cuda.target.CudaTarget` runs it): :func:`.plan.plan_graph` (one launch per op, residual adds fused, weights packed) ->
:func:`.kernels.primfunc` + :func:`.schedule.schedule` per distinct kernel -> ``tvm.compile``
for ``{"kind": "cuda", "arch": arch}`` with host ``cuda_host`` -> ``export_cuda_host`` (one CUDA
C++ file with tvm-ffi host wrappers, ``kernels.cu``) -> ``nvcc -shared`` (``kernels.so``, needs
only ``libtvm_ffi`` at run time). The unscheduled kernels are also built for llvm
(``kernels_llvm.so``, :mod:`.cpu_check`): the export verifies that build against
``IntegerGraph.run``. Seeded golden inputs and their reference integers (``reference.npz``) are
saved for the GPU-side check of ``run_cuda.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fxquant.backends.cuda.plan import Plan
from fxquant.errors import ExportError, ToolchainError, UnsupportedOpError
from fxquant.integer_graph import IntegerGraph
from fxquant.io import atomic_write, atomic_write_json, atomic_write_text, atomic_write_via_path

SOURCE, LIBRARY, LLVM_LIBRARY, PARAMS = "kernels.cu", "kernels.so", "kernels_llvm.so", "params.npz"
BASELINE, PLAN, REFERENCE, RUNNER, ONNX_FP32 = "baseline_weights.npz", "plan.json", "reference.npz", "run_cuda.py", "fp32.onnx"
GOLDEN_SAMPLES = 8
"""Seeded golden inputs saved with their reference outputs for the GPU-side check."""
NVCC_FLAGS = ("-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-diag-suppress", "174,177")


def cuda_target(arch: str) -> Any:
    import tvm

    return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "cuda_host"})


def cuda_source(plan: Plan, arch: str) -> str:
    """One CUDA C++ translation unit with every kernel of ``plan`` and its tvm-ffi host wrapper."""
    import tvm
    from tvm.backend.cuda import export_cuda_host

    from fxquant.backends.cuda.kernels import primfunc
    from fxquant.backends.cuda.schedule import schedule

    funcs = {}
    for name, spec in plan.kernels.items():
        try:
            funcs[name] = schedule(primfunc(spec), spec).with_attr("global_symbol", name)
        except (tvm.error.TVMError, tvm.s_tir.schedule.ScheduleError) as exc:
            raise ToolchainError(f"TVM could not schedule CUDA kernel {name} ({spec}): {exc}",
                                 "report this as a bug with the layer shapes") from exc
    try:
        ex = tvm.compile(tvm.IRModule(funcs), target=cuda_target(arch))
    except tvm.error.TVMError as exc:
        raise ToolchainError(f"TVM failed to generate CUDA for arch {arch}: {exc}", "check --arch (e.g. sm_80, sm_90)") from exc
    return export_cuda_host(ex.mod)


def find_nvcc() -> str | None:
    """``nvcc`` on PATH, else under ``$CUDA_HOME`` or ``/usr/local/cuda``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and Path(root, "bin", "nvcc").is_file():
            return str(Path(root, "bin", "nvcc"))
    return None


def nvcc_compile(source: Path, library: Path, arch: str) -> float:
    """``nvcc -shared`` ``source`` into ``library`` (atomically) linked to libtvm_ffi; returns seconds."""
    import tvm_ffi

    nvcc = find_nvcc()
    if nvcc is None:
        raise ToolchainError(f"nvcc not found: {source} was written but not compiled",
                             "install the CUDA toolkit (nvcc on PATH or CUDA_HOME), or compile it on a CUDA host")
    ffi = Path(tvm_ffi.__file__).parent
    fd, tmp = tempfile.mkstemp(dir=library.parent, prefix=f".{library.name}.", suffix=".tmp")
    os.close(fd)
    cmd = [nvcc, *NVCC_FLAGS, f"-arch={arch}", f"-I{ffi / 'include'}", f"-L{ffi / 'lib'}", "-ltvm_ffi",
           str(source), "-o", tmp]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise ToolchainError(f"nvcc failed on {source} (arch {arch}): {proc.stderr.strip()[-2000:]}",
                                 "check --arch and the CUDA toolkit version")
        os.replace(tmp, library)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return time.perf_counter() - t0


FLOAT_ATTRS = ("stride", "padding", "dilation", "kernel", "relu", "groups", "ceil_mode", "output_padding", "dim",
               "lo", "hi", "function", "params", "perm", "scale", "shape", "exponent", "causal", "start", "stop",
               "step", "index")
"""The op attributes the runner's torch float baseline reads (``lut`` tables stay in params.npz)."""


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v.item() if isinstance(v, np.generic) else v


def float_graph(graph: IntegerGraph) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """The float network of the torch baselines: quantizers removed, weights ``w * 2^-FL_w`` and
    biases ``b * 2^-(FL_in + FL_w)``, stored as their integers (int8 / int32, 4x smaller than
    float32) with the frac bits in the op entry; the runner dequantizes them exactly."""
    ops, params = [], {}
    for op in graph.ops:
        attrs = {k: _jsonable(v) for k, v in op.attrs.items() if k in FLOAT_ATTRS}
        shape = graph.value(op.output).shape
        if op.kind in ("clamp", "mul_pow2"):  # real bounds / factor: the float op needs the grid's LSB
            attrs["frac_bits"] = op.out_fmt.frac_bits
        if op.kind == "layernorm":  # the float eps: eps_D / (n^3 2^(2 FL_in))
            n, fl_in = shape[-1], graph.value(op.inputs[0]).fmt.frac_bits
            attrs["eps_float"] = float(op.attrs["eps"]) / float(n) ** 3 * 2.0 ** (-2 * fl_in)
        entry: dict[str, Any] = {"kind": op.kind, "inputs": list(op.inputs), "output": op.output, "weight": None,
                                 "bias": None, "attrs": attrs, "shape": list(shape)}
        if op.weight is not None and op.weight_fmt is not None and op.weight_fmt.frac_bits is not None:
            entry["weight"], entry["weight_frac_bits"] = f"{op.name}.weight", op.weight_fmt.frac_bits
            params[entry["weight"]] = np.asarray(op.weight).astype(np.int8)  # <= 8 bits: CudaTarget.check
            if op.bias is not None:
                fl_in = graph.value(op.inputs[0]).fmt.frac_bits
                assert fl_in is not None  # plan_graph checked the formats
                if op.kind == "layernorm":  # beta sits on FL_w + FL_h, gamma h's grid
                    from fxquant.fixed_point import LAYERNORM_FRAC_BITS
                    fl_in = LAYERNORM_FRAC_BITS
                entry["bias"], entry["bias_frac_bits"] = f"{op.name}.bias", fl_in + op.weight_fmt.frac_bits
                params[entry["bias"]] = np.asarray(op.bias).astype(np.int32)
        ops.append(entry)
    return ops, params


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    atomic_write(path, lambda f: np.savez(f, **arrays))


def input_spec(v: Any, plan: Plan) -> dict[str, Any]:
    """``plan.json``'s entry of graph input ``v``: float32 (quantized on the device), or int32 token ids
    with the ``rows`` of the smallest table reading them and that embedding ``op``."""
    spec = {"name": v.name, "shape": list(v.shape), "frac_bits": v.fmt.frac_bits, "dtype": "float32"}
    if v.name in plan.id_inputs:
        rows, op = plan.id_inputs[v.name]
        spec.update(dtype="int32", rows=rows, op=op)
    return spec


def golden_inputs(graph: IntegerGraph, n: int = GOLDEN_SAMPLES, seed: int = 0) -> list[np.ndarray]:
    """Per graph input, ``n`` seeded float32 inputs ``k * 2^-FL`` over its format's whole integer range
    (token ids read by an embedding: over ``[0, V)`` of its smallest table, never out of range)."""
    rng = np.random.default_rng(seed)
    rows: dict[str, int] = {}
    for op in graph.ops:
        if op.kind == "embedding" and op.weight is not None:
            rows[op.inputs[0]] = min(rows.get(op.inputs[0], op.weight.shape[0]), op.weight.shape[0])
    out = []
    for v in graph.inputs:
        lo, hi = (0, min(rows[v.name], v.fmt.qmax + 1)) if v.name in rows else (v.fmt.qmin, v.fmt.qmax + 1)
        k = rng.integers(lo, hi, size=(n, *v.shape))
        out.append(np.ldexp(k.astype(np.float64), -v.fmt.frac_bits).astype(np.float32))
    return out


def write_artifact(graph: IntegerGraph, plan: Plan, out_dir: Path, arch: str) -> dict[str, Any]:
    """Every file of the export (see :mod:`fxquant.backends.cuda.target`); returns the build facts."""
    from fxquant.backends.cuda.cpu_check import build_llvm
    from fxquant.export.onnx_qdq import to_fp32

    t0 = time.perf_counter()
    source = cuda_source(plan, arch)
    codegen_s = time.perf_counter() - t0
    atomic_write_text(out_dir / SOURCE, source)
    ops, fparams = float_graph(graph)
    plan_json = {**plan.to_json(), "float_graph": ops, "arch": arch,
                 "input_specs": [input_spec(v, plan) for v in graph.inputs],
                 "kernels": {name: repr(spec) for name, spec in plan.kernels.items()}}
    atomic_write_json(out_dir / PLAN, plan_json)
    save_npz(out_dir / PARAMS, plan.params)
    save_npz(out_dir / BASELINE, fparams)
    xs = golden_inputs(graph)
    ref = graph.run(*graph.quantize_inputs(*xs))
    xs = [x.astype(np.int32) if v.name in plan.id_inputs else x for v, x in zip(graph.inputs, xs)]  # ids stay integer
    save_npz(out_dir / REFERENCE, {**{f"input:{v.name}": x for v, x in zip(graph.inputs, xs)},
                                   **{f"output:{k}": o for k, o in ref.items()}})
    try:  # the ORT baseline of run_cuda.py's latency table: skipped where the ONNX exporter lacks an op
        fp32 = to_fp32(graph)
    except (ExportError, UnsupportedOpError):
        fp32 = None
    else:
        atomic_write(out_dir / ONNX_FP32, lambda f: f.write(fp32.SerializeToString()))
    atomic_write_text(out_dir / RUNNER, (Path(__file__).parent / RUNNER).read_text())
    atomic_write_via_path(out_dir / LLVM_LIBRARY, build_llvm(plan).export_library)
    nvcc_s = nvcc_compile(out_dir / SOURCE, out_dir / LIBRARY, arch)
    return {
        "arch": arch, "host": "cuda_host", "source": SOURCE, "library": LIBRARY, "cpu_library": LLVM_LIBRARY,
        "kernels": len(plan.kernels), "launches": len(plan.launches), "codegen_seconds": round(codegen_s, 2),
        "nvcc_seconds": round(nvcc_s, 2), "params": PARAMS,
        "param_bytes": int(sum(p.nbytes for p in plan.params.values())),
        "entry": "tvm_ffi.load_module('kernels.so')[kernel](*args, out) per plan.json launch; run_cuda.py runs it",
        "inputs": [{"name": v.name, "shape": ["n", *v.shape], "frac_bits": v.fmt.frac_bits} for v in graph.inputs],
        "outputs": list(graph.outputs), "golden_samples": int(len(xs[0])),
        "fp32_onnx": ONNX_FP32 if fp32 is not None else None,
        "gpu_check": f"not run here: `python {RUNNER}` on a CUDA host compares kernels.so with {REFERENCE}",
    }
