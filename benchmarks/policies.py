"""Policies benchmark: FP32, static W8A8, CPT, AdaPT and AdaPT with a 5-bit budget, one table.

Trains each configuration with ``fxquant.trainer.train`` (fixed seed, same data order) and prints,
per model: deployed validation accuracy, mean weight/activation bits of the deployed model,
training BitOPs relative to FP32 and to static 8-bit training (:mod:`fxquant.bitops`), wall time
relative to static 8-bit training (training loop only, two separate runs; CPT's precision range
test is listed separately), and the **policy overhead**: the wall-time ratio of whole training
steps, policy vs static W8A8/G8, measured **interleaved** in one process (:func:`step_overhead`:
``fxquant.trainer.train_step`` of a static graph and of the policy's graph, same weights and
batches, alternating static A, policy, static B in rotating order; the median over rounds of the
policy step over the static-A step, and of static B over static A as the noise floor). Not a
timed test: run it by hand, results go to ``docs/benchmarks.md``::

    python benchmarks/policies.py --threads 1           # digits CNN (15 epochs) + ResNet-20 (5 epochs)
    python benchmarks/policies.py --models digits --seeds 0,1,2 --threads 1
    python benchmarks/policies.py --models digits --overhead-only --threads 1   # the overhead column only

Rows accumulate in ``RUNS/policies.json`` (keyed by model, config and seed), so runs of separate
invocations combine; the table shows the mean (and, over several seeds, ± the standard deviation)
of every configuration run so far for the chosen models.
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any

import click
import torch

from fxquant.io import atomic_write_json
from fxquant.model_file import load_model_file
from fxquant.policies import make_policy
from fxquant.quantized_graph import build_quantized_graph
from fxquant.rng import seed_everything
from fxquant.run_dir import METRICS
from fxquant.trainer import PRT_FILE, TrainOptions, make_optimizer, train, train_step

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


def step_overhead(model_path: Path, policy: str, options: dict[str, Any], batch: int, steps: int = 60,
                  warmup: int = 5, seed: int = 0) -> dict[str, Any]:
    """Interleaved wall-time ratio of whole training steps, ``policy`` vs static W8A8/G8.

    Three graphs from the same model.py and the same initial weights: static A, the policy, static
    B. Each round runs one :func:`fxquant.trainer.train_step` of each on the same batch, the order
    rotating from round to round, so machine load and cache state hit all three alike. Returns the
    median step times, ``ratio``, the median over rounds of ``policy / static A`` (paired: one round,
    one machine load), and ``noise``, the same for ``static B / static A`` (the A/A floor: what "no
    overhead" reads as on this machine).
    """
    mf = load_model_file(model_path)
    seed_everything(seed)
    loader, _ = mf.data(batch)
    batches = list(itertools.islice(itertools.cycle(loader), warmup + steps))
    opts = TrainOptions(batch_size=batch, seed=seed, progress=False)
    runners = {}
    initial = None
    for name, pol, pol_options in (("static_a", "static", STATIC8), (policy, policy, options),
                                   ("static_b", "static", STATIC8)):
        gm = build_quantized_graph(mf)
        if initial is None:
            initial = gm.state_dict()
        gm.load_state_dict(initial)
        gm.train()
        p = make_policy(pol, **pol_options)
        p.plan(warmup + steps)
        p.on_train_begin(gm, batches[0][0])
        optimizer, scheduler = make_optimizer(gm, opts, warmup + steps)
        runners[name] = (gm, p, optimizer, scheduler)
    times: dict[str, list[float]] = {name: [] for name in runners}
    names = list(runners)
    for i, (x, y) in enumerate(batches):
        for name in names[i % 3:] + names[:i % 3]:  # rotate the order: no graph always runs first
            gm, p, optimizer, scheduler = runners[name]
            t = time.perf_counter()
            train_step(gm, p, optimizer, scheduler, x, y, i)
            if i >= warmup:
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    paired = [p / a for p, a in zip(times[policy], times["static_a"])]  # same round: same machine load
    floor = [b / a for b, a in zip(times["static_b"], times["static_a"])]
    return {"timed": f"fxquant.trainer.train_step of {Path(model_path).name}, batch {batch}, {steps} interleaved "
                     f"rounds after {warmup} warm-up", "median_s": med,
            "ratio": statistics.median(paired), "noise": statistics.median(floor)}


STATIC8 = {"bits": 8, "grad_bits": 8}


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
        results = train(path, run, policy, dict(options), opts, force=True)
        total = time.perf_counter() - t0
        metrics = last_metrics(run)
        prt = json.loads((run / PRT_FILE).read_text()) if (run / PRT_FILE).exists() else None
        # the policy exactly as the run used it (CPT: with the B_min its range test found)
        recorded = json.loads((run / "run.json").read_text())["policy_options"]
        overhead = step_overhead(path, policy, recorded, batch, seed=seed)
        rows.append({"model": name, "config": label, "seed": seed, "acc": results["deployed_val_acc"],
                     "w_bits": results["mean_weight_bits"], "a_bits": results["mean_act_bits"],
                     "bitops": metrics["bitops_cum"], "bitops_vs_fp32": metrics["bitops_vs_fp32"],
                     "train_s": results["train_seconds"], "prt_s": total - results["train_seconds"] if prt else 0.0,
                     "overhead": overhead["ratio"], "overhead_noise": overhead["noise"],
                     "overhead_timed": overhead["timed"],
                     "prt": f"B_min={prt['bits_min']}" if prt else ""})
        click.echo(f"  {name} / {label}: {rows[-1]['acc']:.2f}% in {results['train_seconds']:.0f} s", err=True)
    return rows


ORDER = {label: i for i, (_, label, _, _) in enumerate(CONFIGS + EXTRA_CONFIGS)}


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def _overhead(group: list[dict[str, Any]]) -> str:
    """Mean interleaved step-time ratio and A/A noise; rows from the retired loop-minus-hooks method are left out."""
    measured = [r for r in group if "overhead_timed" in r]
    if not measured:
        return "— | —"
    return f"{_mean(measured, 'overhead'):.3f} | {_mean(measured, 'overhead_noise'):.3f}"


def overhead_table(models: list[str], configs: list[tuple[str, str, str, dict[str, Any]]], steps: int,
                   seed: int) -> str:
    """``--overhead-only``: the interleaved step-time ratio of each config, without training it.

    A CPT config without ``bits_min`` would need the range test; here it uses ``bits_min=2``, what
    PRT found on the digits CNN (docs/benchmarks.md); the row says which options were timed.
    """
    lines = ["| model | config | options timed | timed | step time vs static-8 (interleaved) | A/A noise |",
             "|---|---|---|---|---|---|"]
    for name in models:
        path, epochs, batch = MODELS[name]
        for slug, label, policy, options in configs:
            options = dict(options)
            if policy == "cpt":
                options.setdefault("bits_min", 2)
                if slug.endswith("_slow"):
                    options["cycles"] = max(1, epochs // 2)
            r = step_overhead(path, policy, options, batch, steps=steps, seed=seed)
            lines.append(f"| {name} | {label} | `{json.dumps(options)}` | {r['timed']} | {r['ratio']:.3f} | "
                         f"{r['noise']:.3f} |")
            click.echo(f"  {name} / {label}: {r['ratio']:.3f} (noise {r['noise']:.3f})", err=True)
    return "\n".join(lines)


def table(rows: list[dict[str, Any]]) -> str:
    """One markdown line per (model, config): means over seeds; ratios against the same seeds' runs."""
    lines = ["| model | config | seeds | val acc % (deployed) | Δ vs FP32 pp | mean W/A bits | BitOPs vs FP32 "
             "| BitOPs vs static-8 | wall vs static-8 (separate runs) | step time vs static-8 (interleaved) "
             "| A/A noise | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
                         f"{_mean(group, 'train_s') / _mean(same, 'train_s'):.2f} | {_overhead(group)} | "
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
@click.option("--overhead-only", is_flag=True, help="Only the interleaved step-time ratios (no training runs).")
@click.option("--overhead-steps", type=int, default=60, show_default=True, help="Interleaved rounds timed.")
def main(models: str, epochs: int | None, seeds: str, configs: str | None, threads: int | None, out: Path,
         overhead_only: bool, overhead_steps: int) -> None:
    chosen = CONFIGS
    if configs:
        by_slug = {c[0]: c for c in CONFIGS + EXTRA_CONFIGS}
        unknown = [c for c in configs.split(",") if c not in by_slug]
        if unknown:
            raise click.BadParameter(f"unknown config(s) {unknown}; choose from {sorted(by_slug)}")
        chosen = [by_slug[c] for c in configs.split(",")]
    if threads:
        torch.set_num_threads(threads)
    if overhead_only:
        click.echo(overhead_table([n.strip() for n in models.split(",")], chosen, overhead_steps,
                                  int(seeds.split(",")[0])))
        return
    store = out / "policies.json"
    rows = json.loads(store.read_text()) if store.exists() else []
    names = [name.strip() for name in models.split(",")]
    for name in names:
        for seed in (int(s) for s in seeds.split(",")):
            new = run_model(name, out, epochs, seed, chosen)
            keys = {(r["model"], r["config"], r["seed"]) for r in new}
            rows = [r for r in rows if (r["model"], r["config"], r["seed"]) not in keys] + new
            atomic_write_json(store, rows)
    click.echo(table([r for r in rows if r["model"] in names]))


if __name__ == "__main__":
    main()
