"""Issue 14's deployment figures for the transformer examples: writes ``docs/transformer_results.json``.

Not a test. For each trained run (``--run NAME=RUN_DIR``; trained with the commands of
``docs/transformers.md``, e.g. ``fxquant train --policy static --bits 8 ... examples/vit_digits.py``):

1. ``fxquant export --target T --verify N`` for every registered target (status as
   ``benchmarks/zoo.py`` records it: ``bit-exact``, ``refused`` with its first reason, or
   ``error``), and for a bit-exact export the **deployed top-1 accuracy measured on that
   artifact's own outputs** (``report.json["verification"]["accuracy"]``) beside the fake-quant
   model's (``["reference_check"]["accuracy"]``) on the same N validation samples;
2. the FP32 ONNX baseline and the size ratio QDQ / FP32 of the two ``model.onnx`` files;
3. latency side by side in one process (``benchmarks/zoo.py``'s :func:`~zoo.latency`: ORT FP32 as
   the reference, ORT on the verified QDQ model, fxquant-TVM on the verified ``RUN/cpu`` library;
   batch 1 and 32; every engine on the same thread count, 1 and 2).

The FP32 accuracy a run compares against is ``benchmarks/transformer_fp32.py``'s (same recipe, no
quantizers): pass it as ``--fp32 NAME=ACC`` to have the gap in the table.

    PYTHONPATH=. .venv/bin/python benchmarks/transformer_deploy.py --run vit=runs/vit --run bert=runs/bert \\
        --fp32 vit=95.83 --fp32 bert=94.72 [--targets onnx-qdq,cpu,fpga] [--out docs/transformer_results.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from zoo import export_status, first_reason, git_commit, latency, latency_lines, sizes  # noqa: E402

RESULTS = ROOT / "docs" / "transformer_results.json"
SCHEMA = "fxquant.transformer_results"


def _pairs(values: list[str], what: str) -> dict[str, str]:
    out = {}
    for v in values:
        name, sep, rest = v.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"{what} {v!r}: expected NAME=VALUE")
        out[name] = rest
    return out


def bench_run(name: str, run: Path, targets: list[str], n_verify: int, budget: float, *, export: bool = True,
              timing: bool = True) -> dict[str, Any]:
    from fxquant.backends.base import read_report
    from fxquant.export.targets import FP32_DIR, write_fp32_baseline
    from fxquant.deployment import load_deployment

    from fxquant.backends.registry import get_target

    info = json.loads((run / "run.json").read_text())
    cache: dict[str, Any] = {}

    def graph() -> Any:
        if "graph" not in cache:
            cache["graph"] = load_deployment(run).graph
        return cache["graph"]

    result: dict[str, Any] = {"run": str(run), "policy": info.get("policy"), "train": info.get("train"),
                              "trained_val_acc": (info.get("results") or {}).get("deployed_val_acc"),
                              "targets": {}}
    for target in targets:
        if export:
            status = export_status(run, target, n_verify, {})
        else:  # the report an earlier export wrote (latency re-verifies the artifact before timing it)
            earlier = read_report(run / target)
            problems = [] if earlier and earlier["bit_exact"] else get_target(target).check(graph())
            status = ({"status": "bit-exact", "n": earlier["verification"]["n"]} if earlier and earlier["bit_exact"]
                      else {"status": "refused", "reason": first_reason("; ".join(map(str, problems)))} if problems
                      else {"status": "not exported", "reason": "no bit-exact export here: run without --no-export"})
        report = read_report(run / target) if status["status"] == "bit-exact" else None
        if report:
            status["deployed_top1"] = (report["verification"].get("accuracy") or {}).get("top1")
            status["fake_quant_top1"] = ((report.get("reference_check") or {}).get("accuracy") or {}).get("top1")
        result["targets"][target] = status
        print(f"{name} -> {target}: {status['status']} {status.get('deployed_top1', '')} "
              f"{status.get('reason', '')[:200]}", flush=True)
    if timing and result["targets"].get("onnx-qdq", {}).get("status") == "bit-exact":
        write_fp32_baseline(graph(), run / FP32_DIR)
        result["size"] = sizes(run)
        result["latency"] = latency(run, {}, result["targets"].get("cpu", {}).get("status") == "bit-exact", budget)
    return result


def markdown(results: dict[str, Any]) -> str:
    targets = results["targets"]
    lines = ["| model | policy | FP32 | fake-quant | " + " | ".join(f"`{t}`" for t in targets) + " |",
             "|---|---|---:|---:|" + "---|" * len(targets)]
    for name, r in results["models"].items():
        cells = []
        for t in targets:
            s = r["targets"].get(t, {})
            cells.append(f"{s['deployed_top1']:.2f} %" if s.get("deployed_top1") is not None else s.get("status", "—"))
        fake = next((s["fake_quant_top1"] for s in r["targets"].values() if s.get("fake_quant_top1") is not None), None)
        fp32 = r.get("fp32_top1")
        lines.append(f"| {name} | {(r.get('policy') or {}).get('policy', '?')} | "
                     f"{'—' if fp32 is None else f'{fp32:.2f} %'} | {'—' if fake is None else f'{fake:.2f} %'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + latency_lines(results["models"], digits=3)) + "\n"


def main(argv: list[str] | None = None) -> int:
    from fxquant.backends.registry import TARGETS
    from fxquant.bench import machine
    from fxquant.io import atomic_write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", default=[], help="NAME=RUN_DIR (repeatable)")
    p.add_argument("--fp32", action="append", default=[], help="NAME=ACC: the FP32 accuracy (%%) to compare with")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--verify", type=int, default=1000, help="validation samples (all 360 of the digits by default)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timing per engine set and batch")
    p.add_argument("--no-export", action="store_true", help="reuse the runs' bit-exact exports")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    runs = {k: Path(v) for k, v in _pairs(args.run, "--run").items()}
    if not runs:
        raise SystemExit("give at least one --run NAME=RUN_DIR")
    fp32 = {k: float(v) for k, v in _pairs(args.fp32, "--fp32").items()}
    targets = [t for t in args.targets.split(",") if t]
    results: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": 1,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit(),
        "command": "PYTHONPATH=. python " + " ".join(["benchmarks/transformer_deploy.py", *(argv or sys.argv[1:])]),
        "machine": machine(), "targets": targets, "models": {}}
    for name, run in runs.items():
        results["models"][name] = {**bench_run(name, run, targets, args.verify, args.budget,
                                               export=not args.no_export, timing=not args.no_latency),
                                   **({"fp32_top1": fp32[name]} if name in fp32 else {})}
    atomic_write_json(args.out, results)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
