"""``fxquant export --target {onnx,cpu,cuda,fpga} RUN_DIR`` and ``fxquant fpga-sim RUN_DIR``.

Every target reads the run's integer graph (:func:`fxquant.deployment.load_deployment`) and
verifies its artifact against the integer reference on held-out inputs.
"""

from __future__ import annotations

from pathlib import Path

import click

TARGETS = ("onnx", "cpu", "cuda", "fpga")


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--target", default="onnx", show_default=True, help=f"One of {', '.join(TARGETS)}.")
@click.option("--flavour", default="qdq", show_default=True, help="onnx: qdq, qonnx or fp32.")
@click.option("--opset", type=int, help="onnx: opset (default 21).")
@click.option("--mcpu", default="host", show_default=True, help="cpu: host, znver5, x86-64-v3, …")
@click.option("--arch", default="sm_90", show_default=True, help="cuda: GPU architecture.")
@click.option("--part", default="xcu250-figd2104-2L-e", show_default=True, help="fpga: device part.")
@click.option("--clock-ns", type=float, default=5.0, show_default=True, help="fpga: clock period.")
@click.option("--reuse", type=int, default=1, show_default=True, help="fpga: reuse factor.")
@click.option("--io", "io_type", default="parallel", show_default=True, help="fpga: parallel or stream.")
@click.option("--verify", "n_verify", type=int, default=1000, show_default=True,
              help="Held-out inputs to verify the artifact on.")
@click.option("--model", type=click.Path(path_type=Path), help="Use this model.py instead of the recorded one.")
def export(run_dir: Path, target: str, flavour: str, opset: int | None, mcpu: str, arch: str, part: str, clock_ns: float,
           reuse: int, io_type: str, n_verify: int, model: Path | None) -> None:
    """Export a trained run to TARGET, verified against the integer reference simulator."""
    from fxquant.errors import UsageError
    from fxquant.deployment import load_deployment

    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}", f"choose one of {', '.join(TARGETS)}")
    if n_verify < 1:
        raise UsageError(f"--verify={n_verify} must be at least 1")
    dep = load_deployment(run_dir, model)
    graph = dep.graph
    x, _ = dep.held_out(n_verify)
    if target == "onnx":
        from fxquant.export.onnx_qdq import export_onnx

        report = export_onnx(graph, run_dir, flavour=flavour, opset=opset, verify_inputs=x)
    elif target == "cpu":
        from fxquant.backends.cpu import export_cpu

        report = export_cpu(graph, run_dir / "cpu", mcpu=mcpu, verify_inputs=x)
    elif target == "cuda":
        from fxquant.backends.cuda import export_cuda

        report = export_cuda(graph, run_dir / "cuda", arch=arch, verify_inputs=x)
    else:
        from fxquant.backends.fpga import export_fpga

        report = export_fpga(graph, run_dir / "fpga", part=part, clock_ns=clock_ns, reuse=reuse, io=io_type,
                             int_inputs=graph.quantize_inputs(x)[0])
    click.echo(_summary(target, report))


def _summary(target: str, report: dict) -> str:
    flat = {**report.get("verification", {}), **report}
    keys = [k for k in ("path", "library", "flavour", "bit_exact", "n", "samples", "mismatches", "top1_agreement",
                        "size_bytes", "param_bytes", "theoretical_bytes") if k in flat]
    return f"export {target}: " + ", ".join(f"{k}={flat[k]}" for k in keys)


@click.command("fpga-sim")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--verify", "n_verify", type=int, default=1000, show_default=True)
def fpga_sim(run_dir: Path, n_verify: int) -> None:
    """Re-run the g++ C-simulation of RUN_DIR/fpga against the integer reference."""
    from fxquant.backends.fpga import run_csim
    from fxquant.deployment import load_deployment

    dep = load_deployment(run_dir)
    graph = dep.graph
    x, _ = dep.held_out(n_verify)
    report = run_csim(run_dir / "fpga", graph, graph.quantize_inputs(x)[0])
    click.echo(_summary("fpga", report))
