"""`fxquant train` end to end and its bad inputs: one-line error, exit 2, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "examples" / "digits_cnn.py"


def fxquant(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxquant.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first.startswith("error: ")
    for fragment in fragments:
        assert fragment in proc.stderr


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "w8"
    proc = fxquant("train", "--policy", "static", "--bits", "8", str(DIGITS), "--out", str(out),
                   "--epochs", "2", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    return out


def test_train_writes_run_directory(trained_run):
    info = json.loads((trained_run / "run.json").read_text())
    assert info["status"] == "finished" and info["results"]["deployed_val_acc"] > 50
    pmap = json.loads((trained_run / "precision_map.json").read_text())
    assert pmap["layers"]["conv1"]["weight"]["bits"] == 8 and len(pmap["history"]) == 2
    lines = (trained_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 23 and {"loss", "acc", "layers", "w_bits"} <= set(json.loads(lines[0]))


def test_existing_run_dir_needs_force(trained_run):
    before = (trained_run / "precision_map.json").read_bytes()
    proc = fxquant("train", str(DIGITS), "--out", str(trained_run), "--epochs", "1")
    assert_one_line_error(proc, "exists", "--force")
    assert (trained_run / "precision_map.json").read_bytes() == before


def test_missing_model_file(tmp_path):
    assert_one_line_error(fxquant("train", str(tmp_path / "nope.py"), "--out", str(tmp_path / "r")), "does not exist")
    assert not (tmp_path / "r").exists()


def test_model_file_without_factory(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("x = 1\n")
    assert_one_line_error(fxquant("train", str(f), "--out", str(tmp_path / "r")), "no model() factory")


def test_factory_raising(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def model():\n    raise ValueError('boom')\n")
    assert_one_line_error(fxquant("train", str(f), "--out", str(tmp_path / "r")), "model() raised ValueError: boom")


def test_model_file_with_syntax_error(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def model(:\n")
    assert_one_line_error(fxquant("train", str(f), "--out", str(tmp_path / "r")), "SyntaxError")


@pytest.mark.parametrize("args,fragment", [
    (["--policy", "nope"], "unknown policy"),
    (["--bits", "1"], "bits=1 is out of range"),
    (["--bits", "40"], "bits=40 is out of range"),
    (["--epochs", "0"], "--epochs=0"),
])
def test_bad_options(tmp_path, args, fragment):
    proc = fxquant("train", str(DIGITS), "--out", str(tmp_path / "r"), *args)
    assert_one_line_error(proc, fragment)
    assert not (tmp_path / "r").exists()


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_one_line_error(fxquant("train", str(DIGITS), "--out", str(blocker / "run"), "--epochs", "1"),
                          "cannot write")


def test_debug_shows_traceback(tmp_path):
    proc = fxquant("--debug", "train", str(tmp_path / "nope.py"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr
