"""Nothing lost: a run killed at any moment resumes to the identical result of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli.test_train_cli import DIGITS, ROOT, assert_one_line_error, fxquant

ARGS = ["--policy", "static", "--bits", "6", "--epochs", "3", "--no-progress", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every run: identical float sums


def start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fxquant.cli.main", "train", str(DIGITS), "--out", str(out),
                             *ARGS], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(out: Path, steps: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("training too slow")


def result(out: Path) -> tuple[dict, dict]:
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    pmap = json.loads((out / "precision_map.json").read_text())
    return state["model"], pmap


def times(out: Path) -> list[float]:
    return [json.loads(line)["time"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_time_accumulates(out: Path, before: float) -> None:
    """Wall time carries on from the interrupted run: no reset to 0 at the resume."""
    t = times(out)
    assert t == sorted(t), "metrics time went backwards at the resume"
    seconds = json.loads((out / "run.json").read_text())["results"]["train_seconds"]
    assert seconds >= t[-1] > before > 0


def resume(out: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fxquant.cli.main", "train", "--resume", str(out), "--no-progress"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = start(out)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return result(out)


def assert_identical(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (wa, ma), (wb, mb) = a, b
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert ma == mb


def test_kill_9_then_resume_is_identical(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_steps(out, 23 + 7, proc)  # inside the second epoch: the last checkpoint is epoch 1's
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # loadable after kill -9
    kept = times(out)[state["step"] - 1]  # the last step the epoch checkpoint covers
    assert state["elapsed"] >= kept
    resume(out)
    assert_identical(result(out), reference)
    assert_time_accumulates(out, kept)


def test_sigterm_checkpoints_mid_epoch_and_resume_is_identical(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_steps(out, 23 + 11, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    assert "--resume" in proc.stderr.read()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step_in_epoch"] > 0
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    before = times(out)[-1]
    resume(out)
    assert_identical(result(out), reference)
    assert_time_accumulates(out, before)


def test_corrupt_checkpoint_is_reported(tmp_path):
    out = tmp_path / "run"
    proc = start(out)
    wait_for_steps(out, 25, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = out / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert_one_line_error(fxquant("train", "--resume", str(out)), "truncated or corrupt")
    assert_one_line_error(fxquant("export", str(out)), "truncated or corrupt")


def test_run_dir_from_incompatible_version(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"format": "fxquant.run", "schema_version": 999}))
    assert_one_line_error(fxquant("train", "--resume", str(out)), "schema_version 999")
    assert_one_line_error(fxquant("export", str(out)), "schema_version 999")


def test_not_a_run_dir(tmp_path):
    assert_one_line_error(fxquant("export", str(tmp_path)), "not an fxquant run directory")
