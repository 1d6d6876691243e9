"""CPU check of the CUDA kernels' integer logic: the unscheduled PrimFuncs built for ``llvm``.

No GPU is needed: every distinct kernel of a :class:`~.plan.Plan` is built from the same
:func:`.kernels.primfunc` the CUDA schedule starts from (schedules move loops and memory scopes,
never the math; ``__dp4a`` is an exact int32 sum of four int8 products), and the launch sequence
runs through :class:`.run_cuda.PlanRunner` -- the class the GPU-host runner uses -- on numpy
arrays. The result must equal :meth:`fxquant.integer_graph.IntegerGraph.run` bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fxquant.backends.cuda.kernels import primfunc
from fxquant.backends.cuda.plan import Plan
from fxquant.backends.cuda.run_cuda import PlanRunner
from fxquant.errors import ExportError, ToolchainError
from fxquant.integer_graph import IntegerGraph


def build_llvm(plan: Plan) -> Any:
    """One llvm module holding every kernel of ``plan`` (unscheduled, serial loops)."""
    import tvm

    mod = tvm.IRModule({name: primfunc(spec).with_attr("global_symbol", name) for name, spec in plan.kernels.items()})
    try:
        return tvm.compile(mod, target="llvm")
    except tvm.error.TVMError as exc:
        raise ToolchainError(f"TVM failed to build the CUDA kernels' CPU check module: {exc}") from exc


def run_llvm(plan: Plan, lib: Any, x: np.ndarray) -> list[np.ndarray]:
    """The plan's int8 outputs (as int64) for float32 input ``x``."""
    import tvm

    class _Call:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __call__(self, *arrays: np.ndarray) -> None:
            tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
            self.f(*tensors)
            arrays[-1][...] = tensors[-1].numpy()

    runner = PlanRunner(plan.to_json(), lambda name: _Call(lib[name]), lambda shape: np.empty(shape, np.int8),
                        plan.params)
    (name,) = plan.inputs
    x = np.asarray(x, np.float32)
    return [o.astype(np.int64) for o in runner.run({name: x}, runner.buffers(x.shape[0]))]


def check_on_cpu(graph: IntegerGraph, plan: Plan, x: np.ndarray) -> dict[str, Any]:
    """Run ``x`` through the llvm build of the plan and ``graph.run``; raise on any difference."""
    ref = graph.run(*graph.quantize_inputs(np.asarray(x, np.float32)))
    got = run_llvm(plan, build_llvm(plan), x)
    for name, out in zip(graph.outputs, got):
        diff = int(np.count_nonzero(out != ref[name])) if out.shape == ref[name].shape else out.size
        if diff:
            raise ExportError(f"CUDA kernels (CPU build) output {name!r} differs from the integer reference in "
                              f"{diff} of {ref[name].size} elements", "report this as a bug with the export directory")
    return {"samples": int(np.asarray(x).shape[0]), "bit_exact": True}
