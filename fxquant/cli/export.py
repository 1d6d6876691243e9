"""``fxquant export --target NAME RUN_DIR`` and ``fxquant fpga-sim RUN_DIR``.

Every target comes from the registry (:mod:`fxquant.backends.registry`) and is exported by the
one order of :func:`fxquant.backends.base.export` into ``RUN/<target>/``: check (every problem at
once) → build in a temporary directory → the integer graph checked against the trained fake-quant
model (always) → the artifact verified against the integer graph on held-out inputs →
``report.json`` → moved into place. A target option flag (``--opset``, ``--mcpu``, …) is passed
only to a target whose ``option_defaults`` name it, and refused for any other. ``--flavour``
keeps the older spelling: ``qdq`` = ``onnx-qdq``, ``qonnx`` = ``qonnx``, ``fp32`` writes the
FP32 ONNX baseline ``RUN/onnx-fp32/`` (not a target: not integer-exact).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from fxquant.backends.registry import ALIASES, TARGETS

FLAVOURS = {"qdq": "onnx-qdq", "qonnx": "qonnx", "fp32": None}
"""``--flavour`` → target name (``None``: the FP32 baseline writer)."""
FLAG_OPTIONS = {"opset": ("--opset", "opset"), "mcpu": ("--mcpu", "mcpu"), "arch": ("--arch", "arch"),
                "part": ("--part", "part"), "clock_ns": ("--clock-ns", "clock_ns"), "reuse": ("--reuse", "reuse"),
                "io_type": ("--io", "io")}
"""click parameter → (flag, the target option it sets)."""


def target_options(target: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The target options of the given flags; a flag the target does not take is a UsageError."""
    from fxquant.errors import UsageError

    opts = {}
    for param, value in given.items():
        if value is None:
            continue
        flag, option = FLAG_OPTIONS[param]
        if option not in target.option_defaults:
            takes = [f for f, o in FLAG_OPTIONS.values() if o in target.option_defaults]
            raise UsageError(f"target {target.name!r} takes no {flag}",
                             f"its options: {', '.join(takes) or 'none'}")
        opts[option] = value
    return opts


def resolve(target: str | None, flavour: str | None) -> str | None:
    """The target name of ``--target`` / ``--flavour`` (``None``: the FP32 baseline)."""
    from fxquant.errors import UsageError

    if flavour is not None:
        if flavour not in FLAVOURS:
            raise UsageError(f"unknown ONNX flavour {flavour!r}", f"use one of {', '.join(FLAVOURS)}")
        if target is not None and ALIASES.get(target, target) not in ("onnx-qdq", "qonnx"):
            raise UsageError(f"--flavour is an ONNX option, not one of target {target!r}",
                             "drop --flavour, or use --target onnx")
        if target not in (None, "onnx", FLAVOURS[flavour]):  # the alias onnx takes any flavour
            raise UsageError(f"--target {target} contradicts --flavour {flavour}", "give one of them")
        return FLAVOURS[flavour]
    name = target or "onnx-qdq"
    if ALIASES.get(name, name) not in TARGETS:
        raise UsageError(f"unknown target {name!r}", f"choose one of {', '.join([*TARGETS, *ALIASES])}")
    return ALIASES.get(name, name)


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--target", help=f"One of {', '.join([*TARGETS, *ALIASES])} (default onnx-qdq).")
@click.option("--flavour", help="ONNX: qdq (= onnx-qdq), qonnx, or fp32 (the float baseline, not verified).")
@click.option("--opset", type=int, help="onnx-qdq, qonnx: ONNX opset (defaults 21, 13).")
@click.option("--mcpu", help="cpu: host, znver5, x86-64-v3, …")
@click.option("--arch", help="cuda: GPU architecture (sm_90, …).")
@click.option("--part", help="fpga: device part.")
@click.option("--clock-ns", type=float, help="fpga: clock period in ns.")
@click.option("--reuse", type=int, help="fpga: reuse factor.")
@click.option("--io", "io_type", help="fpga: parallel or stream.")
@click.option("--verify", "n_verify", type=int, default=1000, show_default=True,
              help="Held-out inputs to check the integer graph and the artifact on.")
@click.option("--model", type=click.Path(path_type=Path), help="Use this model.py instead of the recorded one.")
def export(run_dir: Path, target: str | None, flavour: str | None, n_verify: int, model: Path | None,
           **flags: Any) -> None:
    """Export a trained run to RUN_DIR/<target>/, verified against the integer reference simulator."""
    from fxquant.backends.registry import get_target
    from fxquant.errors import ToolchainError, UsageError

    name = resolve(target, flavour)
    if n_verify < 1:
        raise UsageError(f"--verify={n_verify} must be at least 1")
    if name is None:
        _export_fp32(run_dir, model, flags)
        return
    tgt = get_target(name)
    opts = target_options(tgt, flags)
    tgt.options(**opts)  # option names are checked before the (slow) model is loaded
    why = tgt.unavailable()
    if why:
        raise ToolchainError(f"target {tgt.name!r} cannot be built and run on this machine: {why}",
                             "install the tool it names, or export on a machine that has it")
    from fxquant.backends.base import export as export_target
    from fxquant.deployment import load_deployment

    dep = load_deployment(run_dir, model)
    x, y = dep.held_out(n_verify)
    report = export_target(tgt, dep.graph, dep.run.path / tgt.name, [x], model=dep.model, labels=y, **opts)
    click.echo(summary(report, dep.run.path / tgt.name))


def _export_fp32(run_dir: Path, model: Path | None, flags: dict[str, Any]) -> None:
    from fxquant.deployment import load_deployment
    from fxquant.errors import UsageError
    from fxquant.export.targets import FP32_DIR, write_fp32_baseline

    extra = [FLAG_OPTIONS[k][0] for k, v in flags.items() if v is not None and k != "opset"]
    if extra:
        raise UsageError(f"the FP32 baseline takes no {', '.join(extra)}", "its options: --opset")
    dep = load_deployment(run_dir, model)
    out = dep.run.path / FP32_DIR
    facts = write_fp32_baseline(dep.graph, out, **({"opset": flags["opset"]} if flags.get("opset") else {}))
    click.echo(f"export onnx-fp32 (float baseline, not integer-exact, not verified): {out / facts['file']}, "
               f"size_bytes={facts['size_bytes']}")


def summary(report: dict[str, Any], out_dir: Path) -> str:
    """One line: target, directory, bit_exact, n, mismatches and the reference check's result."""
    v, ref = report["verification"], report["reference_check"]
    checked = ("not run" if ref is None else
               f"{'bit-exact' if ref['bit_exact'] else 'MISMATCH'} on {ref['n']} samples "
               f"({ref['mismatches']} mismatches)")
    line = (f"export {report['target']}: {out_dir}, bit_exact={report['bit_exact']}, n={v['n']}, "
            f"mismatches={v['mismatches']}, reference check vs trained model: {checked}")
    if v.get("accuracy"):
        fake = (ref or {}).get("accuracy")
        line += (f"; deployed top-1 {v['accuracy']['top1']:.2f}% on {v['accuracy']['n']} validation samples"
                 + (f" (fake-quant model {fake['top1']:.2f}%)" if fake else ""))
    return line


@click.command("fpga-sim")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--verify", "n_verify", type=int, default=1000, show_default=True)
def fpga_sim(run_dir: Path, n_verify: int) -> None:
    """Re-run the C-simulation of RUN_DIR/fpga (the fpga target's run) against the integer reference."""
    from fxquant.backends.base import verified_artifact, verify
    from fxquant.backends.registry import get_target
    from fxquant.deployment import load_deployment
    from fxquant.errors import ExportError, UsageError

    if n_verify < 1:
        raise UsageError(f"--verify={n_verify} must be at least 1")
    target = get_target("fpga")
    dep = load_deployment(run_dir)
    out = dep.run.path / target.name
    verified_artifact(target, dep.graph, out)
    x, _ = dep.held_out(n_verify)
    record = verify(target, out, dep.graph, dep.graph.quantize_inputs(x))
    if not record["bit_exact"]:
        raise ExportError(f"the fpga C-simulation of {out} differs from the integer reference: {record['mismatches']} "
                          f"of {record['n']} samples", "export it again; if it persists, report it as a backend bug")
    click.echo(f"fpga-sim: {out}, bit_exact=True, n={record['n']}, mismatches=0 ({record['ran']})")
