"""The torchvision zoo's deployment figures and model x target status: writes ``docs/zoo_results.json``.

Not a test. For each model of issue 13 (``examples/torchvision_model.py``, chosen by
``FXQUANT_TV_ARCH``; ``weights=None``, 10 classes, 3x32x32 digits):

1. ``fxquant train --policy static --bits 8`` briefly (``--train`` samples, ``--batch``, one epoch,
   the CLI's default lr: latency and size do not depend on accuracy);
2. ``fxquant export --target T --verify N`` for every registered target, each recorded as
   ``bit-exact`` (exit 0 and ``report.json`` bit-exact), ``refused`` (the target's or the
   lowering's :class:`~fxquant.errors.UnsupportedOpError`: its first reason is kept) or ``error``
   (any other failure: a mismatch, a toolchain error), with the seconds it took;
3. where ``onnx-qdq`` is bit-exact: the FP32 ONNX baseline (``RUN/onnx-fp32``) and the size ratio
   QDQ / FP32 of the two ``model.onnx`` files;
4. latency, side by side in one process (:func:`fxquant.bench.time_engines`: the engines take turns,
   p50 over blocks of calls): ORT FP32 (the ratio's reference), ORT on the verified QDQ model and,
   where ``cpu`` is bit-exact, fxquant-TVM on the verified ``RUN/cpu`` library, at batch 1 and 32,
   **every engine with the same thread count**, once with 1 thread and once with 2
   (:func:`fxquant.bench.ort_runner` ``intra_op_num_threads``,
   :func:`fxquant.backends.cpu.build.set_tvm_threads`). Only artifacts whose report certifies them
   bit-exact for the run's integer graph, re-run on held-out inputs first, are timed
   (:func:`fxquant.bench.verified_artifact_dir`).

The CLI is driven in this process (``fxquant.cli.main.cli``, exactly the console script's command
group); the exception class of a failed command is what tells ``refused`` from ``error``.

    PYTHONPATH=. .venv/bin/python benchmarks/zoo.py                    # all models, all targets
    PYTHONPATH=. .venv/bin/python benchmarks/zoo.py --models resnet18 --targets onnx-qdq,cpu --out /tmp/z.json

writes the results (``--out``, default ``docs/zoo_results.json``: date, CPU, flags, command, per
model per target status) and prints a markdown table; ``python -m fxquant.backends.coverage``
renders the "Models" table of ``docs/coverage.md`` from that file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILE = ROOT / "examples" / "torchvision_model.py"
MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "squeezenet1_1")
RESULTS = ROOT / "docs" / "zoo_results.json"
SCHEMA = "fxquant.zoo_results"
BATCHES = (1, 32)
THREADS = (1, 2)


def run_cli(argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """One ``fxquant`` command in this process: status (ok / refused / error), first line, seconds."""
    import click

    from fxquant.cli.main import cli
    from fxquant.errors import FxquantError, UnsupportedOpError

    os.environ.update(env)
    start = time.perf_counter()
    try:
        cli.main(args=[str(a) for a in argv], prog_name="fxquant", standalone_mode=False)
        status, message = "ok", ""
    except UnsupportedOpError as exc:
        status, message = "refused", exc.message
    except FxquantError as exc:
        status, message = "error", f"{type(exc).__name__}: {exc.message}"
    except click.ClickException as exc:
        status, message = "error", f"usage: {exc.format_message()}"
    except Exception as exc:  # noqa: BLE001 - a crash is a result here, not a reason to stop the table
        status, message = "error", f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    return {"status": status, "message": message, "seconds": round(time.perf_counter() - start, 1)}


def first_reason(message: str) -> str:
    """The first problem of a refusal (problems are joined by ``"; "``), at most 240 characters."""
    return message.split("; ")[0][:240]


def export_status(run: Path, target: str, n_verify: int, env: dict[str, str]) -> dict[str, Any]:
    from fxquant.backends.base import read_report

    result = run_cli(["export", "--target", target, "--verify", str(n_verify), str(run)], env)
    if result["status"] == "ok":
        report = read_report(run / target)
        exact = bool(report and report["bit_exact"])
        return {"status": "bit-exact" if exact else "error", "seconds": result["seconds"],
                "n": report["verification"]["n"] if report else 0,
                **({} if exact else {"reason": "report.json is missing or not bit-exact"}),
                **({"build_seconds": report["artifact"].get("build_seconds")} if report else {})}
    return {"status": result["status"], "seconds": result["seconds"], "reason": first_reason(result["message"])}


def latency(run: Path, env: dict[str, str], with_cpu: bool, budget_s: float) -> dict[str, Any]:
    """ORT FP32 vs ORT QDQ (vs fxquant-TVM) at :data:`BATCHES`, per thread count of :data:`THREADS`."""
    from fxquant.backends.cpu.bench import cpu_engine, set_tvm_threads
    from fxquant.backends.registry import get_target
    from fxquant.bench import baseline_engine, onnx_engine, time_engines
    from fxquant.deployment import load_deployment

    os.environ.update(env)
    if with_cpu:  # TVM sizes its pool once: reserve the largest count before the first run
        from fxquant.backends.cpu.build import reserve_tvm_threads
        reserve_tvm_threads(max(THREADS))
    dep = load_deployment(run)
    x_all, _ = dep.held_out(max(BATCHES))
    out: dict[str, Any] = {"rows": [], "tvm_num_threads": {}}
    for threads in THREADS:
        engines = [baseline_engine(dep, threads), onnx_engine(get_target("onnx-qdq"), dep, threads, "ORT QDQ")]
        if with_cpu:
            engines.append(cpu_engine(dep, threads))
            out["tvm_num_threads"][str(threads)] = set_tvm_threads(threads)
        for row in time_engines(engines, x_all, BATCHES, budget_s):
            out["rows"].append({"threads": threads, **{k: row[k] for k in ("engine", "batch", "p50_ms", "p90_ms",
                                                                             "ratio", "runs", "artifact",
                                                                             "verified")}})
    return out


def sizes(run: Path) -> dict[str, Any]:
    """Bytes of the FP32 baseline and the QDQ ``model.onnx`` (both verified/exported above)."""
    from fxquant.export.targets import FP32_DIR, MODEL_FILE as ONNX

    fp32, qdq = (run / FP32_DIR / ONNX).stat().st_size, (run / "onnx-qdq" / ONNX).stat().st_size
    return {"fp32_bytes": fp32, "qdq_bytes": qdq, "ratio": round(qdq / fp32, 4)}


def bench_model(model: str, targets: list[str], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    env = {"FXQUANT_TV_ARCH": model, "FXQUANT_TV_TRAIN": str(args.train), "FXQUANT_TV_VAL": str(args.val)}
    run = work / model
    train = run_cli(["train", "--policy", "static", "--bits", "8", str(MODEL_FILE), "--out", str(run), "--force",
                     "--epochs", "1", "--batch-size", str(args.batch), "--no-progress"], env)
    result: dict[str, Any] = {"train": {"status": train["status"], "seconds": train["seconds"],
                                        **({"reason": first_reason(train["message"])} if train["message"] else {})},
                              "targets": {}}
    print(f"{model}: train {train['status']} {train['seconds']} s {train['message'][:200]}", flush=True)
    if train["status"] != "ok":
        return result
    for target in targets:
        status = export_status(run, target, args.val, env)
        result["targets"][target] = status
        print(f"{model} -> {target}: {status['status']} {status['seconds']} s {status.get('reason', '')[:200]}",
              flush=True)
    if result["targets"].get("onnx-qdq", {}).get("status") == "bit-exact" and not args.no_latency:
        try:
            result["latency"] = latency(run, env, result["targets"].get("cpu", {}).get("status") == "bit-exact",
                                        args.budget)
            result["size"] = sizes(run)
        except Exception as exc:  # noqa: BLE001 - recorded, the other models still run
            result["latency_error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:240]}"
    return result


def markdown(results: dict[str, Any]) -> str:
    """The status table (model x target) and the figures table (sizes and latency ratios vs ORT FP32)."""
    targets = results["targets"]
    lines = ["| model | train | " + " | ".join(f"`{t}`" for t in targets) + " |",
             "|---|---|" + "---|" * len(targets)]
    for model, r in results["models"].items():
        cells = [r["targets"].get(t, {}).get("status", "—") for t in targets]
        lines.append(f"| {model} | {r['train']['status']} ({r['train']['seconds']} s) | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + latency_lines(results["models"])) + "\n"


def latency_lines(models: dict[str, Any], digits: int = 2) -> list[str]:
    """The figures table: per model with a ``latency`` record, QDQ / FP32 bytes and each engine's p50
    (ratio vs ORT FP32) per thread count and batch; ``digits`` decimals of the milliseconds."""
    lines = ["| model | QDQ / FP32 bytes | threads | batch | ORT FP32 ms | ORT QDQ ms (ratio) | "
             "fxquant-TVM ms (ratio) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for model, r in models.items():
        if "latency" not in r:
            continue
        size = r["size"]
        keyed = {(row["threads"], row["batch"], row["engine"]): row for row in r["latency"]["rows"]}
        for threads in THREADS:
            for batch in BATCHES:
                base = keyed[(threads, batch, "ORT FP32")]
                cells = []
                for engine in ("ORT QDQ", "fxquant-TVM"):
                    row = keyed.get((threads, batch, engine))
                    cells.append(f"{row['p50_ms']:.{digits}f} ({row['ratio']:.2f}x)" if row else "—")
                lines.append(f"| {model} | {size['qdq_bytes']} / {size['fp32_bytes']} ({size['ratio']:.3f}x) | "
                             f"{threads} | {batch} | {base['p50_ms']:.{digits}f} | {cells[0]} | {cells[1]} |")
    return lines


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    from fxquant.backends.registry import TARGETS
    from fxquant.bench import machine

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--train", type=int, default=32, help="training samples (one epoch)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--val", type=int, default=64, help="validation samples: --verify inputs and the latency inputs")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per engine set and batch")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, help="keep the run directories here (default: a temporary directory)")
    args = p.parse_args(argv)
    models, targets = args.models.split(","), args.targets.split(",")
    for name in targets:
        if name not in TARGETS:
            p.error(f"unknown target {name!r}: choose from {', '.join(TARGETS)}")
    command = "PYTHONPATH=. python benchmarks/zoo.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fxquant-zoo-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        per_model = {m: bench_model(m, targets, work, args) for m in models}
    results = {"schema": SCHEMA, "schema_version": 1,
               "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "command": command.strip(), "commit": git_commit(), "machine": machine(),
               "load_average": [round(v, 2) for v in os.getloadavg()],
               "settings": {"train_samples": args.train, "batch": args.batch, "epochs": 1, "lr": "CLI default",
                            "verify": args.val, "batches": list(BATCHES), "threads": list(THREADS),
                            "budget_s": args.budget},
               "targets": targets, "models": per_model, "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    print(f"wrote {args.out} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
