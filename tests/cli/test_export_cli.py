"""`fxquant export` / `bench` / `fpga-sim` on a trained run, and their bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli.test_train_cli import DIGITS, assert_one_line_error, fxquant, trained_run  # noqa: F401


def test_export_onnx_verified(trained_run):  # noqa: F811
    proc = fxquant("export", "--target", "onnx", str(trained_run), "--verify", "200")
    assert proc.returncode == 0, proc.stderr
    assert "bit_exact=True" in proc.stdout
    model = onnx.load(trained_run / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    report = json.loads((trained_run / "export_report.json").read_text())
    assert report  # one entry per flavour


def test_bench_onnx_reports_ratios(trained_run):  # noqa: F811
    proc = fxquant("bench", str(trained_run), "--batch", "1")
    assert proc.returncode == 0, proc.stderr
    bench = json.loads((trained_run / "bench.json").read_text())
    assert {r["engine"] for r in bench["rows"]} == {"ORT FP32", "ORT fxquant QDQ"}
    assert 0 < bench["size_ratio_qdq_vs_fp32"] < 0.5


def test_export_fpga_and_resimulate(trained_run):  # noqa: F811
    proc = fxquant("export", "--target", "fpga", str(trained_run), "--verify", "100")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained_run / "fpga" / "fpga_report.json").read_text())
    assert report["bit_exact"] and report["n"] == 100
    proc = fxquant("fpga-sim", str(trained_run), "--verify", "50")
    assert proc.returncode == 0 and "bit_exact=True" in proc.stdout


@pytest.mark.parametrize("args,fragment", [
    (["--target", "tpu"], "unknown target 'tpu'"),
    (["--flavour", "int3"], "flavour"),
    (["--verify", "0"], "--verify=0"),
])
def test_bad_export_options(trained_run, args, fragment):  # noqa: F811
    assert_one_line_error(fxquant("export", str(trained_run), *args), fragment)


def test_unknown_bench_target(trained_run):  # noqa: F811
    assert_one_line_error(fxquant("bench", str(trained_run), "--target", "abacus"), "unknown bench target")


def test_changed_model_file_is_refused(tmp_path):
    model = tmp_path / "m.py"
    model.write_text(DIGITS.read_text())
    out = tmp_path / "run"
    assert fxquant("train", str(model), "--out", str(out), "--epochs", "1", "--no-progress").returncode == 0
    model.write_text(DIGITS.read_text() + "\n# edited\n")
    assert_one_line_error(fxquant("export", str(out)), "changed since the run was trained")
    proc = fxquant("export", str(out), "--model", str(model), "--verify", "20")
    assert proc.returncode == 0, proc.stderr


def test_unsupported_op_at_export_is_named(tmp_path):
    model = tmp_path / "sig.py"
    model.write_text(DIGITS.read_text().replace("return self.fc2(x)", "return torch.sigmoid(self.fc2(x))"))
    out = tmp_path / "run"
    assert fxquant("train", str(model), "--out", str(out), "--epochs", "1", "--no-progress").returncode == 0
    assert_one_line_error(fxquant("export", str(out)), "sigmoid", "no integer form")


def test_invalid_precision_map_lists_problems(trained_run, tmp_path):  # noqa: F811
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    pmap = json.loads((run / "precision_map.json").read_text())
    pmap["layers"]["conv1"]["weight"]["bits"] = 99
    pmap["layers"]["nope"] = pmap["layers"]["fc1"]
    (run / "precision_map.json").write_text(json.dumps(pmap))
    assert_one_line_error(fxquant("export", str(run)), "out of range")
    pmap["layers"]["conv1"]["weight"]["bits"] = 8
    (run / "precision_map.json").write_text(json.dumps(pmap))
    assert_one_line_error(fxquant("export", str(run)), "unknown layer 'nope'")


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["train", "export", "bench", "--target", "--bits", "--policy", "--epochs",
                                 "-3", "0", "99", "x", "--flavour", "qonnx", "--batch", "--verify", "/nonexistent",
                                 "--resume", "--force", "--opset", "--reuse", "fpga-sim"]), max_size=6))
def test_fuzzed_cli_arguments_fail_cleanly(tmp_path, monkeypatch, argv):
    from click.testing import CliRunner

    from fxquant.cli.main import cli
    from fxquant.errors import FxquantError

    monkeypatch.chdir(tmp_path)  # relative paths in argv stay inside the test's directory
    result = CliRunner().invoke(cli, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        assert isinstance(result.exception, FxquantError), repr(result.exception)


def test_bad_example_inputs_are_reported(tmp_path):
    model = tmp_path / "m.py"
    model.write_text(DIGITS.read_text().replace("torch.zeros(1, 1, 8, 8)", "torch.zeros(1, 3, 5, 5)"))
    out = tmp_path / "run"
    assert fxquant("train", str(model), "--out", str(out), "--epochs", "1", "--no-progress").returncode == 0
    assert_one_line_error(fxquant("export", str(out)), "example inputs (1, 3, 5, 5) do not fit the model")
    assert not (out / "model.onnx").exists()
