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
    assert info["census"]["float"] == [] and info["census"]["quantized_layers"] == 5  # conv1-3, fc1, fc2
    assert info["results"]["census"] == info["census"]


SEQ_MODEL = """
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, t):
        x = self.emb(t)
        a, _ = self.attn(x, x, x)
        h, _ = self.lstm(a)
        return self.fc(h[:, -1])


def model():
    return Net()


def example_inputs():
    return (torch.zeros(1, 5, dtype=torch.long),)


def data(batch_size=16):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 10, (32, 5), generator=g)
    y = t[:, 0] % 3
    ds = TensorDataset(t, y)
    return DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=batch_size)
"""


def test_float_compute_is_stated_recorded_and_shown(tmp_path):
    model_py = tmp_path / "seq.py"
    model_py.write_text(SEQ_MODEL)
    out = tmp_path / "run"
    proc = fxquant("train", "--policy", "static", "--bits", "8", str(model_py), "--out", str(out),
                   "--epochs", "1", "--batch-size", "16", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # by hand (tests/test_census.py's Seq): attention made explicit by capture, in-projection 5*16*48 =
    # 3840, Q K^T and A V 2 * 2*5*5*8 = 800, out-projection 5*16*16 = 1280; the integer softmax and the
    # embedding's quantized table (0 MACs); fc 8*3 = 24: 7 quantized layers, 5944 MACs; the LSTM
    # (5 steps * 4 gates * 8 * (16 + 8) = 3840 MACs, 832 params) has no quantizer: 5944 / 9784 = 60.8 %
    assert lines[0] == "census: 7 quantized layers (60.8 % of MACs); left in float (no quantizer):"
    assert lines[1] == "  float lstm: nn.LSTM: 832 params (39.5 % of 2.1 k), 3.8 k MACs/sample (39.2 % of 9.8 k)"
    assert "mean bits W8.00/A8.00 over 7 quantized layers (60.8 % of MACs); float: lstm: nn.LSTM (39.2 % of " \
           "MACs)" in lines[-1]
    census = json.loads((out / "run.json").read_text())["census"]
    assert [(op["name"], op["params"], op["macs"]) for op in census["float"]] == [("lstm: nn.LSTM", 832, 3840)]
    assert (census["quantized_macs"], census["total_macs"], census["quantized_params"]) == (5944, 9784, 2107 - 832)
    shown = fxquant("show", str(out), "--no-plot")
    assert shown.returncode == 0, shown.stderr
    assert lines[0] in shown.stdout.splitlines() and lines[1] in shown.stdout.splitlines()
    assert "over 7 quantized layers (60.8 % of MACs); float: lstm: nn.LSTM" in shown.stdout


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
    (["--optimizer", "adam"], "unknown optimizer 'adam'"),
    (["--warmup-steps", "-1"], "--warmup-steps=-1"),
    (["--optimizer", "adamw", "--policy", "cpt"], "precision range test"),
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


STOPPING_MODEL = """
import os
import signal

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def example_inputs():
    return (torch.zeros(1, 4),)


class StopAt:
    # Sends this process SIGTERM while yielding batch $STOP_AT of an epoch, only once the trainer's
    # handler is installed: the run checkpoints at that step boundary, deterministically.
    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        stop = int(os.environ.get("STOP_AT", "-1"))
        for i, batch in enumerate(self.loader):
            if i == stop and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def data(batch_size=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return StopAt(DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)), \\
        DataLoader(TensorDataset(x, y), batch_size=batch_size)
"""
ADAMW = ["--policy", "static", "--bits", "8", "--epochs", "2", "--batch-size", "8", "--lr", "0.01",
         "--optimizer", "adamw", "--warmup-steps", "3", "--no-progress", "--seed", "1"]


def test_adamw_is_recorded_and_resumed_as_adamw(tmp_path):
    import os
    import shutil

    import torch

    from fxquant.trainer import lr_factor

    model_py = tmp_path / "stop.py"
    model_py.write_text(STOPPING_MODEL)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fxquant.cli.main", "train", *args], capture_output=True,
                              text=True, cwd=ROOT, env={**env, **extra}, timeout=600)

    ref, out = tmp_path / "ref", tmp_path / "run"
    assert run(str(model_py), "--out", str(ref), *ADAMW).returncode == 0
    stopped = run(str(model_py), "--out", str(out), *ADAMW, STOP_AT="5")
    assert stopped.returncode == 130 and "--resume" in stopped.stderr, stopped.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert {k: info["train"][k] for k in ("optimizer", "warmup_steps", "weight_decay", "lr")} == \
        {"optimizer": "adamw", "warmup_steps": 3, "weight_decay": 0.01, "lr": 0.01}
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["optimizer_name"] == "adamw" and state["step"] == 6  # batch 5 of epoch 0 finished, then stopped
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(state["optimizer"]["state"].values())))
    assert state["scheduler"]["_last_lr"][0] == pytest.approx(0.01 * lr_factor(6, 16, 3))

    mismatched = tmp_path / "mismatched"  # run.json edited to SGD: the AdamW checkpoint does not fit
    shutil.copytree(out, mismatched)
    edited = json.loads((mismatched / "run.json").read_text())
    edited["train"]["optimizer"] = "sgd"
    (mismatched / "run.json").write_text(json.dumps(edited))
    assert_one_line_error(run("--resume", str(mismatched), "--no-progress"), "holds adamw state")

    resumed = run("--resume", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "run.json").read_text())["train"]["optimizer"] == "adamw"
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (ref, out))
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(b["optimizer"]["state"].values())))  # AdamW after resume
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key  # identical to the uninterrupted AdamW run
    assert (ref / "precision_map.json").read_text() == (out / "precision_map.json").read_text()
