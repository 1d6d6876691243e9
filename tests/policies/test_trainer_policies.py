"""Trainer under the cpt/adapt policies: bit-identical resume, BitOPs metrics, and bad input.

A tiny model on synthetic data (4 steps per epoch) keeps every run well under a second or two.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from fxquant.cli.main import main
from fxquant.policies.adapt import AdaPTPolicy
from fxquant.policies.cpt import CPTPolicy
from fxquant.run_dir import CHECKPOINT, METRICS, PRECISION_MAP
from fxquant.errors import TrainingInterrupted
from fxquant.trainer import TrainOptions, train

MODEL = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NAN_AFTER = None  # batches served before inputs turn NaN (the trainer peeks at one batch first)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def model():
    return Net()


class Loader:
    """Synthetic data; after NAN_AFTER served batches its inputs are NaN."""

    def __init__(self, x, y, shuffle):
        self.loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=shuffle)
        self.served = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            self.served += 1
            bad = NAN_AFTER is not None and self.served > NAN_AFTER
            yield (x * float("nan") if bad else x), y


def data(batch_size=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 4, 4, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return Loader(x[:64], y[:64], True), Loader(x[64:], y[64:], False)


def example_inputs():
    return (torch.zeros(1, 1, 4, 4),)
'''

OPTIONS = TrainOptions(epochs=3, batch_size=16, progress=False)
POLICIES = {"cpt": {"bits_min": 3, "bits_max": 8, "cycles": 2},
            "adapt": {"lb_min": 2, "lb_max": 4, "res_min": 10, "res_max": 20}}


def _interrupt_after_step(monkeypatch, cls: type, at_step: int) -> None:
    """Send SIGINT to this process right after ``cls.on_batch_end`` of step ``at_step``."""
    original = cls.on_batch_end

    def interrupt(self, step, loss, model):
        original(self, step, loss, model)
        if step == at_step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cls, "on_batch_end", interrupt)


@pytest.fixture
def model_py(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(MODEL)
    return path


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / METRICS).read_text().splitlines()]
    for row in rows:
        del row["time"]
    return rows


@pytest.mark.parametrize("policy", ["cpt", "adapt"])
def test_interrupted_run_resumes_bit_identically(policy: str, model_py: Path, tmp_path: Path, monkeypatch) -> None:
    full = tmp_path / "full"
    train(model_py, full, policy, POLICIES[policy], OPTIONS)

    _interrupt_after_step(monkeypatch, {"cpt": CPTPolicy, "adapt": AdaPTPolicy}[policy], 5)
    cut = tmp_path / "cut"
    with pytest.raises(TrainingInterrupted):
        train(model_py, cut, policy, POLICIES[policy], OPTIONS)
    monkeypatch.undo()  # the interrupting hook is the only patch
    train(Path(), cut, resume=True, options=OPTIONS)

    a = torch.load(full / CHECKPOINT, weights_only=True)
    b = torch.load(cut / CHECKPOINT, weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert (full / PRECISION_MAP).read_text() == (cut / PRECISION_MAP).read_text()
    assert _metrics(full) == _metrics(cut)


def test_metrics_carry_bitops(model_py: Path, tmp_path: Path) -> None:
    train(model_py, tmp_path / "s8", "static", {"bits": 8, "grad_bits": 8}, OPTIONS)
    train(model_py, tmp_path / "cpt", "cpt", POLICIES["cpt"], OPTIONS)
    s8, cpt = _metrics(tmp_path / "s8"), _metrics(tmp_path / "cpt")
    # static W8A8/G8, by hand: conv 1->4, 3x3 on 4x4 = 576 MACs/sample, fc 64->3 = 192. The conv's
    # output error dL/dy passes BatchNorm's backward (float) before any quantizer: 32 bits. The fc's
    # error comes out of the output quantizer's backward: 8 bits.
    #   conv 576 * (8*8 + 8*32 + 8*32) = 331776;  fc 192 * (8*8 + 8*8 + 8*8) = 36864
    #   FP32 (576 + 192) * 3 * 32*32 = 2359296  ->  368640 / 2359296 = 0.15625
    assert s8[-1]["bitops_vs_fp32"] == pytest.approx(0.15625, rel=1e-12)
    assert s8[0]["bitops"] == 16 * 368640  # batch 16
    assert s8[-1]["bitops_vs_static"] == pytest.approx(1.0)
    assert 0 < cpt[-1]["bitops_vs_static"] < 1.0
    assert cpt[-1]["bitops_cum"] == sum(row["bitops"] for row in cpt)


def _cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--policy", "cyclic"], "unknown policy 'cyclic'"),
    (["--policy", "cpt", "--bits-min", "6", "--bits-max", "4"], "--bits-min=6 is above --bits-max=4"),
    (["--policy", "static", "--cycles", "4"], "--policy static takes no --cycles"),
    (["--policy", "adapt", "--lb-min", "50", "--lb-max", "10"], "lookback bounds [50, 10] are invalid"),
])
def test_bad_options_exit_2_and_write_nothing(args, message, model_py: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, err = _cli(["train", *args, str(model_py), "--out", str(out), "--no-progress"], capsys)
    assert code == 2
    assert err.splitlines()[0] == f"error: {err.splitlines()[0][7:]}" and message in err.splitlines()[0]
    assert not out.exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(model_py: Path, tmp_path: Path, capsys) -> None:
    model_py.write_text(MODEL.replace("NAN_AFTER = None", "NAN_AFTER = 5"))  # 1 peeked + epoch 0
    out = tmp_path / "run"
    code, err = _cli(["train", "--policy", "cpt", "--bits-min", "3", str(model_py), "--out", str(out),
                      "--epochs", "3", "--batch-size", "16", "--no-progress"], capsys)
    assert code == 2 and "loss is nan at epoch 1" in err
    state = torch.load(out / CHECKPOINT, weights_only=True)
    assert state["epoch"] == 1 and state["step"] == 4


def test_incompatible_resume_exits_2_and_loses_nothing(model_py: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    _interrupt_after_step(monkeypatch, CPTPolicy, 5)
    with pytest.raises(TrainingInterrupted):
        train(model_py, out, "cpt", POLICIES["cpt"], OPTIONS)
    monkeypatch.undo()  # the interrupting hook is the only patch
    checkpoint = (out / CHECKPOINT).read_bytes()

    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "policy_name": "adapt", "policy_options": {}}))
    code, err = _cli(["train", "--resume", str(out), "--no-progress"], capsys)
    assert code == 2 and "does not fit this run" in err and len(err.splitlines()) == 2
    (out / "run.json").write_text(json.dumps(info))

    model_py.write_text(MODEL + "\n# edited\n")
    code, err = _cli(["train", "--resume", str(out), "--no-progress"], capsys)
    assert code == 2 and "changed since the run was trained" in err
    assert (out / CHECKPOINT).read_bytes() == checkpoint


def test_prt_command_then_cpt_training_runs_prt_and_show(model_py: Path, tmp_path: Path, capsys) -> None:
    bounds = tmp_path / "prt.json"
    main(["prt", str(model_py), "--bits-max", "6", "--prt-steps", "4", "--prt-window", "2", "--batch-size", "16",
          "--out", str(bounds)])
    result = json.loads(bounds.read_text())
    assert 2 <= result["bits_min"] <= result["bits_max"] == 6
    assert f"B_min = {result['bits_min']}, B_max = 6" in capsys.readouterr().out

    out = tmp_path / "run"
    train(model_py, out, "cpt", {"bits_max": 6}, OPTIONS, prt_options={"steps_per_level": 4, "window": 2})
    info = json.loads((out / "run.json").read_text())
    assert info["policy_options"]["bits_min"] == json.loads((out / "prt.json").read_text())["bits_min"]
    main(["show", str(out)])
    text = capsys.readouterr().out
    assert "conv" in text and "x FP32" in text and (out / "precision_history.png").stat().st_size > 0
