"""CudaTarget through the contract: source, nvcc build (sm_90 via base.export, sm_80 of the same
source), artifacts and report, check listing every problem, no-nvcc refusal leaving nothing behind;
on a CUDA host the GPU run of run_cuda.py (``-m gpu``).

nvcc takes ~15 s per build on the 2-core hosts: one export per module, reused by every test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.backends.cuda.cuda_graphs import F, GraphMaker, mixed_net, residual_net, vision_net
from tests.export.integer_graphs import sample_inputs

from fxquant.backends.base import REPORT_FILE, export
from fxquant.backends.cuda import build
from fxquant.backends.cuda.plan import plan_graph
from fxquant.backends.cuda.target import CudaTarget
from fxquant.backends.registry import get_target
from fxquant.errors import ToolchainError, UnsupportedOpError, UsageError

needs_nvcc = pytest.mark.skipif(build.find_nvcc() is None, reason="nvcc (CUDA toolkit) not installed")


def _cuda_device() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def source() -> str:
    return build.cuda_source(plan_graph(residual_net()), "sm_90")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if build.find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) not installed")
    graph = mixed_net()
    out = tmp_path_factory.mktemp("cuda_export") / "cuda"
    return out, export(CudaTarget(), graph, out, [sample_inputs(graph, 6)])


def test_source_has_dp4a_gemms_and_ffi_wrappers(source: str) -> None:
    plan = plan_graph(residual_net())
    assert source.count("__dp4a(") >= sum(name.startswith("fxq_conv2d") or name.startswith("fxq_linear")
                                          for name in plan.kernels)
    for name in plan.kernels:
        assert f'extern "C" __global__' in source and f"{name}_kernel(" in source
    assert "__shared__" in source and "blockIdx.x" in source


@pytest.fixture(scope="module")
def vision_exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if build.find_nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) not installed")
    graph = vision_net()
    out = tmp_path_factory.mktemp("cuda_vision") / "cuda"
    return out, export(CudaTarget(), graph, out, [sample_inputs(graph, 4)])


def test_vision_kernels_are_one_thread_per_output_with_a_register_accumulator() -> None:
    """Grouped and transposed convs: the reduction runs in the thread into one int32 register."""
    plan = plan_graph(vision_net())
    src = build.cuda_source(plan, "sm_90")
    for prefix in ("fxq_conv2d_grouped", "fxq_conv_transpose2d", "fxq_mul", "fxq_lut", "fxq_cat", "fxq_transpose",
                   "fxq_upsample", "fxq_pool2d"):
        names = [name for name in plan.kernels if name.startswith(prefix)]
        assert names, prefix
        for name in names:
            assert f"{name}_kernel(" in src
    lines = src.splitlines()
    for prefix in ("fxq_conv2d_grouped", "fxq_conv_transpose2d"):
        start = next(i for i, line in enumerate(lines) if "__global__" in line and prefix in line and line.endswith("{"))
        body = lines[start:lines.index("}", start)]
        assert "  alignas(64) int acc_local_ptr[1];" in body and not any("__shared__" in line for line in body)


@needs_nvcc
def test_export_writes_every_artifact(exported: tuple[Path, dict]) -> None:
    out, report = exported
    for name in (build.SOURCE, build.LIBRARY, build.LLVM_LIBRARY, build.PARAMS, build.BASELINE, build.PLAN,
                 build.REFERENCE, build.RUNNER, build.ONNX_FP32, REPORT_FILE):
        assert (out / name).is_file(), name
    assert json.loads((out / REPORT_FILE).read_text()) == report and report["target"] == "cuda"
    ver = report["verification"]
    assert ver["bit_exact"] and ver["n"] == 6 and ver["mismatches"] == 0
    assert "not on a GPU" in ver["ran"] and "GPU" not in ver["ran"].replace("not on a GPU", "")
    art = report["artifact"]
    assert art["library"] == build.LIBRARY and art["arch"] == "sm_90" and "run_cuda.py" in art["gpu_check"]
    with np.load(out / build.REFERENCE) as ref:
        assert ref["input:input"].shape == (build.GOLDEN_SAMPLES, 3, 9, 7)
        assert ref["output:fc3"].shape == (build.GOLDEN_SAMPLES, 10)
    plan = json.loads((out / build.PLAN).read_text())
    assert [launch["ops"] for launch in plan["launches"]][1] == ["conv1"] and plan["arch"] == "sm_90"


@needs_nvcc
def test_run_is_relocatable_and_matches_the_reference(exported: tuple[Path, dict], tmp_path: Path) -> None:
    import shutil

    out, _ = exported
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    graph = mixed_net()
    ints = graph.quantize_inputs(sample_inputs(graph, 3, seed=7))
    (got,) = CudaTarget().run(moved, ints)
    np.testing.assert_array_equal(got, graph.run(*ints)[graph.outputs[0]])


def test_check_lists_every_problem_at_once() -> None:
    m = GraphMaker((4,), F(8, 4))
    h = m.linear("fc.w12", "input", 6, F(12, 7), F(12, 2))  # a 12-bit output is int16: legal
    h = m.linear("fc.a12", h, 4, F(8, 7), F(8, 2))  # ... but the dp4a GEMM reads int8 only
    h = m._op("mm", "matmul", (h, h), (4,), F(8, 2))  # vectors: no [M, K] x [K, N] form
    problems = CudaTarget().check(m.graph(h))
    assert [(p.layer, p.kind) for p in problems] == [("fc.w12", "linear"), ("fc.a12", "linear"), ("mm", "matmul")]
    assert "12-bit weights" in problems[0].reason and "12-bit input" in problems[1].reason
    assert "matmul of shapes [4] and [4]" in problems[2].reason


def test_every_graph_input_is_quantized_on_the_device(tmp_path: Path) -> None:
    """Two inputs of different formats: one quantize launch each; ``run`` takes them in graph order."""
    from fxquant.backends.cuda.cpu_check import build_llvm, run_plan
    from tests.conformance.zoo import GraphMaker as ZooMaker

    m = ZooMaker((2, 3, 3), F(8, 3), name="x")
    m.input("y", (2, 3, 3), F(5, -1))
    graph = m.graph(m.add("add", "x", "y", F(6, 1), relu=False))
    assert CudaTarget().check(graph) == []
    plan = plan_graph(graph)
    assert [launch.args for launch in plan.launches[:2]] == [("float:x",), ("float:y",)]
    ints = graph.quantize_inputs(*(sample_inputs(graph, 3, seed=s) for s in (1, 2)))
    xs = {v.name: np.ldexp(k.astype(np.float64), -v.fmt.frac_bits).astype(np.float32) for v, k in zip(graph.inputs, ints)}
    (got,) = run_plan(plan.to_json(), plan.params, build_llvm(plan), xs)
    np.testing.assert_array_equal(got, graph.run(*ints)["add"])


@needs_nvcc
def test_library_loads_with_tvm_ffi_alone(exported: tuple[Path, dict]) -> None:
    """No GPU and no TVM runtime needed to load it: every launch's kernels resolve through tvm_ffi."""
    import tvm_ffi

    out, _ = exported
    lib = tvm_ffi.load_module(str(out / build.LIBRARY))
    for launch in json.loads((out / build.PLAN).read_text())["launches"]:
        for name in filter(None, (launch["kernel"], launch["kernel_large"])):
            assert callable(lib[name]), name


@needs_nvcc
def test_source_compiles_for_sm80(exported: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = exported
    build.nvcc_compile(out / build.SOURCE, tmp_path / "k80.so", "sm_80")
    assert (tmp_path / "k80.so").stat().st_size > 0


def test_missing_nvcc_is_reported_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    assert "nvcc not found" in get_target("cuda").unavailable()
    graph = residual_net()
    with pytest.raises(ToolchainError, match="nvcc not found") as info:
        export(CudaTarget(), graph, tmp_path / "cuda", [sample_inputs(graph, 2)])
    assert "CUDA toolkit" in (info.value.hint or "")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_device(), reason="needs a CUDA device")
def test_gpu_run_is_bit_exact(exported: tuple[Path, dict]) -> None:
    out, _ = exported
    proc = subprocess.run([sys.executable, str(out / build.RUNNER), "--verify-only"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"bit-exact on {build.GOLDEN_SAMPLES} samples: True" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_device(), reason="needs a CUDA device")
def test_gpu_run_of_the_vision_ops_is_bit_exact(vision_exported: tuple[Path, dict]) -> None:
    out, _ = vision_exported
    proc = subprocess.run([sys.executable, str(out / build.RUNNER), "--verify-only"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"bit-exact on {build.GOLDEN_SAMPLES} samples: True" in proc.stdout


def test_torch_baseline_of_the_exact_index_ops_equals_the_integer_reference() -> None:
    """Ops that move integers without rounding (ceil-mode and dilated max pools, nearest upsampling,
    transpose, reshape, mul_pow2): the torch float model on on-grid inputs gives the reference's
    integers times 2^-FL exactly."""
    import torch

    from fxquant.backends.cuda.run_cuda import torch_float_model
    from tests.conformance.zoo import GraphMaker as ZooMaker

    m = ZooMaker((2, 7, 6), F(7, 3), seed=3)
    h = m.pool_ceil("ceil", "input", "maxpool2d", kernel=(3, 3), stride=(2, 2), ceil_mode=True)
    h = m.pool_ceil("dil", h, "maxpool2d", kernel=(2, 2), stride=(1, 1), padding=(1, 1), dilation=(2, 1))
    h = m.upsample("up", h, (2, 3))
    h = m.transpose("swap", h, (2, 0, 1))
    w, c, hh = m.values[h].shape
    h = m.reshape("view", h, (w, 2, c * hh // 2))
    h = m._op("x4", "mul_pow2", (h,), m.values[h].shape, F(7, 1), attrs={"exponent": 2})
    graph = m.graph(h)
    ops, ints = build.float_graph(graph)
    plan = {**plan_graph(graph).to_json(), "float_graph": ops}
    model = torch_float_model(plan, {k: torch.from_numpy(v) for k, v in ints.items()}, torch.float64)
    q = graph.quantize_inputs(sample_inputs(graph, 3))
    (got,) = model({"input": torch.from_numpy(np.ldexp(q[0].astype(np.float64), -3))})
    want = np.ldexp(graph.run(*q)["x4"].astype(np.float64), -1)
    np.testing.assert_array_equal(got.numpy(), want)


def test_torch_baseline_is_the_float_network() -> None:
    """run_cuda.py's torch FP32 baseline computes what the fp32 ONNX export computes."""
    import onnxruntime as ort
    import torch

    from fxquant.backends.cuda.run_cuda import torch_float_model
    from fxquant.export.onnx_qdq import to_fp32

    graph = residual_net()
    ops, ints = build.float_graph(graph)
    plan = {**plan_graph(graph).to_json(), "float_graph": ops}
    model = torch_float_model(plan, {k: torch.from_numpy(v) for k, v in ints.items()}, torch.float32)
    x = sample_inputs(graph, 3)
    (got,) = model({"input": torch.from_numpy(x)})
    sess = ort.InferenceSession(to_fp32(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"input": x})
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-3)


def test_bad_arch_is_a_usage_error(tmp_path: Path) -> None:
    graph = residual_net()
    with pytest.raises(UsageError, match="arch"):
        export(CudaTarget(), graph, tmp_path / "cuda", [sample_inputs(graph, 1)], arch="hopper")
    assert list(tmp_path.iterdir()) == []
    m = GraphMaker((4,), F(12, 4))
    with pytest.raises(UnsupportedOpError, match="12-bit input"):
        CudaTarget().build(m.graph(m.linear("fc", "input", 4, F(8, 7), F(8, 2))), tmp_path / "never")
