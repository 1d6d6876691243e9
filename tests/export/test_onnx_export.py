"""The onnx-qdq and qonnx targets on the backend contract: check, build, run, export, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from tests.export.integer_graphs import F, GraphMaker, cnn, mixed, mlp, residual, sample_inputs

from fxquant.backends import base
from fxquant.backends.registry import get_target
from fxquant.errors import ExportError, RunDirError, UnsupportedOpError, UsageError
from fxquant.export.targets import FP32_DIR, OnnxQdqTarget, QonnxTarget, write_fp32_baseline
from fxquant.export.verify import output_integers

ONNX_TARGETS = ("onnx-qdq", "qonnx")
REPORT_KEYS = {"schema", "schema_version", "target", "options", "graph_fingerprint", "artifact", "reference_check",
               "verification", "bit_exact"}
COMPARISON_KEYS = {"ran", "n", "mismatches", "mismatched_elements", "first_mismatch", "bit_exact"}
ARTIFACT_KEYS = {"file", "size_bytes", "theoretical_bytes", "opset", "ir_version", "op_types", "float32_risk_ops",
                 "build_seconds"}
MLP_PARAM_BYTES = (32 * 16 + 32 * 32 + 10 * 32) * 8 // 8 + (32 + 32 + 10) * 4
"""mlp(): 8-bit weights of fc1 (32x16), fc2 (32x32), fc3 (10x32) and int32 biases, counted by hand."""


def test_registry_names_the_onnx_targets() -> None:
    assert isinstance(get_target("onnx-qdq"), OnnxQdqTarget) and get_target("onnx") is get_target("onnx-qdq")
    assert isinstance(get_target("qonnx"), QonnxTarget)


@pytest.mark.parametrize("name", ONNX_TARGETS)
def test_report_has_exactly_the_base_schema(name: str, tmp_path: Path) -> None:
    graph = mlp()
    out = tmp_path / name
    report = base.export(get_target(name), graph, out, [sample_inputs(graph, n=8)])
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary directory left
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report and set(report) == REPORT_KEYS
    assert report["schema"] == "fxquant.export_report" and report["schema_version"] == 1
    assert report["target"] == name and report["reference_check"] is None and report["bit_exact"] is True
    assert set(report["verification"]) == COMPARISON_KEYS
    assert report["verification"]["n"] == 8 and report["verification"]["mismatches"] == 0
    assert report["verification"]["ran"].startswith("onnxruntime ") and "CPUExecutionProvider" in \
        report["verification"]["ran"]
    art = report["artifact"]
    assert set(art) == ARTIFACT_KEYS and art["file"] == "model.onnx"
    assert art["size_bytes"] == (out / "model.onnx").stat().st_size
    assert art["theoretical_bytes"] == MLP_PARAM_BYTES == 2152
    model = onnx.load(out / "model.onnx")
    assert art["opset"] == {"onnx-qdq": 21, "qonnx": 13}[name] and art["ir_version"] == model.ir_version
    assert art["op_types"] == sorted({n.op_type for n in model.graph.node})
    assert report["options"] == {"opset": art["opset"]}


@pytest.mark.parametrize("name", ONNX_TARGETS)
def test_run_returns_the_reference_integers(name: str, tmp_path: Path) -> None:
    graph = residual()
    target = get_target(name)
    target.build(graph, tmp_path)
    ints = graph.quantize_inputs(sample_inputs(graph, n=5))
    (got,) = target.run(tmp_path, ints)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, graph.run(*ints)[graph.outputs[0]])


def test_off_grid_outputs_stay_off_the_grid() -> None:
    k = output_integers(np.array([[1.5, 2.0]], np.float32), 1)  # 3.0 and 4.0: integral
    assert k.dtype == np.int64 and k.tolist() == [[3, 4]]
    off = output_integers(np.array([[1.25, 2.0]], np.float32), 1)  # 2.5 is not an integer
    assert off.dtype == np.float64 and off[0, 0] == 2.5


def test_an_off_grid_output_is_a_mismatch() -> None:
    record = base.compare({"y": np.array([[2]])}, [np.array([[2.5]])], ["y"], "test")
    assert record["mismatched_elements"] == 1 and not record["bit_exact"]


def test_opset_is_passed_through(tmp_path: Path) -> None:
    report = base.export(get_target("onnx-qdq"), cnn(), tmp_path / "q", [sample_inputs(cnn(), n=4)], opset=17)
    assert report["options"] == {"opset": 17} and report["artifact"]["opset"] == 17
    assert onnx.load(tmp_path / "q" / "model.onnx").opset_import[0].version == 17


def test_unknown_options_and_bad_opsets_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="takes no option mcpu"):
        base.export(get_target("onnx-qdq"), cnn(), tmp_path / "q", [sample_inputs(cnn())], mcpu="host")
    with pytest.raises(UsageError, match="opset=9"):
        get_target("onnx-qdq").check(cnn(), opset=9)
    with pytest.raises(UsageError, match="IR version"):
        get_target("qonnx").check(cnn(), opset=23)
    assert not (tmp_path / "q").exists()


def test_check_lists_every_problem_at_once() -> None:
    m = GraphMaker((4, 8, 8), F(8, 4))
    h = m.pool("pool", "input", "maxpool2d", 3)
    h = m._op("clip", "clamp", (h,), (4, 2, 2), F(8, 4), attrs={"lo": 200, "hi": None})  # above qmax
    h = m.flatten("flat", h)
    graph = m.graph(m.linear("fc", h, 2, F(8, 0), F(12, 2)))
    graph.ops[-1].weight = graph.ops[-1].weight * 4  # outside its 8-bit format
    problems = get_target("onnx-qdq").check(graph, opset=20)
    assert sorted((p.layer, p.kind) for p in problems) == [("clip", "clamp"), ("fc", "linear"), ("fc", "linear")]
    reasons = " | ".join(p.reason for p in problems)
    assert "clamp bounds [200, None] leave the output format <8,4>" in reasons
    assert "weights need 10 bits, more than their 8-bit format" in reasons
    assert "12-bit value 'fc' needs int16 QuantizeLinear, which opset 20 lacks" in reasons
    assert get_target("onnx-qdq").check(mixed()) == [] and get_target("qonnx").check(mixed()) == []


def test_a_refused_graph_leaves_nothing(tmp_path: Path) -> None:
    m = GraphMaker((1, 24, 24), F(16, 4))
    graph = m.graph(m.pool("avg", "input", "avgpool2d", 23))  # window sums beyond float32's 2^24
    with pytest.raises(UnsupportedOpError, match=r"'onnx-qdq' cannot build .*avg \(avgpool2d\)"):
        base.export(get_target("onnx-qdq"), graph, tmp_path / "q", [sample_inputs(graph)])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ONNX_TARGETS)
def test_failed_verification_leaves_no_result(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An artifact built from a graph one weight LSB away from the one it is verified against."""
    graph, wrong = cnn(), cnn()
    w = wrong.ops[0].weight
    w[0, 0, 1, 1] += -1 if w[0, 0, 1, 1] == wrong.ops[0].weight_fmt.qmax else 1
    target = get_target(name)
    build = type(target).build
    monkeypatch.setattr(type(target), "build", lambda self, g, out, **o: build(self, wrong, out, **o))
    with pytest.raises(ExportError, match=f"target '{name}' output differs from the integer reference"):
        base.export(target, graph, tmp_path / name, [sample_inputs(graph, n=32)])
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_keeps_the_previous_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph = mlp()
    target = get_target("onnx-qdq")
    first = base.export(target, graph, tmp_path / "q", [sample_inputs(graph, n=4)])
    monkeypatch.setattr(OnnxQdqTarget, "run", lambda self, out, ints: [np.zeros((4, 10), np.int64)])
    with pytest.raises(ExportError, match="differs"):
        base.export(target, graph, tmp_path / "q", [sample_inputs(graph, n=4)])
    assert json.loads((tmp_path / "q" / "report.json").read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_unwritable_directory_is_a_run_dir_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match="cannot write"):
        base.export(get_target("onnx-qdq"), cnn(), blocker / "out", [sample_inputs(cnn())])


def test_run_without_a_model_file_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="has no model.onnx"):
        get_target("qonnx").run(tmp_path, [np.zeros((1, 16), np.int64)])


def test_fp32_baseline_is_written_with_its_graph(tmp_path: Path) -> None:
    graph = cnn()
    facts = write_fp32_baseline(graph, tmp_path / FP32_DIR)
    assert sorted(p.name for p in (tmp_path / FP32_DIR).iterdir()) == ["baseline.json", "model.onnx"]
    assert facts["graph_fingerprint"] == base.graph_fingerprint(graph) and facts["integer_exact"] is False
    model = onnx.load(tmp_path / FP32_DIR / "model.onnx")
    assert not {n.op_type for n in model.graph.node} & {"QuantizeLinear", "DequantizeLinear", "Quant"}
    assert base.read_report(tmp_path / FP32_DIR) is None  # never mistaken for a verified export


class _ViewAlpha(torch.nn.Module):
    """The front end's reshape and mul_pow2: ``view`` keeping the batch, ``torch.add(alpha=4)``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.add(self.conv2(h), h, alpha=4)
        h = h.view(h.shape[0], 8, 8)
        return self.fc(h.reshape(h.shape[0], 64))


@pytest.mark.parametrize("name", ONNX_TARGETS)
def test_reshape_and_alpha_from_torch_export_with_the_reference_check(name: str, tmp_path: Path) -> None:
    from fxquant.passes import lower_to_integer_graph
    from tests.helpers import deployed

    torch.manual_seed(0)
    x = torch.randn(32, 2, 4, 4)
    gm = deployed(_ViewAlpha(), x, bits=(8, 8))
    graph = lower_to_integer_graph(gm, x[:1])
    assert {"reshape", "mul_pow2"} <= {op.kind for op in graph.ops} <= get_target(name).ops
    report = base.export(get_target(name), graph, tmp_path / name, [x.numpy()], model=gm)
    assert report["reference_check"]["bit_exact"] and report["reference_check"]["n"] == 32
    assert report["verification"]["bit_exact"] and report["bit_exact"] is True


def test_check_imports_no_runtime() -> None:
    """``check`` is data: onnx-qdq imports no onnx at all, qonnx only onnx's IR table, neither a runtime."""
    import subprocess
    import sys

    code = """
import sys
from fxquant.backends.registry import get_target
from tests.export.integer_graphs import cnn, mixed
assert get_target("onnx-qdq").check(cnn()) == [] and get_target("onnx-qdq").check(mixed()) == []
assert not [m for m in ("onnx", "onnx_ir", "onnxruntime", "qonnx", "tvm", "torch") if m in sys.modules]
assert get_target("qonnx").check(cnn()) == []
assert not [m for m in ("onnx_ir", "onnxruntime", "qonnx", "tvm", "torch") if m in sys.modules]
"""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", ONNX_TARGETS)
def test_two_inputs_and_two_outputs(name: str, tmp_path: Path) -> None:
    from fxquant.integer_graph import Value

    m = GraphMaker((16,), F(8, 4))
    m.inputs.append(Value("other", (16,), F(6, 2)))
    m.values["other"] = m.inputs[1]
    b = m.linear("fb", "other", 8, F(8, 7), F(8, 3))
    graph = m.graph(m.add("sum", m.linear("fa", "input", 8, F(8, 7), F(8, 3)), b, F(8, 2)), b)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((8, 16)).astype(np.float32) * 4 for _ in range(2)]
    report = base.export(get_target(name), graph, tmp_path / name, xs)
    assert report["bit_exact"] and report["verification"]["n"] == 8
    ints = graph.quantize_inputs(*xs)
    got = get_target(name).run(tmp_path / name, ints)
    want = graph.run(*ints)
    assert len(got) == 2
    for out, value in zip(got, ["sum", "fb"]):
        np.testing.assert_array_equal(out, want[value])
