"""Build an IntegerGraph into a TVM shared library + params, verify it, and load it back.

Pipeline: :func:`.relax_builder.graph_to_relax` (QDQ-form Relax) -> :class:`RewriteQuantizedOps`
(every op becomes ``call_tir`` of an fxquant kernel; anything left raises
:class:`~fxquant.errors.UnsupportedOpError` naming it) -> :func:`lift_constants` (packed weights
become function parameters, saved as ``params.npz``) -> the VM lowering passes of TVM's default
pipeline (no ``LegalizeOps`` work is left, so no op reaches the unscheduled default lowering) ->
``export_library``. :class:`fxquant.backends.cpu.target.CpuTarget` drives it (check, build,
verification, report). The library needs only ``tvm.runtime``: ``load_module`` +
``tvm.runtime.vm.VirtualMachine``; ``main(x_float32, *params)`` quantizes ``x`` itself (round half
to even, as ``IntegerGraph.quantize_inputs``) and returns the int8 output integers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from fxquant.backends.cpu.features import LlvmCpu
from fxquant.errors import ToolchainError, UnsupportedOpError
from fxquant.integer_graph import IntegerGraph
from fxquant.io import atomic_write_via_path

LIBRARY, PARAMS, ENTRY = "fxquant_cpu.so", "params.npz", "entry.json"


def lower(graph: IntegerGraph, target: LlvmCpu) -> tuple[Any, dict[str, np.ndarray]]:
    """The rewritten Relax module (constants lifted to parameters) and its parameter arrays.

    Refuses (every problem in one :class:`UnsupportedOpError`) what ``CpuTarget.check`` refuses."""
    from fxquant.backends.cpu.relax_builder import graph_to_relax
    from fxquant.backends.cpu.rewrite_quantized_ops import RewriteQuantizedOps
    from fxquant.backends.cpu.target import OPS, graph_problems
    from fxquant.backends.base import Problem

    problems = [Problem(op.name, op.kind, f"op kind {op.kind!r} has no fxquant CPU kernel")
                for op in graph.ops if op.kind not in OPS] + graph_problems(graph, target.vnni)
    if problems:
        raise UnsupportedOpError(f"the CPU kernels cannot build this graph ({len(problems)} problems): "
                                 + "; ".join(map(str, problems)), "see docs/coverage.md")

    return finish_lowering(RewriteQuantizedOps(target)(graph_to_relax(graph)))


def finish_lowering(mod: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """After the rewrite: drop dead functions, refuse leftovers, lift constants to parameters."""
    from tvm import relax

    from fxquant.backends.cpu.rewrite_quantized_ops import unrewritten_ops

    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    left = unrewritten_ops(mod)
    if left:
        raise UnsupportedOpError(f"ops {', '.join(left)} were not rewritten into fxquant CPU kernels",
                                 "they would run through TVM's unscheduled default lowering")
    return lift_constants(mod)


def lift_constants(mod: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """Replace every constant argument of ``main`` by a new parameter ``p<i>``."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    params: dict[str, np.ndarray] = {}
    new_vars: list[relax.Var] = []

    @mutator
    class _Lift(PyExprMutator):
        def visit_generic_const_(self, op: Any) -> Any:  # noqa: N802 (TVM visitor name)
            value = op.value.numpy()
            name = f"p{len(params)}"
            var = relax.Var(name, relax.TensorType(list(value.shape), str(value.dtype)))
            params[name] = value
            new_vars.append(var)
            return var

    func = mod["main"]
    body = _Lift().visit_expr(func.body)
    lifted = relax.Function(list(func.params) + new_vars, body, func.ret_ty, func.is_pure, func.attrs)
    mod["main"] = lifted
    return mod, params


def vm_pipeline() -> Any:
    """TVM's default Relax build pipeline minus ``LegalizeOps`` (nothing is left to legalize) and
    ``RewriteDataflowReshape`` (it inspects every ``call_tir`` callee as a block-form TensorIR
    function and rejects the vector-TIR kernels; the pass already emits ``vm.builtin.reshape``)."""
    import tvm
    from tvm.relax import transform

    return tvm.transform.Sequential([
        transform.ToNonDataflow(), transform.RemovePurityChecking(), transform.CallTIRRewrite(),
        transform.StaticPlanBlockMemory(), transform.LowerAllocTensor(), transform.KillAfterLastUse(),
        transform.LowerRuntimeBuiltin(), transform.ComputePrimValue(), transform.VMShapeLower(),
        transform.AttachGlobalSymbol(),
    ])


def compile_graph(graph: IntegerGraph, target: LlvmCpu) -> tuple[Any, dict[str, np.ndarray]]:
    """``(executable, params)`` for ``graph`` on ``target``."""
    import tvm
    from tvm import relax

    mod, params = lower(graph, target)
    try:
        ex = relax.build(mod, tvm.target.Target(target.tvm_target()), relax_pipeline=vm_pipeline())
    except (tvm.error.InternalError, tvm.error.DiagnosticError, tvm.error.OpError) as exc:  # the compiler failed
        raise ToolchainError(f"TVM failed to build the CPU module for mcpu={target.mcpu}: {exc}") from exc
    return ex, params


TVM_AFFINITY_BIG = 1
"""``runtime.config_threadpool`` mode: workers on the (big) cores (TVM's own default mode)."""

_TVM_POOL: dict[str, int] = {}
"""``default``: the count a model runs on unless told (captured once); ``configured``: the count last set."""


def default_tvm_threads() -> int:
    """TVM's own default: ``TVM_NUM_THREADS`` as the user set it, else half the logical CPUs on x86
    (one per physical core), all of them elsewhere; captured at the first call, before fxquant
    raises the variable to reserve a larger pool."""
    import os
    import platform

    if "default" not in _TVM_POOL:
        user = int(os.environ.get("TVM_NUM_THREADS", "0") or 0)
        cpus = os.cpu_count() or 1
        _TVM_POOL["default"] = user or max(1, cpus // 2 if platform.machine() in ("x86_64", "AMD64") else cpus)
    return _TVM_POOL["default"]


def reserve_tvm_threads(threads: int | None = None) -> int:
    """Make ``TVM_NUM_THREADS`` at least ``threads`` and at least the logical CPU count, and return it.

    TVM sizes its thread pool once, at its first use, to ``TVM_NUM_THREADS``; ``config_threadpool``
    can then run any count up to that size but never grow it. Reserving every logical CPU lets a
    process that first ran a model on the default count bench later on 1, 2 or all of them (unused
    workers sleep). Without the variable every parallel launch also reads
    ``/sys/devices/system/cpu/online`` to find its default (an open, a read and a close per kernel:
    25 % of a ViT's batch-32 call on a 2-vCPU VM)."""
    import os

    default_tvm_threads()  # the user's own value, before it is raised
    current = int(os.environ.get("TVM_NUM_THREADS", "0") or 0)
    wanted = max(threads or 0, os.cpu_count() or 1)
    if current < wanted:
        os.environ["TVM_NUM_THREADS"] = str(wanted)
    return max(current, wanted)


def set_tvm_threads(threads: int | None = None) -> int:
    """Run TVM's kernels on ``threads`` threads (``None``: :func:`default_tvm_threads`) and return the
    count TVM reports (checked).

    The pool is reserved first (:func:`reserve_tvm_threads`); one that TVM sized smaller before
    fxquant saw it (a kernel run with a small ``TVM_NUM_THREADS``) cannot grow, which is a
    :class:`~fxquant.errors.ToolchainError` here rather than a bench that silently times TVM on
    fewer threads than the other engines."""
    import tvm

    from fxquant.errors import ToolchainError

    threads = threads or default_tvm_threads()
    reserve_tvm_threads(threads)
    tvm.get_global_func("runtime.config_threadpool")(TVM_AFFINITY_BIG, threads)
    got = int(tvm.get_global_func("runtime.NumThreads")())
    if got != threads:
        raise ToolchainError(f"TVM's thread pool runs {got} thread(s), {threads} asked: it was sized when this "
                             "process first ran a TVM kernel and cannot grow",
                             f"set TVM_NUM_THREADS={threads} (or more) before the first run, or bench in a fresh process")
    _TVM_POOL["configured"] = got
    return got


class CpuModel:
    """A built model: ``run(*float32 inputs) -> list of int64 output integers`` (any batch size)."""

    def __init__(self, module: Any, params: dict[str, np.ndarray], input_dtypes: list[str] | None = None) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        if "configured" not in _TVM_POOL:
            set_tvm_threads()  # the default count, on a pool that can still serve any other
        self.input_dtypes = input_dtypes or []
        """``main``'s dtype per input (float32; int32 token ids); float32 where not listed."""
        self.vm = VirtualMachine(module, tvm.cpu())
        self.params = [tvm.runtime.tensor(params[f"p{i}"]) for i in range(len(params))]
        self._main = self.vm["main"]
        self._staging: dict[tuple[int, tuple[int, ...]], tuple[Any, np.ndarray]] = {}

    @classmethod
    def load(cls, out_dir: Path) -> "CpuModel":
        import tvm

        import json

        with np.load(out_dir / PARAMS) as data:
            params = {k: data[k] for k in data.files}
        entry = json.loads((out_dir / ENTRY).read_text()) if (out_dir / ENTRY).is_file() else {}
        dtypes = [spec.get("dtype", "float32") for spec in entry.get("inputs", [])]
        return cls(tvm.runtime.load_module(str(out_dir / LIBRARY)), params, dtypes)

    def run_tvm(self, *inputs: Any) -> Any:
        return self._main(*inputs, *self.params)

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """float32 inputs (int32 token ids) -> the output integers (int64 copies)."""
        out = self.run_tvm(*[self.staged(i, x) for i, x in enumerate(inputs)])
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [np.from_dlpack(o).astype(np.int64) for o in outs]

    def staged(self, index: int, x: np.ndarray) -> Any:
        """``x`` copied into a reused TVM input tensor of its shape and the input's dtype (a numpy view of
        it is kept): creating a TVM tensor per call costs 15-30 us, more than a small model's whole run.
        Token ids (an int32 input) must be integers already (:func:`.target.model_input` checks them)."""
        import tvm

        dtype = self.input_dtypes[index] if index < len(self.input_dtypes) else "float32"
        key = (index, x.shape)
        if key not in self._staging:
            tensor = tvm.runtime.empty(x.shape, dtype)
            self._staging[key] = (tensor, np.from_dlpack(tensor))
        tensor, view = self._staging[key]
        if dtype != "float32" and not np.issubdtype(np.asarray(x).dtype, np.integer):
            if np.any(np.asarray(x) != np.floor(x)):
                from fxquant.errors import InputRangeError

                raise InputRangeError(f"input {index} of the CPU module: token ids that are not integers",
                                      "feed integer ids; ids are never rounded")
            np.copyto(view, np.asarray(x).astype(dtype))
        else:
            np.copyto(view, x, casting="same_kind")
        return tensor


def save_params(path: Path, params: dict[str, np.ndarray]) -> None:
    """Write the parameter arrays as ``params.npz`` (atomically)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **params)

    atomic_write_via_path(path, write)
