"""``fxquant train``: quantization-aware training under a precision policy."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("model_py", required=False, type=click.Path(path_type=Path))
@click.option("--policy", default="static", show_default=True, help="static, cpt or adapt.")
@click.option("--bits", type=int, help="static: weight (and activation) bits; 32 = float.")
@click.option("--act-bits", type=int, help="static: activation bits (default: --bits).")
@click.option("--grad-bits", type=int, help="Gradient bits (32 = off).")
@click.option("--epochs", type=int, default=15, show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True,
              help="Run directory to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing run directory.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), help="Continue an interrupted run.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(model_py: Path | None, policy: str, bits: int | None, act_bits: int | None, grad_bits: int | None,
          epochs: int, lr: float, batch_size: int, seed: int, out: Path, force: bool, resume_dir: Path | None,
          no_progress: bool) -> None:
    """Train MODEL_PY (a file defining model(), data(), example_inputs()) into a run directory."""
    from fxquant.errors import UsageError
    from fxquant.trainer import TrainOptions, train as run_training

    for name, value in (("--epochs", epochs), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{name}={value} must be at least 1")
    if not (lr > 0):
        raise UsageError(f"--lr={lr} must be positive")
    options = TrainOptions(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, progress=not no_progress)
    if resume_dir is not None:
        results = run_training(Path(), resume_dir, options=options, resume=True)
        out = resume_dir
    else:
        if model_py is None:
            raise UsageError("missing MODEL_PY", "fxquant train --policy static --bits 8 examples/digits_cnn.py")
        policy_options = {"bits": bits, "act_bits": act_bits, "grad_bits": grad_bits}
        results = run_training(model_py, out, policy, policy_options, options, force=force)
    click.echo(f"run {out}: val acc {results['val_acc']:.2f}% (deployed, BN folded: "
               f"{results['deployed_val_acc']:.2f}%), mean bits W{results['mean_weight_bits']:.2f}/"
               f"A{results['mean_act_bits']:.2f}, {results['train_seconds']:.1f} s")
