"""CUDA codegen and export: source, nvcc build (sm_90 via export_cuda, sm_80 of the same source),
artifacts, no-nvcc error; on a CUDA host the GPU run of run_cuda.py (``-m gpu``).

nvcc takes ~15 s per build on the 2-core hosts: one export per module, reused by every test.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")

from tests.backends.cuda.cuda_graphs import mixed_net, residual_net  # noqa: E402
from tests.export.integer_graphs import sample_inputs  # noqa: E402

from fxquant.backends.cuda import build  # noqa: E402
from fxquant.backends.cuda import export_cuda  # noqa: E402
from fxquant.backends.cuda.plan import plan_graph  # noqa: E402
from fxquant.errors import ToolchainError  # noqa: E402

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
    out = tmp_path_factory.mktemp("cuda_export")
    return out, export_cuda(graph, out, verify_inputs=sample_inputs(graph, 6))


def test_source_has_dp4a_gemms_and_ffi_wrappers(source: str) -> None:
    plan = plan_graph(residual_net())
    assert source.count("__dp4a(") >= sum(name.startswith("fxq_conv2d") or name.startswith("fxq_linear")
                                          for name in plan.kernels)
    for name in plan.kernels:
        assert f'extern "C" __global__' in source and f"{name}_kernel(" in source
    assert "__shared__" in source and "blockIdx.x" in source


@needs_nvcc
def test_export_writes_every_artifact(exported: tuple[Path, dict]) -> None:
    out, report = exported
    for name in (build.SOURCE, build.LIBRARY, build.PARAMS, build.BASELINE, build.PLAN, build.REFERENCE,
                 build.RUNNER, build.ONNX_FP32, build.REPORT):
        assert (out / name).is_file(), name
    assert json.loads((out / build.REPORT).read_text()) == report
    assert report["cpu_check"] == {"samples": 6, "bit_exact": True} and report["library"] == build.LIBRARY
    with np.load(out / build.REFERENCE) as ref:
        assert ref["input"].shape == (6, 3, 9, 7) and ref["output:fc3"].shape == (6, 10)
    plan = json.loads((out / build.PLAN).read_text())
    assert [launch["ops"] for launch in plan["launches"]][1] == ["conv1"] and plan["arch"] == "sm_90"


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


def test_missing_nvcc_raises_after_writing_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "find_nvcc", lambda: None)
    with pytest.raises(ToolchainError, match="nvcc not found") as info:
        export_cuda(residual_net(), tmp_path)
    assert "CUDA toolkit" in (info.value.hint or "")
    assert (tmp_path / build.SOURCE).is_file() and (tmp_path / build.RUNNER).is_file()
    assert json.loads((tmp_path / build.REPORT).read_text())["library"] is None


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_device(), reason="needs a CUDA device")
def test_gpu_run_is_bit_exact(exported: tuple[Path, dict]) -> None:
    out, _ = exported
    proc = subprocess.run([sys.executable, str(out / build.RUNNER), "--verify-only"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "bit-exact on 6 samples: True" in proc.stdout


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
    (got,) = model(torch.from_numpy(x))
    sess = ort.InferenceSession(to_fp32(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = sess.run(None, {"input": x})
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-3)


def test_bad_arch_is_a_usage_error(tmp_path: Path) -> None:
    from fxquant.errors import UsageError

    with pytest.raises(UsageError, match="arch"):
        export_cuda(residual_net(), tmp_path, arch="hopper")
