"""Build an IntegerGraph into a TVM shared library + params, verify it, and load it back.

Pipeline: :func:`.relax_builder.graph_to_relax` (QDQ-form Relax) -> :class:`RewriteQuantizedOps`
(every op becomes ``call_tir`` of an fxquant kernel; anything left raises
:class:`~fxquant.errors.UnsupportedOpError` naming it) -> :func:`lift_constants` (packed weights
become function parameters, saved as ``params.npz``) -> the VM lowering passes of TVM's default
pipeline (no ``LegalizeOps`` work is left, so no op reaches the unscheduled default lowering) ->
``export_library``. The library needs only ``tvm.runtime``: ``load_module`` +
``tvm.runtime.vm.VirtualMachine``; ``main(x_float32, *params)`` quantizes ``x`` itself (round half
to even, as ``IntegerGraph.quantize_inputs``) and returns the int8 output integers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from fxquant.backends.cpu.features import CpuTarget, check_runnable, host_cpu, resolve_target
from fxquant.errors import ExportError, ToolchainError, UnsupportedOpError
from fxquant.integer_graph import IntegerGraph
from fxquant.io import atomic_write_json, atomic_write_via_path

LIBRARY, PARAMS, REPORT = "fxquant_cpu.so", "params.npz", "cpu_report.json"


def lower(graph: IntegerGraph, target: CpuTarget) -> tuple[Any, dict[str, np.ndarray]]:
    """The rewritten Relax module (constants lifted to parameters) and its parameter arrays."""
    from fxquant.backends.cpu.relax_builder import graph_to_relax
    from fxquant.backends.cpu.rewrite_quantized_ops import RewriteQuantizedOps

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


def compile_graph(graph: IntegerGraph, target: CpuTarget) -> tuple[Any, dict[str, np.ndarray]]:
    """``(executable, params)`` for ``graph`` on ``target``."""
    import tvm
    from tvm import relax

    mod, params = lower(graph, target)
    try:
        ex = relax.build(mod, tvm.target.Target(target.tvm_target()), relax_pipeline=vm_pipeline())
    except tvm.error.TVMError as exc:  # a compiler failure, not the user's input
        raise ToolchainError(f"TVM failed to build the CPU module for mcpu={target.mcpu}: {exc}") from exc
    return ex, params


class CpuModel:
    """A built model: ``run(*float32 inputs) -> list of int64 output integers`` (any batch size)."""

    def __init__(self, module: Any, params: dict[str, np.ndarray]) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.vm = VirtualMachine(module, tvm.cpu())
        self.params = [tvm.runtime.tensor(params[f"p{i}"]) for i in range(len(params))]
        self._main = self.vm["main"]
        self._staging: dict[tuple[int, tuple[int, ...]], tuple[Any, np.ndarray]] = {}

    @classmethod
    def load(cls, out_dir: Path) -> "CpuModel":
        import tvm

        with np.load(out_dir / PARAMS) as data:
            params = {k: data[k] for k in data.files}
        return cls(tvm.runtime.load_module(str(out_dir / LIBRARY)), params)

    def run_tvm(self, *inputs: Any) -> Any:
        return self._main(*inputs, *self.params)

    def run(self, *inputs: np.ndarray) -> list[np.ndarray]:
        """float32 inputs -> the output integers (int64 copies)."""
        out = self.run_tvm(*[self.staged(i, x) for i, x in enumerate(inputs)])
        outs = list(out) if not hasattr(out, "numpy") else [out]
        return [np.from_dlpack(o).astype(np.int64) for o in outs]

    def staged(self, index: int, x: np.ndarray) -> Any:
        """``x`` copied into a reused TVM input tensor of its shape (a numpy view of it is kept):
        creating a TVM tensor per call costs 15-30 us, more than a small model's whole run."""
        import tvm

        key = (index, x.shape)
        if key not in self._staging:
            tensor = tvm.runtime.empty(x.shape, "float32")
            self._staging[key] = (tensor, np.from_dlpack(tensor))
        tensor, view = self._staging[key]
        np.copyto(view, x, casting="same_kind")
        return tensor


def _save_params(path: str, params: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **params)


def verify(model: CpuModel, graph: IntegerGraph, verify_inputs: np.ndarray) -> dict[str, Any]:
    """Run float NCHW ``verify_inputs`` through both; raise :class:`ExportError` on any difference.

    The module's input is float32, so the reference quantizes the same float32 values.
    """
    x = np.asarray(verify_inputs, np.float32)
    ints = graph.quantize_inputs(x)
    ref = graph.run(*ints)
    got = model.run(x)
    for name, out in zip(graph.outputs, got):
        diff = int(np.count_nonzero(out != ref[name]))
        if out.shape != ref[name].shape or diff:
            raise ExportError(f"CPU module output {name!r} differs from the integer reference in {diff} of "
                              f"{ref[name].size} elements", "report this as a bug with the run directory")
    return {"samples": int(ints[0].shape[0]), "bit_exact": True}


def export_cpu(graph: IntegerGraph, out_dir: Path, *, mcpu: str = "host",
               verify_inputs: np.ndarray | None = None) -> dict[str, Any]:
    """Build ``graph`` for ``mcpu``; write library, params and ``cpu_report.json`` atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = resolve_target(mcpu)
    if verify_inputs is not None:
        check_runnable(target)  # before the build: code for another CPU would die with SIGILL
    t0 = time.perf_counter()
    ex, params = compile_graph(graph, target)
    build_s = time.perf_counter() - t0
    atomic_write_via_path(out_dir / LIBRARY, ex.export_library)
    atomic_write_via_path(out_dir / PARAMS, lambda tmp: _save_params(tmp, params))
    report: dict[str, Any] = {
        "target": {"mcpu": target.mcpu, "vnni": target.vnni, "llvm": target.tvm_target()},
        "host_cpu": host_cpu().to_dict(), "build_s": round(build_s, 2),
        "library": LIBRARY, "params": PARAMS, "param_bytes": int(sum(p.nbytes for p in params.values())),
        "entry": "main(float32 inputs..., p0, p1, ...) -> int8 output integers",
        "inputs": [{"name": v.name, "shape": ["n", *v.shape], "frac_bits": v.fmt.frac_bits} for v in graph.inputs],
        "outputs": graph.outputs, "verification": None,
    }
    if verify_inputs is not None:
        report["verification"] = verify(CpuModel.load(out_dir), graph, verify_inputs)
    atomic_write_json(out_dir / REPORT, report)
    return report
