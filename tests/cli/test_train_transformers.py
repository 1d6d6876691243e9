"""`fxquant train --policy static` on the tiny transformer model files: completes, no traceback.

The model files (tests/passes/models_transformers/) hold torchvision's ViT and Hugging Face BERT /
GPT-2 on the bundled digits (images, or their 64 pixel intensities as int64 token ids): capture,
calibration, training steps at batch 64, evaluation at batch 64 on a partial last batch, the
census and BitOPs all run on integer token ids. Which compute stays in float is recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "tests" / "passes" / "models_transformers"


@pytest.mark.parametrize("name", ["vit_small", "bert_tiny", "gpt2_tiny", "gpt2_cls_tiny"])
def test_static_training_completes(tmp_path, name):
    out = tmp_path / name
    proc = subprocess.run([sys.executable, "-m", "fxquant.cli.main", "train", "--policy", "static", "--bits", "8",
                           str(MODELS / f"{name}.py"), "--out", str(out), "--epochs", "1", "--batch-size", "48",
                           "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 6  # 256 samples at batch 48: five full batches and one of 16
    assert all(m["bitops"] > 0 for m in metrics)
    census = info["census"]
    assert census["quantized_layers"] > 0 and census["total_macs"] > 0
    # every linear layer (HF Conv1D included) and attention matmul is quantized: float ops own no MACs
    # beyond the element-wise ones (LayerNorm, softmax, embeddings are a later task)
    assert census["quantized_macs"] >= 0.95 * census["total_macs"], census
