"""``fxquant prt``: CPT's precision range test on a model.py; prints and stores ``B_min``/``B_max``.

The bounds are written as JSON (default ``prt.json``) with the per-width accuracy curves and
improvements; pass them on with ``fxquant train --policy cpt --bits-min B_MIN --bits-max B_MAX``.
The test itself is :func:`fxquant.policies.prt.run_prt`.
"""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("model_py", type=click.Path(path_type=Path))
@click.option("--bits-max", type=int, default=8, show_default=True, help="Upper bound (static counterpart's bits).")
@click.option("--grad-bits", type=int, default=8, show_default=True, help="Backward (gradient) bits.")
@click.option("--prt-steps", type=int, default=40, show_default=True, help="Optimizer steps per width.")
@click.option("--prt-window", type=int, default=10, show_default=True, help="Steps averaged at each end of a level.")
@click.option("--prt-threshold", type=float, default=10.0, show_default=True,
              help="Accuracy gain (percentage points) that marks B_min.")
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("prt.json"), show_default=True,
              help="Where to store the bounds.")
def prt(model_py: Path, bits_max: int, grad_bits: int, prt_steps: int, prt_window: int, prt_threshold: float,
        lr: float, batch_size: int, seed: int, out: Path) -> None:
    """Find CPT's precision bounds for MODEL_PY by the precision range test."""
    from fxquant.io import atomic_write_json
    from fxquant.model_file import load_model_file
    from fxquant.policies.prt import run_prt

    result = run_prt(load_model_file(model_py), bits_max=bits_max, grad_bits=grad_bits, steps_per_level=prt_steps,
                     window=prt_window, threshold=prt_threshold, lr=lr, batch_size=batch_size, seed=seed)
    for bits, gain in result.improvement.items():
        click.echo(f"{bits:>2} bits: training accuracy {gain:+.1f} pp over the level")
    atomic_write_json(out, result.to_dict())
    click.echo(f"B_min = {result.bits_min}, B_max = {result.bits_max} (stored in {out})")
