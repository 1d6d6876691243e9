"""FP32 baselines of the transformer examples: plain torch training, no fxquant capture or quantizers.

Each model file (``examples/{vit,bert,gpt2}_digits.py``) is trained in FP32 on its own task with
its :data:`TRAIN` defaults (epochs, learning rate, batch size) and **fxquant's recipe** — the same
optimizer and schedule as ``fxquant train`` (:func:`fxquant.trainer.make_optimizer`: SGD momentum
0.9 Nesterov, weight decay 5e-4, cosine over all steps; cross-entropy; seed 0) — so a quantized
run compares against the FP32 model the CLI would train. A model whose ``TRAIN`` names an ``"optimizer"`` (BERT: ``"adamw"``; post-LayerNorm, it does not
leave chance level under SGD, measured) or ``"warmup_steps"`` gets them, through the same
``make_optimizer`` (``fxquant train --optimizer adamw --warmup-steps N`` reproduces it). Reported per model: validation accuracy
(top-1, %, eval mode, :func:`fxquant.trainer.evaluate`) after the last epoch, the best epoch's, and
the training seconds (wall time of the loop, evaluation excluded). Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/transformer_fp32.py [--models vit bert gpt2] [--padded]
        [--epochs N] [--lr LR] [--batch-size B] [--threads 1] [--json out.json]

``--padded`` sets ``FXQUANT_TOKENS_PADDED=1`` (variable-length, masked sequences) for BERT and
GPT-2; ``--epochs/--lr/--batch-size`` override every model's defaults (for tuning).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fxquant.bench import machine  # noqa: E402
from fxquant.model_file import load_model_file  # noqa: E402
from fxquant.rng import seed_everything  # noqa: E402
from fxquant.trainer import TrainOptions, evaluate, make_optimizer  # noqa: E402

MODELS = {"vit": "examples/vit_digits.py", "bert": "examples/bert_digits.py", "gpt2": "examples/gpt2_digits.py"}


def train_fp32(path: Path, epochs: int | None, lr: float | None, batch_size: int | None,
               optimizer_name: str | None = None, seed: int = 0, verbose: bool = False) -> dict:
    mf = load_model_file(path)
    defaults = mf.module.TRAIN
    optimizer_name = optimizer_name or defaults.get("optimizer", "sgd")
    opts = TrainOptions(epochs=epochs or defaults["epochs"], lr=lr or defaults["lr"],
                        batch_size=batch_size or defaults["batch_size"], seed=seed, optimizer=optimizer_name,
                        warmup_steps=defaults.get("warmup_steps", 0))
    seed_everything(opts.seed)
    net = mf.model()
    train_loader, val_loader = mf.data(opts.batch_size)
    total = len(train_loader) * opts.epochs
    optimizer, scheduler = make_optimizer(net, opts, total)  # exactly fxquant train's optimizer and schedule
    seconds, history = 0.0, []
    for epoch in range(opts.epochs):
        net.train()
        t0 = time.perf_counter()
        for x, y in train_loader:
            loss = nn.functional.cross_entropy(net(x), y)
            if not math.isfinite(loss.item()):
                raise SystemExit(f"{path.name}: loss {loss.item()} at epoch {epoch}: lower --lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        seconds += time.perf_counter() - t0
        history.append(evaluate(net, val_loader))
        if verbose:
            print(f"  {path.stem} epoch {epoch + 1}/{opts.epochs}: loss {loss.item():.4f} "
                  f"val {history[-1]:.2f}% ({seconds:.1f} s)", flush=True)
    return {"model_file": str(path.relative_to(ROOT)), "epochs": opts.epochs, "lr": opts.lr,
            "batch_size": opts.batch_size, "optimizer": optimizer_name,
            "warmup_steps": opts.warmup_steps, "val_acc": history[-1], "best_val_acc": max(history),
            "train_seconds": round(seconds, 1), "params": sum(p.numel() for p in net.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--padded", action="store_true", help="FXQUANT_TOKENS_PADDED=1 for bert and gpt2")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--optimizer", choices=("sgd", "adamw"), help="override TRAIN['optimizer'] (default sgd)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="one line per epoch")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    os.environ["FXQUANT_TOKENS_PADDED"] = "1" if args.padded else "0"
    torch.set_num_threads(args.threads)
    info = {"command": " ".join(sys.argv), "machine": machine(args.threads), "torch": torch.__version__,
            "padded": args.padded, "results": {}}
    print(f"# {info['machine']['cpu']}, {args.threads} threads, torch {torch.__version__}, "
          f"padded={args.padded}")
    print(f"{'model':6} {'opt':>5} {'epochs':>6} {'lr':>6} {'batch':>5} {'val acc':>8} {'best':>7} {'seconds':>8} {'params':>8}")
    for name in args.models:
        r = train_fp32(ROOT / MODELS[name], args.epochs, args.lr, args.batch_size, args.optimizer,
                       verbose=args.verbose)
        info["results"][name] = r
        print(f"{name:6} {r['optimizer']:>5} {r['epochs']:6d} {r['lr']:6g} {r['batch_size']:5d} {r['val_acc']:7.2f}% "
              f"{r['best_val_acc']:6.2f}% {r['train_seconds']:8.1f} {r['params']:8d}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
