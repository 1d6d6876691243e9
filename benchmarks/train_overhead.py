"""Training-step overhead of fxquant's quantizers: ResNet-20, batch 128, FP32 vs W8A8.

Both models are built from the same weights and run in one process; steps alternate A/B so that
any load on the machine hits both alike. Reported: median step time of each and the ratio.
The quantized step includes the static policy's per-step range following (what ``fxquant
train`` does). Usage::

    .venv/bin/python benchmarks/train_overhead.py [--steps 20] [--batch 128] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxquant.bench import machine  # noqa: E402
from fxquant.io import atomic_write_json  # noqa: E402
from fxquant.model_file import load_model_file  # noqa: E402
from fxquant.passes import FuseReluIntoQuantizers, InsertQuantizers, capture  # noqa: E402
from fxquant.policies.static import StaticPolicy  # noqa: E402


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, after=None):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> float:
        t = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if after is not None:
            after()
        return time.perf_counter() - t

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mf = load_model_file(Path(__file__).resolve().parents[1] / "examples" / "resnet20.py")
    fp32 = mf.model().train()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    gm = capture(copy.deepcopy(fp32), mf.example_inputs())
    InsertQuantizers()(gm)
    FuseReluIntoQuantizers()(gm)  # the trainer's pipeline
    gm.train()
    policy = StaticPolicy(bits=args.bits)
    policy.on_train_begin(gm, x)
    steps = {"fp32": make_step(fp32, x, y),
             f"W{args.bits}A{args.bits}": make_step(gm, x, y, lambda: policy.on_batch_end(0, 0.0, gm))}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            t = step()
            if i >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    quant = f"W{args.bits}A{args.bits}"
    result = {"machine": machine(), "threads": args.threads, "batch": args.batch, "steps": args.steps,
              "median_s": med, "ratio": med[quant] / med["fp32"]}
    print(f"ResNet-20 train step, batch {args.batch}, {args.threads} threads, median of {args.steps}: "
          f"FP32 {med['fp32'] * 1e3:.1f} ms, {quant} {med[quant] * 1e3:.1f} ms, ratio {result['ratio']:.3f}x")
    if args.json:
        atomic_write_json(args.json, result)


if __name__ == "__main__":
    main()
