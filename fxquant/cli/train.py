"""``fxquant train``: quantization-aware training under a precision policy.

Policy options are plain flags; each reaches only the policy that has it (``docs/policies.md``):
static ``--bits --act-bits --grad-bits``; cpt ``--bits-min --bits-max --cycles --schedule
--grad-bits`` (+ ``--prt-*`` for the range test run when ``--bits-min`` is omitted); adapt
``--init-bits --init-frac-bits --buff --lb-min --lb-max --res-min --res-max --gamma --act-bits
--grad-bits (minimum) --l1 --l2 --no-grad-norm --no-stochastic --trim --bits-budget``.

Optimizer (every policy; :func:`fxquant.trainer.make_optimizer`): ``--optimizer sgd`` (default:
momentum 0.9, Nesterov) or ``adamw``; ``--weight-decay`` (default: 5e-4 for sgd, 0.01 for adamw);
``--warmup-steps`` of linear warm-up before the cosine schedule (default 0). All are recorded in
``run.json`` and restored by ``--resume`` (which takes them from the run, not from the flags).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import click


@click.command()
@click.argument("model_py", required=False, type=click.Path(path_type=Path))
@click.option("--policy", default="static", show_default=True, help="static, cpt or adapt.")
@click.option("--bits", type=int, help="static: weight (and activation) bits; 32 = float.")
@click.option("--act-bits", type=int, help="static: activation bits (default: --bits).")
@click.option("--grad-bits", type=int, help="Gradient bits (32 = off).")
@click.option("--bits-min", type=int, help="cpt: lower bound B_min (default: precision range test).")
@click.option("--bits-max", type=int, help="cpt: upper bound B_max  [default: 8]")
@click.option("--cycles", type=int, help="cpt: number of precision cycles N  [default: 32]")
@click.option("--schedule", help="cpt: cosine, triangular or cosine_annealing  [default: cosine]")
@click.option("--prt-steps", type=int, help="PRT: optimizer steps per width  [default: 40]")
@click.option("--prt-window", type=int, help="PRT: steps averaged at each end of a level  [default: 10]")
@click.option("--prt-threshold", type=float, help="PRT: accuracy gain (pp) that marks B_min  [default: 10]")
@click.option("--init-bits", type=int, help="adapt: initial BW  [default: 8]")
@click.option("--init-frac-bits", type=int, help="adapt: initial FL  [default: 4]")
@click.option("--buff", type=int, help="adapt: buffer bits  [default: 8]")
@click.option("--lb-min", type=int, help="adapt: lookback lower bound  [default: 25]")
@click.option("--lb-max", type=int, help="adapt: lookback upper bound  [default: 100]")
@click.option("--res-min", type=int, help="adapt: resolution (bins) lower bound  [default: 50]")
@click.option("--res-max", type=int, help="adapt: resolution (bins) upper bound  [default: 150]")
@click.option("--gamma", type=float, help="adapt: lookback momentum  [default: 0.33]")
@click.option("--l1", type=float, help="adapt: L1 regularisation weight  [default: 1e-5]")
@click.option("--l2", type=float, help="adapt: extra L2 regularisation weight  [default: 0]")
@click.option("--no-grad-norm", is_flag=True, help="adapt: do not normalise weight gradients (Eq. 3.4).")
@click.option("--no-stochastic", is_flag=True, help="adapt: round to nearest during training.")
@click.option("--trim", is_flag=True, help="adapt: lossless trim of leading bits (beyond the paper).")
@click.option("--bits-budget", type=float, help="adapt: mean weight-bit budget (implies --trim).")
@click.option("--epochs", type=int, default=15, show_default=True)
@click.option("--lr", type=float, default=0.05, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--optimizer", default="sgd", show_default=True, metavar="[sgd|adamw]",
              help="sgd: momentum 0.9, Nesterov; adamw: torch.optim.AdamW. Both on a cosine schedule.")
@click.option("--weight-decay", type=float, help="Weight decay  [default: 5e-4 for sgd, 0.01 for adamw]")
@click.option("--warmup-steps", type=int, default=0, show_default=True,
              help="Optimizer steps of linear learning-rate warm-up before the cosine decay.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/latest"), show_default=True,
              help="Run directory to write.")
@click.option("--force", is_flag=True, help="Overwrite an existing run directory.")
@click.option("--resume", "resume_dir", type=click.Path(path_type=Path), help="Continue an interrupted run.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train(model_py: Path | None, policy: str, bits: int | None, act_bits: int | None, grad_bits: int | None,
          bits_min: int | None, bits_max: int | None, cycles: int | None, schedule: str | None,
          prt_steps: int | None, prt_window: int | None, prt_threshold: float | None, init_bits: int | None,
          init_frac_bits: int | None, buff: int | None, lb_min: int | None, lb_max: int | None,
          res_min: int | None, res_max: int | None, gamma: float | None, l1: float | None, l2: float | None,
          no_grad_norm: bool, no_stochastic: bool, trim: bool, bits_budget: float | None,
          epochs: int, lr: float, batch_size: int, seed: int, optimizer: str, weight_decay: float | None,
          warmup_steps: int, out: Path, force: bool, resume_dir: Path | None, no_progress: bool) -> None:
    """Train MODEL_PY (a file defining model(), data(), example_inputs()) into a run directory."""
    from fxquant.errors import UsageError
    from fxquant.policies import policy_class
    from fxquant.trainer import TrainOptions, train as run_training

    for name, value in (("--epochs", epochs), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{name}={value} must be at least 1")
    if not (lr > 0):
        raise UsageError(f"--lr={lr} must be positive")
    if warmup_steps < 0:
        raise UsageError(f"--warmup-steps={warmup_steps} must be at least 0")
    if weight_decay is not None and not (weight_decay >= 0):
        raise UsageError(f"--weight-decay={weight_decay} must be at least 0")
    options = TrainOptions(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, weight_decay=weight_decay,
                           progress=not no_progress, optimizer=optimizer, warmup_steps=warmup_steps)
    if resume_dir is not None:
        results = run_training(Path(), resume_dir, options=options, resume=True)
        out = resume_dir
    else:
        if model_py is None:
            raise UsageError("missing MODEL_PY", "fxquant train --policy static --bits 8 examples/digits_cnn.py")
        given = {"bits": bits, "act_bits": act_bits, "grad_bits": grad_bits, "bits_min": bits_min,
                 "bits_max": bits_max, "cycles": cycles, "schedule": schedule, "init_bits": init_bits,
                 "init_frac_bits": init_frac_bits, "buff": buff, "lb_min": lb_min, "lb_max": lb_max,
                 "res_min": res_min, "res_max": res_max, "gamma": gamma, "l1": l1, "l2": l2,
                 "normalize_grads": False if no_grad_norm else None, "stochastic": False if no_stochastic else None,
                 "trim": trim or None, "bits_budget": bits_budget}
        if policy == "adapt" and grad_bits is not None:
            given["grad_bits_min"], given["grad_bits"] = grad_bits, None
        accepted = set(inspect.signature(policy_class(policy)).parameters)
        stray = sorted(k for k, v in given.items() if v is not None and k not in accepted)
        if stray:
            flags = {"normalize_grads": "--no-grad-norm", "stochastic": "--no-stochastic", "grad_bits_min": "--grad-bits"}
            raise UsageError(f"--policy {policy} takes no "
                             f"{', '.join(flags.get(k, '--' + k.replace('_', '-')) for k in stray)}",
                             "see `fxquant train --help` for which flags each policy reads")
        prt_options = {k: v for k, v in (("steps_per_level", prt_steps), ("window", prt_window),
                                         ("threshold", prt_threshold)) if v is not None}
        if prt_options and (policy != "cpt" or bits_min is not None):
            raise UsageError("--prt-* options need --policy cpt without --bits-min",
                             "drop them, or omit --bits-min so the range test runs")
        results = run_training(model_py, out, policy, {k: v for k, v in given.items() if v is not None}, options,
                               force=force, prt_options=prt_options)
    from fxquant.census import mean_bits_line

    click.echo(f"run {out}: val acc {results['val_acc']:.2f}% (deployed, BN folded: "
               f"{results['deployed_val_acc']:.2f}%), "
               f"{mean_bits_line(results['mean_weight_bits'], results['mean_act_bits'], results.get('census'))}, "
               f"{results['train_seconds']:.1f} s")
