"""``fxquant show RUN_DIR``: per-layer precision table and a PNG of each layer's precision history.

The table is the deployed map (``precision_map.json``, BN folded): weight, activation and gradient
``<BW,FL>`` per layer, then the census of compute left in float (:mod:`fxquant.census`, from
``run.json``), the run's results (``mean bits`` says which layers it covers) and final BitOPs ratios. The PNG
(``RUN_DIR/precision_history.png``) plots every layer's weight and activation bits per training
step from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def _fmt(spec: dict | None) -> str:
    if spec is None:
        return "-"
    if spec["bits"] == 32:
        return "off"
    return f"<{spec['bits']},{'dyn' if spec['frac_bits'] is None else spec['frac_bits']}>"


def plot_history(metrics_path: Path, png: Path) -> None:
    """Weight (solid) and activation (dashed) bits of every layer against the training step."""
    import matplotlib

    from fxquant.io import atomic_write_via_path

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, layers = [], {}
    with open(metrics_path) as f:
        for line in f:
            row = json.loads(line)
            steps.append(row["step"])
            for layer, (w_bits, _, a_bits, _) in row["layers"].items():
                series = layers.setdefault(layer, ([], []))
                series[0].append(w_bits if w_bits >= 0 else None)
                series[1].append(a_bits if a_bits >= 0 else None)
    fig, axes = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for layer, (w_bits, a_bits) in layers.items():
        if any(b is not None for b in w_bits):
            axes[0].plot(steps, [float("nan") if b is None else b for b in w_bits], label=layer, lw=1)
        if any(b is not None for b in a_bits):
            axes[1].plot(steps, [float("nan") if b is None else b for b in a_bits], label=layer, lw=1, ls="--")
    axes[0].set_ylabel("weight bits")
    axes[1].set_ylabel("activation bits")
    axes[1].set_xlabel("training step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=4, loc="upper right")
    fig.tight_layout()
    atomic_write_via_path(png, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--no-plot", is_flag=True, help="Print the table only.")
def show(run_dir: Path, no_plot: bool) -> None:
    """Print RUN_DIR's per-layer precisions and plot their history."""
    from fxquant.census import census_lines, mean_bits_line
    from fxquant.errors import RunDirError
    from fxquant.precision_map import PrecisionMap
    from fxquant.run_dir import METRICS, PRECISION_MAP, RunDir

    run = RunDir(run_dir)
    info = run.read_info()
    if not run.file(PRECISION_MAP).is_file():
        raise RunDirError(f"{run_dir} has no {PRECISION_MAP} (status: {info.get('status')})",
                          "finish the run first: fxquant train --resume " + str(run_dir))
    pmap = PrecisionMap.load(run.file(PRECISION_MAP))
    width = max(len(name) for name in pmap.layers)
    click.echo(f"{'layer':<{width}}  {'kind':<9} {'weight':>9} {'act':>9} {'grad':>9}")
    for name, lp in pmap.layers.items():
        d = lp.to_dict()
        click.echo(f"{name:<{width}}  {lp.kind:<9} {_fmt(d['weight']):>9} {_fmt(d['act']):>9} {_fmt(d['grad']):>9}")
    click.echo(f"policy: {json.dumps(info.get('policy', {}))}")
    census = info.get("census")
    for line in census_lines(census) if census else ["census: not recorded (run trained before fxquant recorded it)"]:
        click.echo(line)
    results = info.get("results", {})
    if results:
        click.echo(f"val acc {results['val_acc']:.2f}% (deployed {results['deployed_val_acc']:.2f}%), "
                   f"{mean_bits_line(results['mean_weight_bits'], results['mean_act_bits'], census)}, "
                   f"{results['train_seconds']:.1f} s")
    metrics = run.file(METRICS)
    if metrics.is_file() and metrics.stat().st_size:
        with open(metrics) as f:
            last = json.loads(f.readlines()[-1])
        if "bitops_vs_fp32" in last:
            click.echo(f"training BitOPs: {last['bitops_cum']:.3e} = {last['bitops_vs_fp32']:.3f} x FP32, "
                       f"{last['bitops_vs_static']:.3f} x static counterpart")
        if not no_plot:
            png = run.file("precision_history.png")
            plot_history(metrics, png)
            click.echo(f"precision history: {png}")
