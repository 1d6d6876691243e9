"""``fxquant.bench`` on a model whose input is int64 token ids: batches keep the ids, ORT is fed int64."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fxquant.bench import as_inputs, batch_inputs, bench_onnx, feed_as, ort_runner, verified_artifact_dir
from fxquant.errors import ExportError, InputRangeError

VOCAB, LENGTH = 12, 6
EMBEDDING_MODEL = f"""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding({VOCAB}, 8)
        self.fc = nn.Linear({LENGTH} * 8, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids).flatten(1))


def model():
    return Net()


def example_inputs():
    return (torch.zeros(1, {LENGTH}, dtype=torch.long),)


def data(batch_size=16):
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, {VOCAB}, (96, {LENGTH}), generator=g)
    y = t[:, 0] % 3
    return (DataLoader(TensorDataset(t[:64], y[:64]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(t[64:], y[64:]), batch_size=batch_size))
"""


@pytest.fixture(scope="module")
def token_run(tmp_path_factory) -> Path:
    """A one-epoch W8A8 run of an embedding -> linear model on int64 ids (32 held-out sequences)."""
    from fxquant.trainer import TrainOptions, train

    root = tmp_path_factory.mktemp("tokens")
    (root / "emb.py").write_text(EMBEDDING_MODEL)
    train(root / "emb.py", root / "run", "static", {"bits": 8},
          TrainOptions(epochs=1, batch_size=16, progress=False), force=True)
    return root / "run"


def test_batches_repeat_whole_rows_in_their_dtype():
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    (batch,) = batch_inputs(ids, 7)
    assert batch.dtype == np.int64 and batch.shape == (7, 4)
    assert all(any(np.array_equal(row, real) for real in ids) for row in batch)  # every row a held-out row
    images = np.zeros((2, 1, 3, 3), np.float32)
    a, b = batch_inputs((images, ids[:2]), 5)  # several inputs: each batched alike
    assert (a.shape, a.dtype, b.shape, b.dtype) == ((5, 1, 3, 3), np.float32, (5, 4), np.int64)
    assert as_inputs(ids)[0] is ids


def test_feed_as_never_rounds_ids():
    assert feed_as(np.array([[1.0, 2.0]], np.float32), np.int64, "x").dtype == np.int64
    with pytest.raises(InputRangeError, match="not an integer"):
        feed_as(np.array([[1.5]], np.float32), np.int64, "x")


def test_ort_runner_feeds_the_declared_int64(token_run):
    from fxquant.backends.registry import get_target
    from fxquant.deployment import load_deployment
    from fxquant.export.verify import session

    dep = load_deployment(token_run)
    out_dir, _ = verified_artifact_dir(get_target("onnx-qdq"), dep)
    model = out_dir / "model.onnx"
    assert [i.type for i in session(model).get_inputs()] == ["tensor(int64)"]
    x_all, _ = dep.held_out(32)
    assert x_all.dtype == np.int64
    x = batch_inputs(x_all, 40)  # more than the held-out set: rows repeat, ids stay in [0, V)
    assert 0 <= x[0].min() and x[0].max() < VOCAB
    (y,) = ort_runner(model, x, threads=1)()
    out = dep.graph.values[dep.graph.outputs[0]]
    expected = dep.graph.run(*dep.graph.quantize_inputs(*x))[out.name]
    np.testing.assert_array_equal(np.ldexp(y.astype(np.float64), out.fmt.frac_bits), expected)
    with pytest.raises(ExportError, match="takes 1 inputs"):
        ort_runner(model, (x[0], x[0]), threads=1)


@pytest.mark.parametrize("target", ["onnx-qdq", "qonnx"])
def test_bench_onnx_on_token_ids(token_run, target):
    report = bench_onnx(token_run, target, batches=(1, 40), threads=1, budget_s=0.1)
    rows = {(r["engine"], r["batch"]) for r in report["rows"]}
    assert rows == {(e, b) for e in ("ORT FP32", f"ORT fxquant {target}") for b in (1, 40)}
    assert all(r["verified"] for r in report["rows"] if r["engine"] == f"ORT fxquant {target}")
    assert json.loads((token_run / f"bench-{target}.json").read_text())["rows"] == report["rows"]
