"""``fxquant bench RUN_DIR [--target onnx-qdq|qonnx|cpu]``: latency of verified artifacts, as ratios.

The artifact is taken through :func:`fxquant.backends.base.verified_artifact` (exported with
verification first when it is missing or stale, re-run on held-out inputs before timing); an
artifact that cannot be verified is a one-line error, exit 2, and nothing is timed
(:mod:`fxquant.bench`).
"""

from __future__ import annotations

from pathlib import Path

import click

BENCHED = ("onnx-qdq", "qonnx", "cpu")
"""Targets that run on this machine's CPU and can be timed next to the float baselines."""


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--target", default="onnx-qdq", show_default=True,
              help="onnx-qdq (alias onnx) or qonnx: ORT FP32 vs ORT on the artifact; cpu: PyTorch, ORT FP32/QDQ, "
                   "fxquant-TVM.")
@click.option("--batch", "batches", type=int, multiple=True, default=(1, 64), show_default=True)
@click.option("--threads", type=int, help="Threads for every engine (default: the host's cores).")
def bench(run_dir: Path, target: str, batches: tuple[int, ...], threads: int | None) -> None:
    """Measure the run's verified artifacts: latency p50/p90, throughput, sizes."""
    from fxquant.backends.registry import ALIASES, TARGETS
    from fxquant.errors import UsageError

    name = ALIASES.get(target, target)
    if name not in TARGETS:
        raise UsageError(f"unknown bench target {target!r}", f"choose one of {', '.join(BENCHED)}")
    if name not in BENCHED:
        raise UsageError(f"bench target {name!r} is not timed on this CPU",
                         f"choose one of {', '.join(BENCHED)} (cuda: docs/gpu.md; fpga: estimates in its report)")
    if any(b < 1 for b in batches):
        raise UsageError(f"--batch values {batches} must be at least 1")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads={threads} must be at least 1")
    if name == "cpu":
        from fxquant.backends.cpu.bench import bench_cpu

        report = bench_cpu(run_dir, batches=tuple(batches), threads=threads)
    else:
        from fxquant.bench import bench_onnx

        report = bench_onnx(run_dir, name, tuple(batches), threads=threads)
    click.echo(report["markdown"])
