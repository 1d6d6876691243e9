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
    head, _, tail = proc.stdout.strip().partition("; ")
    assert head == (f"export onnx-qdq: {trained_run / 'onnx-qdq'}, bit_exact=True, n=200, mismatches=0, "
                    "reference check vs trained model: bit-exact on 200 samples (0 mismatches)")
    model = onnx.load(trained_run / "onnx-qdq" / "model.onnx")
    onnx.checker.check_model(model, full_check=True)
    report = json.loads((trained_run / "onnx-qdq" / "report.json").read_text())
    # deployed accuracy, from onnxruntime's outputs on the model file, against the validation labels
    import onnxruntime as ort

    from fxquant.deployment import held_out
    from fxquant.model_file import load_model_file

    x, y = held_out(load_model_file(DIGITS), 200)
    sess = ort.InferenceSession(str(trained_run / "onnx-qdq" / "model.onnx"))
    top1 = 100.0 * float((sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1) == y).mean())
    assert report["verification"]["accuracy"] == {"top1": round(top1, 4), "n": 200}
    assert tail == (f"deployed top-1 {top1:.2f}% on 200 validation samples "
                    f"(fake-quant model {report['reference_check']['accuracy']['top1']:.2f}%)")
    assert report["reference_check"]["accuracy"]["top1"] == report["verification"]["accuracy"]["top1"]  # bit-exact
    assert report["target"] == "onnx-qdq" and report["bit_exact"] is True
    assert report["reference_check"]["n"] == 200 and report["reference_check"]["mismatched_elements"] == 0
    assert report["verification"]["n"] == 200 and report["verification"]["mismatched_elements"] == 0
    assert report["artifact"]["size_bytes"] == (trained_run / "onnx-qdq" / "model.onnx").stat().st_size


def test_bench_onnx_reports_ratios(trained_run):  # noqa: F811
    proc = fxquant("bench", str(trained_run), "--batch", "1", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    bench = json.loads((trained_run / "bench-onnx-qdq.json").read_text())
    fingerprint = json.loads((trained_run / "onnx-qdq" / "report.json").read_text())["graph_fingerprint"]
    rows = {r["engine"]: r for r in bench["rows"]}
    assert set(rows) == {"ORT FP32", "ORT fxquant onnx-qdq"} and bench["machine"]["threads"] == 1
    assert rows["ORT fxquant onnx-qdq"]["verified"] is True and rows["ORT FP32"]["verified"] is False
    assert rows["ORT fxquant onnx-qdq"]["artifact"] == "onnx-qdq/model.onnx"
    assert rows["ORT FP32"]["artifact"] == "onnx-fp32/model.onnx"
    assert {r["graph_fingerprint"] for r in bench["rows"]} == {fingerprint}
    sizes = bench["sizes_bytes"]
    assert sizes["onnx-qdq/model.onnx"] == (trained_run / "onnx-qdq" / "model.onnx").stat().st_size
    qdq_bytes, fp32_bytes = ((trained_run / f / "model.onnx").stat().st_size for f in ("onnx-qdq", "onnx-fp32"))
    assert 0 < bench["size_ratio_vs_fp32"] == qdq_bytes / fp32_bytes < 0.5
    assert "Every engine: 1 thread." in proc.stdout


def test_export_fpga_and_resimulate(trained_run):  # noqa: F811
    proc = fxquant("export", "--target", "fpga", str(trained_run), "--verify", "100")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((trained_run / "fpga" / "report.json").read_text())
    assert report["target"] == "fpga" and report["bit_exact"] is True
    assert report["verification"]["n"] == 100 and report["verification"]["mismatched_elements"] == 0
    proc = fxquant("fpga-sim", str(trained_run), "--verify", "50")
    assert proc.returncode == 0, proc.stderr
    assert "bit_exact=True, n=50, mismatches=0" in proc.stdout


@pytest.mark.parametrize("args,fragment", [
    (["--target", "tpu"], "unknown target 'tpu'"),
    (["--flavour", "int3"], "unknown ONNX flavour 'int3'"),
    (["--target", "cpu", "--flavour", "qdq"], "--flavour is an ONNX option"),
    (["--target", "qonnx", "--flavour", "qdq"], "--target qonnx contradicts --flavour qdq"),
    (["--verify", "0"], "--verify=0"),
    (["--target", "onnx-qdq", "--mcpu", "host"], "target 'onnx-qdq' takes no --mcpu"),
    (["--target", "cpu", "--opset", "17"], "target 'cpu' takes no --opset"),
    (["--target", "qonnx", "--reuse", "2"], "target 'qonnx' takes no --reuse"),
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
    model.write_text(DIGITS.read_text().replace("return self.fc2(x)", "return torch.sin(self.fc2(x))"))
    out = tmp_path / "run"
    assert fxquant("train", str(model), "--out", str(out), "--epochs", "1", "--no-progress").returncode == 0
    assert_one_line_error(fxquant("export", str(out)), "torch.sin", "no integer form")


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
    # refused before training starts (the census runs the model on its example inputs), nothing written
    assert_one_line_error(fxquant("train", str(model), "--out", str(out), "--epochs", "1", "--no-progress"),
                          "to have 1 channels, but got 3 channels", "example_inputs()")
    assert not out.exists()


# ------------------------------------------------------------------ scenarios, in-process (fast)
def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``fxquant ARGV`` in this process: (exit status, stdout, stderr)."""
    from fxquant.cli.main import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and all(line.startswith("hint: ") for line in lines[1:]), err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.fixture()
def run_copy(trained_run, tmp_path):  # noqa: F811
    """The trained run without any export in it (a test may break it)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("onnx-*", "qonnx", "cpu", "cuda", "fpga",
                                                                     "bench-*", ".*"))
    return copy


def result_dirs(run: Path) -> list[str]:
    """Everything in a run directory that an export or a bench may have added."""
    return sorted(p.name for p in run.iterdir() if p.name not in {"checkpoint.pt", "metrics.jsonl",
                                                                  "precision_map.json", "run.json"})


@pytest.mark.parametrize("name", ["onnx-qdq", "qonnx", "cpu", "cuda", "fpga", "onnx"])
def test_every_registry_name_is_a_target(name, run_copy, capsys, monkeypatch):
    """Dispatch only (the build is stubbed): RUN/<target>, the trained model, the flag options."""
    from fxquant.backends import base
    from fxquant.backends.registry import ALIASES, TARGETS, get_target

    assert set(TARGETS) | set(ALIASES) == {"onnx-qdq", "qonnx", "cpu", "cuda", "fpga", "onnx"}
    calls = []

    def fake_export(target, graph, out_dir, inputs, *, model=None, labels=None, **options):
        assert labels is not None and len(labels) == len(inputs[0])  # the validation labels, for the accuracy
        calls.append((target.name, Path(out_dir), model is not None, len(inputs[0]), options))
        comparison = {"ran": "stub", "n": len(inputs[0]), "mismatches": 0, "mismatched_elements": 0,
                      "first_mismatch": None, "bit_exact": True}
        return {"target": target.name, "bit_exact": True, "verification": comparison, "reference_check": comparison}

    monkeypatch.setattr(base, "export", fake_export)
    monkeypatch.setattr(type(get_target(name)), "unavailable", lambda self: None)
    flags = {"onnx-qdq": ["--opset", "19"], "onnx": [], "qonnx": ["--opset", "17"], "cpu": ["--mcpu", "host"],
             "cuda": ["--arch", "sm_80"], "fpga": ["--reuse", "4", "--io", "stream", "--clock-ns", "4"]}[name]
    code, out, err = run_cli(capsys, "export", "--target", name, run_copy, "--verify", "7", *flags)
    assert code == 0, err
    real = ALIASES.get(name, name)
    options = {"onnx-qdq": {"opset": 19}, "onnx": {}, "qonnx": {"opset": 17}, "cpu": {"mcpu": "host"},
               "cuda": {"arch": "sm_80"}, "fpga": {"reuse": 4, "io": "stream", "clock_ns": 4.0}}[name]
    assert calls == [(real, run_copy / real, True, 7, options)]
    assert out.startswith(f"export {real}: ") and "bit_exact=True, n=7, mismatches=0" in out
    assert "reference check vs trained model: bit-exact on 7 samples" in out


def test_unknown_target_is_one_line(run_copy, capsys):
    assert_one_line(*run_cli(capsys, "export", "--target", "abacus", run_copy)[::2], "unknown target 'abacus'")
    assert result_dirs(run_copy) == []


def perturbing(monkeypatch):
    """``load_deployment`` whose integer graph has conv1's first weight one LSB off the trained model."""
    import fxquant.deployment

    real = fxquant.deployment.load_deployment

    def load(run_dir, model=None):
        dep = real(run_dir, model)
        op = dep.graph.ops[0]
        w = op.weight.reshape(-1)
        w[0] += -1 if w[0] == op.weight_fmt.qmax else 1
        return dep

    monkeypatch.setattr(fxquant.deployment, "load_deployment", load)


def test_a_wrong_integer_graph_is_refused_and_leaves_no_result(run_copy, capsys, monkeypatch):
    perturbing(monkeypatch)
    code, _, err = run_cli(capsys, "export", "--target", "onnx-qdq", run_copy, "--verify", "200")
    assert_one_line(code, err, "the integer graph does not compute what the trained model computes")
    assert result_dirs(run_copy) == []


def test_a_failed_verification_leaves_no_result(run_copy, capsys, monkeypatch):
    from fxquant.export.targets import OnnxQdqTarget

    build = OnnxQdqTarget.build

    def wrong_build(self, graph, out_dir, **options):  # the artifact of a graph one bias LSB away
        import copy

        graph = copy.deepcopy(graph)
        graph.ops[-1].bias = graph.ops[-1].bias + (1 << 10)
        return build(self, graph, out_dir, **options)

    monkeypatch.setattr(OnnxQdqTarget, "build", wrong_build)
    code, _, err = run_cli(capsys, "export", "--target", "onnx-qdq", run_copy, "--verify", "64")
    assert_one_line(code, err, "target 'onnx-qdq' output differs from the integer reference")
    assert result_dirs(run_copy) == []


def test_bench_refuses_a_damaged_onnx_artifact(run_copy, capsys):
    code, _, err = run_cli(capsys, "export", "--target", "onnx-qdq", run_copy, "--verify", "64")
    assert code == 0, err
    path = run_copy / "onnx-qdq" / "model.onnx"
    model = onnx.load(path)
    (bias,) = [t for t in model.graph.initializer if t.name.startswith("fc2.bias")]
    values = onnx.numpy_helper.to_array(bias) + (1 << 12)
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    onnx.save(model, path)  # report.json still says bit-exact
    code, out, err = run_cli(capsys, "bench", run_copy, "--batch", "1")
    assert_one_line(code, err, "onnx-qdq export", "no longer matches the integer reference", "nothing was timed")
    assert out == "" and not list(run_copy.glob("bench-*"))


def test_bench_refuses_a_cpu_export_that_cannot_be_verified(run_copy, capsys):
    import numpy as np

    code, _, err = run_cli(capsys, "export", "--target", "cpu", run_copy, "--verify", "64")
    assert code == 0, err
    params = run_copy / "cpu" / "params.npz"
    with np.load(params) as data:
        arrays = {k: data[k] for k in data.files}
    arrays = {k: (~v if np.issubdtype(v.dtype, np.integer) else -v) for k, v in arrays.items()}
    with open(params, "wb") as f:
        np.savez(f, **arrays)
    code, out, err = run_cli(capsys, "bench", run_copy, "--target", "cpu", "--batch", "1")
    assert_one_line(code, err, "cpu export", "nothing was timed")
    assert out == "" and not list(run_copy.glob("bench-*"))


def test_bench_refuses_a_report_that_is_not_bit_exact(run_copy, capsys):
    code, _, err = run_cli(capsys, "export", "--target", "onnx-qdq", run_copy, "--verify", "16")
    assert code == 0, err
    report_path = run_copy / "onnx-qdq" / "report.json"
    report = json.loads(report_path.read_text())
    report["bit_exact"] = False
    report_path.write_text(json.dumps(report))
    code, out, err = run_cli(capsys, "bench", run_copy, "--batch", "1")
    assert_one_line(code, err, "is not verified bit-exact")
    assert out == "" and not list(run_copy.glob("bench-*"))


def test_bench_exports_a_missing_artifact_with_verification_first(run_copy, capsys):
    code, out, err = run_cli(capsys, "bench", run_copy, "--target", "qonnx", "--batch", "1", "--threads", "1")
    assert code == 0, err
    report = json.loads((run_copy / "qonnx" / "report.json").read_text())
    assert report["bit_exact"] is True and report["reference_check"]["bit_exact"] is True
    bench = json.loads((run_copy / "bench-qonnx.json").read_text())
    timed = [r for r in bench["rows"] if r["engine"] == "ORT fxquant qonnx"]
    assert timed and all(r["verified"] and r["graph_fingerprint"] == report["graph_fingerprint"] for r in timed)


def test_flavour_keeps_the_older_spelling(run_copy, capsys):
    code, out, err = run_cli(capsys, "export", "--target", "onnx", "--flavour", "qonnx", run_copy, "--verify", "16")
    assert code == 0, err
    assert out.startswith(f"export qonnx: {run_copy / 'qonnx'}, bit_exact=True, n=16")
    assert json.loads((run_copy / "qonnx" / "report.json").read_text())["target"] == "qonnx"
    code, out, err = run_cli(capsys, "export", "--flavour", "fp32", run_copy)
    assert code == 0, err
    assert "not integer-exact, not verified" in out
    assert sorted(p.name for p in (run_copy / "onnx-fp32").iterdir()) == ["baseline.json", "model.onnx"]
    assert result_dirs(run_copy) == ["onnx-fp32", "qonnx"]
