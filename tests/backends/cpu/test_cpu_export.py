"""IntegerGraph -> Relax -> RewriteQuantizedOps -> shared library: bit-exact vs IntegerGraph.run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tvm

from tests.backends.cpu.cpu_graphs import F, GraphMaker, cnn, mixed_bits, mlp, residual_block

from fxquant.backends.base import REPORT_FILE, export
from fxquant.backends.cpu.build import ENTRY, LIBRARY, PARAMS, CpuModel, lower
from fxquant.backends.cpu.features import host_cpu, resolve_target
from fxquant.backends.cpu.target import CpuTarget
from fxquant.errors import ExportError, ToolchainError, UnsupportedOpError
from fxquant.integer_graph import IntegerGraph

GRAPHS = {"mlp": mlp, "cnn": cnn, "residual": residual_block, "mixed": mixed_bits}


def _inputs(graph: IntegerGraph, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *graph.inputs[0].shape)).astype(np.float32) * 2


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[IntegerGraph, CpuModel, object]]:
    from tvm import relax

    from fxquant.backends.cpu.build import vm_pipeline

    target = resolve_target("host")
    models = {}
    for name, make in GRAPHS.items():
        graph = make()
        mod, params = lower(graph, target)
        ex = relax.build(mod, tvm.target.Target(target.tvm_target()), relax_pipeline=vm_pipeline())
        models[name] = (graph, CpuModel(ex, params), mod)
    return models


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("batch", [1, 5])
def test_bit_exact(built: dict, name: str, batch: int) -> None:
    graph, model, _ = built[name]
    x = _inputs(graph, batch, seed=batch)
    ref = graph.run(*graph.quantize_inputs(x))
    (got,) = model.run(x)
    np.testing.assert_array_equal(got, ref[graph.outputs[0]])


@pytest.mark.parametrize("name", list(GRAPHS))
def test_every_op_is_an_fxquant_kernel(built: dict, name: str) -> None:
    """No op may reach Relax's unscheduled default lowering: every PrimFunc is one of ours."""
    mod = built[name][2]
    prim_funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert prim_funcs
    assert all("fxquant.kernel" in f.attrs for f in prim_funcs.values()), sorted(prim_funcs)


def test_residual_add_is_fused_into_the_conv(built: dict) -> None:
    mod = built["residual"][2]
    names = [gv.name_hint for gv in mod.functions]
    assert not any(n.startswith("fxq_add") for n in names), names


def test_low_bit_linear_uses_packed_weights() -> None:
    m = GraphMaker((64,), F(8, 4))
    graph = m.graph(m.linear("fc", "input", 32, F(4, 3), F(8, 2)))
    mod, params = lower(graph, resolve_target("host"))
    assert any(gv.name_hint.startswith("fxq_linear_int4") for gv in mod.functions)
    assert sum(p.nbytes for p in params.values() if p.dtype == np.uint8) == 64 * 32 // 2


def test_export_writes_artifacts_and_reloads(tmp_path: Path) -> None:
    graph = cnn()
    x = _inputs(graph, 4)
    report = export(CpuTarget(), graph, tmp_path / "cpu", [x])
    out = tmp_path / "cpu"
    assert report["verification"]["bit_exact"] and report["verification"]["n"] == 4
    assert json.loads((out / REPORT_FILE).read_text()) == report
    assert report["artifact"]["host_cpu"]["model"] and report["artifact"]["library"] == LIBRARY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpu"]  # no temporaries beside it
    assert not list(out.glob(".*"))
    model = CpuModel.load(out)  # tvm.runtime only: load_module + VirtualMachine
    np.testing.assert_array_equal(model.run(x)[0], graph.run(*graph.quantize_inputs(x))["fc"])
    with np.load(out / PARAMS) as params:
        assert len(params.files) == 6  # packed weight + bias of conv1, conv2, fc
    assert json.loads((out / ENTRY).read_text())["inputs"][0]["shape"] == ["n", 1, 8, 8]
    assert (out / LIBRARY).stat().st_size > 0


def test_verification_mismatch_raises_and_places_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = mlp()
    monkeypatch.setattr(CpuModel, "run", lambda self, *x: [np.zeros((len(x[0]), 10), np.int64) + 99])
    with pytest.raises(ExportError, match="differs from the integer reference"):
        export(CpuTarget(), graph, tmp_path / "cpu", [_inputs(graph, 2)])
    assert list(tmp_path.iterdir()) == []


def test_vnni_target_compiles_without_running(tmp_path: Path) -> None:
    facts = CpuTarget().build(mlp(), tmp_path, mcpu="znver5")
    assert facts["llvm"]["vnni"] and facts["llvm"]["mcpu"] == "znver5"
    assert (tmp_path / LIBRARY).stat().st_size > 0


@pytest.mark.skipif(host_cpu().has_vnni, reason="the host can run VNNI code")
def test_verifying_a_target_the_host_cannot_run_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ToolchainError, match="Illegal instruction"):
        export(CpuTarget(), mlp(), tmp_path / "cpu", [_inputs(mlp(), 2)], mcpu="znver5")
    assert list(tmp_path.iterdir()) == []


def test_unsupported_op_is_named() -> None:
    from tests.conformance.zoo import GraphMaker as ZooMaker

    m = ZooMaker((4, 4), F(8, 5))  # a matmul of a matrix and a vector: no kernel takes unequal ranks
    vec = m.input("vec", (4,), F(8, 5))
    graph = m.graph(m._op("mm", "matmul", ("input", vec), (4,), F(8, 4)))
    assert [(p.layer, p.kind) for p in CpuTarget().check(graph)] == [("mm", "matmul")]
    with pytest.raises(UnsupportedOpError, match="mm \\(matmul\\)"):
        CpuTarget().build(graph, Path("/nonexistent"))
    m = GraphMaker((8,), F(8, 5))
    wide = m.graph(m.linear("fc", "input", 4, F(8, 7), F(12, 6)))
    (problem,) = CpuTarget().check(wide)
    assert problem.layer == "fc" and "12-bit output" in problem.reason
    with pytest.raises(UnsupportedOpError, match="fc \\(linear\\): 12-bit output"):
        lower(wide, resolve_target("host"))  # the lowering refuses what check refuses


def test_onnx_qdq_import_entry() -> None:
    """The same pass on ``relax.frontend.onnx.from_onnx`` of the QDQ exporter's int8 model."""
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from fxquant.backends.cpu.build import finish_lowering, vm_pipeline
    from fxquant.backends.cpu.rewrite_quantized_ops import RewriteQuantizedOps
    from fxquant.export.onnx_qdq import to_qdq

    graph = cnn()
    mod = RewriteQuantizedOps(resolve_target("host"))(from_onnx(to_qdq(graph, ort_x86=False),
                                                                 keep_params_in_input=False))
    mod, params = finish_lowering(mod)
    ex = relax.build(mod, tvm.target.Target({"kind": "llvm", "mcpu": resolve_target("host").mcpu}),
                     relax_pipeline=vm_pipeline())
    x = _inputs(graph, 3)
    model = CpuModel(ex, params)
    y = np.from_dlpack(model.run_tvm(model.staged(0, x)))  # the ONNX output: floats k * 2^-FL
    out_fl = graph.value(graph.outputs[0]).fmt.frac_bits
    np.testing.assert_array_equal(np.ldexp(y.astype(np.float64), out_fl),
                                  graph.run(*graph.quantize_inputs(x))[graph.outputs[0]])
