"""CPU build of the CUDA kernels' integer logic: the unscheduled PrimFuncs built for ``llvm``.

No GPU is needed: every distinct kernel of a :class:`~.plan.Plan` is built from the same
:func:`.kernels.primfunc` the CUDA schedule starts from (schedules move loops and memory scopes,
never the math; ``__dp4a`` is an exact int32 sum of four int8 products), and the launch sequence
runs through :class:`.run_cuda.PlanRunner` -- the class the GPU-host runner uses -- on numpy
arrays. ``CudaTarget`` exports this build as ``kernels_llvm.so`` beside the CUDA library and
verifies it against :meth:`fxquant.integer_graph.IntegerGraph.run`; it is what ``CudaTarget.run``
executes (on the CPU, not on a GPU).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fxquant.backends.cuda.kernels import primfunc
from fxquant.backends.cuda.plan import Plan
from fxquant.backends.cuda.run_cuda import PlanRunner
from fxquant.errors import ToolchainError


def build_llvm(plan: Plan) -> Any:
    """One llvm module holding every kernel of ``plan`` (unscheduled, serial loops)."""
    import tvm

    mod = tvm.IRModule({name: primfunc(spec).with_attr("global_symbol", name) for name, spec in plan.kernels.items()})
    try:
        return tvm.compile(mod, target="llvm")
    except tvm.error.TVMError as exc:
        raise ToolchainError(f"TVM failed to build the CUDA kernels' CPU check module: {exc}") from exc


def run_plan(plan_json: dict[str, Any], params: dict[str, np.ndarray], lib: Any,
             inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The plan's int8 / int16 outputs (as int64) for float32 ``inputs`` (by input name; int32 token ids for
    the plan's ``id_inputs``) on the llvm ``lib``."""
    import tvm

    class _Call:
        def __init__(self, f: Any) -> None:
            self.f = f

        def __call__(self, *arrays: np.ndarray) -> None:
            tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
            self.f(*tensors)
            arrays[-1][...] = tensors[-1].numpy()

    runner = PlanRunner(plan_json, lambda name: _Call(lib[name]), lambda shape, dtype: np.empty(shape, dtype), params)
    ids = set(plan_json.get("id_inputs", {}))  # token ids stay int32; every other input is float32
    xs = {k: np.asarray(v, np.int32 if k in ids else np.float32) for k, v in inputs.items()}
    n = next(iter(xs.values())).shape[0]
    return [o.astype(np.int64) for o in runner.run(xs, runner.buffers(n))]


def run_llvm(plan: Plan, lib: Any, x: np.ndarray) -> list[np.ndarray]:
    """The outputs of a one-input ``plan`` for float32 input ``x``."""
    (name,) = plan.inputs
    return run_plan(plan.to_json(), plan.params, lib, {name: x})
