"""Policies benchmark: FP32, static W8A8, CPT, AdaPT and AdaPT with a 5-bit budget, one table.

Trains each configuration with ``fxquant.trainer.train`` (fixed seed, same data order) and prints,
per model: deployed validation accuracy, mean weight/activation bits of the deployed model,
training BitOPs relative to FP32 and to static 8-bit training (:mod:`fxquant.bitops`), wall time
relative to static 8-bit training (training loop only; CPT's precision range test is listed
separately), and the **policy overhead**: the loop's time over the loop's time minus the time spent
inside the policy's hooks (measured in-process, so it holds on a shared, noisy machine where the
wall-time ratio between two runs does not). Not a timed test: run it by hand, results go to ``docs/benchmarks.md``::

    python benchmarks/policies.py --threads 1           # digits CNN (15 epochs) + ResNet-20 (5 epochs)
    python benchmarks/policies.py --models digits --seeds 0,1,2 --threads 1

Rows accumulate in ``RUNS/policies.json`` (keyed by model, config and seed), so runs of separate
invocations combine; the table shows the mean (and, over several seeds, ± the standard deviation)
of every configuration run so far for the chosen models.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch

from fxquant.policies import policy_class
from fxquant.run_dir import METRICS
from fxquant.trainer import PRT_FILE, TrainOptions, train

ROOT = Path(__file__).resolve().parent.parent
MODELS = {"digits": (ROOT / "examples" / "digits_cnn.py", 15, 64),
          "resnet20": (ROOT / "examples" / "resnet20.py", 5, 128)}
CONFIGS: list[tuple[str, str, str, dict[str, Any]]] = [  # (run dir, label, policy, options)
    ("fp32", "FP32", "static", {"bits": 32}),
    ("static8", "static W8A8 (G8)", "static", {"bits": 8, "grad_bits": 8}),
    ("cpt", "CPT FW(PRT,8)/BW8", "cpt", {}),
    ("cpt_slow", "CPT FW(PRT,8)/BW8, 2 epochs/cycle", "cpt", {}),
    ("adapt", "AdaPT (paper defaults)", "adapt", {}),
    ("adapt_budget5", "AdaPT --bits-budget 5", "adapt", {"bits_budget": 5.0}),
]
EXTRA_CONFIGS: list[tuple[str, str, str, dict[str, Any]]] = [  # the trade-off curves, by --configs
    ("cpt3", "CPT FW(3,8)/BW8 (B_min given)", "cpt", {"bits_min": 3}),
    ("cpt3_slow", "CPT FW(3,8)/BW8, 2 epochs/cycle", "cpt", {"bits_min": 3}),
    ("adapt_budget3", "AdaPT --bits-budget 3", "adapt", {"bits_budget": 3.0}),
    ("adapt_budget4", "AdaPT --bits-budget 4", "adapt", {"bits_budget": 4.0}),
    ("adapt_budget6", "AdaPT --bits-budget 6", "adapt", {"bits_budget": 6.0}),
    ("adapt_trim", "AdaPT --trim", "adapt", {"trim": True}),
]


# per-step hooks: on_train_begin runs before the trainer starts its clock
HOOKS = ("on_batch_begin", "loss_terms", "before_step", "on_batch_end", "on_epoch_end")


class HookTimer:
    """Sum the wall time spent inside a policy class's event hooks while active."""

    def __init__(self, cls: type) -> None:
        self.cls, self.seconds, self.saved = cls, 0.0, {}

    def __enter__(self) -> "HookTimer":
        for name in HOOKS:
            original = getattr(self.cls, name)
            self.saved[name] = self.cls.__dict__.get(name)

            def timed(*args, _original=original, **kwargs):
                t = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - t

            setattr(self.cls, name, timed)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self.saved.items():
            if original is None:
                delattr(self.cls, name)
            else:
                setattr(self.cls, name, original)


def last_metrics(run: Path) -> dict[str, Any]:
    with open(run / METRICS) as f:
        return json.loads(f.readlines()[-1])


def run_model(name: str, out: Path, epochs: int | None, seed: int,
              configs: list[tuple[str, str, str, dict[str, Any]]]) -> list[dict[str, Any]]:
    path, default_epochs, batch = MODELS[name]
    opts = TrainOptions(epochs=epochs or default_epochs, batch_size=batch, seed=seed, progress=False)
    rows = []
    for slug, label, policy, options in configs:
        run = out / name / f"{slug}_seed{seed}"
        if slug.endswith("_slow"):  # the paper's N = 32 spans 160 epochs (5 per cycle); short runs cycle in steps
            options = {**options, "cycles": max(1, opts.epochs // 2)}
        t0 = time.perf_counter()
        with HookTimer(policy_class(policy)) as hooks:
            results = train(path, run, policy, dict(options), opts, force=True)
        total = time.perf_counter() - t0
        metrics = last_metrics(run)
        prt = json.loads((run / PRT_FILE).read_text()) if (run / PRT_FILE).exists() else None
        rows.append({"model": name, "config": label, "seed": seed, "acc": results["deployed_val_acc"],
                     "w_bits": results["mean_weight_bits"], "a_bits": results["mean_act_bits"],
                     "bitops": metrics["bitops_cum"], "bitops_vs_fp32": metrics["bitops_vs_fp32"],
                     "train_s": results["train_seconds"], "prt_s": total - results["train_seconds"] if prt else 0.0,
                     "overhead": results["train_seconds"] / (results["train_seconds"] - hooks.seconds),
                     "prt": f"B_min={prt['bits_min']}" if prt else ""})
        click.echo(f"  {name} / {label}: {rows[-1]['acc']:.2f}% in {results['train_seconds']:.0f} s", err=True)
    return rows


ORDER = {label: i for i, (_, label, _, _) in enumerate(CONFIGS + EXTRA_CONFIGS)}


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def table(rows: list[dict[str, Any]]) -> str:
    """One markdown line per (model, config): means over seeds; ratios against the same seeds' runs."""
    lines = ["| model | config | seeds | val acc % (deployed) | Δ vs FP32 pp | mean W/A bits | BitOPs vs FP32 "
             "| BitOPs vs static-8 | wall vs static-8 | policy overhead | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        configs: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            if r["model"] == model:
                configs.setdefault(r["config"], []).append(r)
        fp32, s8 = configs["FP32"], next(v for k, v in configs.items() if k.startswith("static"))
        configs = dict(sorted(configs.items(), key=lambda kv: ORDER.get(kv[0], len(ORDER))))
        for label, group in configs.items():
            seeds = sorted(r["seed"] for r in group)
            same = [r for r in s8 if r["seed"] in seeds]
            acc = _mean(group, "acc")
            spread = f" ± {statistics.stdev(r['acc'] for r in group):.2f}" if len(group) > 1 else ""
            prt = sorted({r["prt"] for r in group if r["prt"]})
            note = ", ".join(prt) + (f" (PRT {_mean(group, 'prt_s'):.0f} s extra)" if prt else "")
            lines.append(f"| {model} | {label} | {','.join(map(str, seeds))} | {acc:.2f}{spread} | "
                         f"{acc - _mean([r for r in fp32 if r['seed'] in seeds] or fp32, 'acc'):+.2f} | "
                         f"{_mean(group, 'w_bits'):.2f} / {_mean(group, 'a_bits'):.2f} | "
                         f"{_mean(group, 'bitops_vs_fp32'):.3f} | "
                         f"{_mean(group, 'bitops') / _mean(same, 'bitops'):.3f} | "
                         f"{_mean(group, 'train_s') / _mean(same, 'train_s'):.2f} | {_mean(group, 'overhead'):.3f} | "
                         f"{note} |")
    return "\n".join(lines)


@click.command()
@click.option("--models", default="digits,resnet20", show_default=True, help="Comma-separated: digits, resnet20.")
@click.option("--epochs", type=int, help="Override every model's epoch budget.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--configs", help="Comma-separated run names (default: the five of the table); extra: "
              + ", ".join(c[0] for c in EXTRA_CONFIGS) + ".")
@click.option("--threads", type=int, help="torch threads (1 gives steadier timings on a shared machine).")
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "runs" / "bench_policies", show_default=True)
def main(models: str, epochs: int | None, seeds: str, configs: str | None, threads: int | None, out: Path) -> None:
    chosen = CONFIGS
    if configs:
        by_slug = {c[0]: c for c in CONFIGS + EXTRA_CONFIGS}
        unknown = [c for c in configs.split(",") if c not in by_slug]
        if unknown:
            raise click.BadParameter(f"unknown config(s) {unknown}; choose from {sorted(by_slug)}")
        chosen = [by_slug[c] for c in configs.split(",")]
    if threads:
        torch.set_num_threads(threads)
    store = out / "policies.json"
    rows = json.loads(store.read_text()) if store.exists() else []
    names = [name.strip() for name in models.split(",")]
    for name in names:
        for seed in (int(s) for s in seeds.split(",")):
            new = run_model(name, out, epochs, seed, chosen)
            keys = {(r["model"], r["config"], r["seed"]) for r in new}
            rows = [r for r in rows if (r["model"], r["config"], r["seed"]) not in keys] + new
            store.parent.mkdir(parents=True, exist_ok=True)
            store.write_text(json.dumps(rows, indent=2))
    click.echo(table([r for r in rows if r["model"] in names]))


if __name__ == "__main__":
    main()
