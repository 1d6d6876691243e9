"""``fxquant bench RUN_DIR [--target onnx|cpu]``: measured latency and sizes, as ratios."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--target", default="onnx", show_default=True, help="onnx (ORT FP32 vs QDQ) or cpu (TVM).")
@click.option("--batch", "batches", type=int, multiple=True, default=(1, 64), show_default=True)
def bench(run_dir: Path, target: str, batches: tuple[int, ...]) -> None:
    """Measure the run's deployed model: latency p50/p90, throughput, sizes."""
    from fxquant.errors import UsageError

    if any(b < 1 for b in batches):
        raise UsageError(f"--batch values {batches} must be at least 1")
    if target == "onnx":
        from fxquant.bench import bench_onnx

        report = bench_onnx(run_dir, tuple(batches))
    elif target == "cpu":
        import copy

        import torch

        from fxquant.backends.cpu import bench_cpu
        from fxquant.bench import onnx_exports
        from fxquant.passes import StripQuantizers, lower_to_integer_graph
        from fxquant.deployment import deployed_model, held_out
        from fxquant.run_dir import RunDir

        run = RunDir(run_dir)
        gm, mf = deployed_model(run)
        x, _ = held_out(mf, 1)
        graph = lower_to_integer_graph(gm, torch.from_numpy(x))
        float_model = copy.deepcopy(gm)  # the trained float model (BN folded), PyTorch eager baseline
        StripQuantizers()(float_model)
        onnx = onnx_exports(run.path, graph)
        report = bench_cpu(graph, run.path / "cpu", batches=tuple(batches), onnx_fp32=onnx["fp32"],
                           onnx_qdq=onnx["qdq"], torch_model=float_model)
    else:
        raise UsageError(f"unknown bench target {target!r}", "choose onnx or cpu")
    click.echo(report.get("markdown", ""))
