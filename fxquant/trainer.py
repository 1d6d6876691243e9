"""fxquant's trainer: quantization-aware training of a model.py under a precision policy.

``train(...)`` captures the model, inserts quantizers, calibrates, trains (SGD or AdamW on a cosine
learning rate with an optional linear warm-up: :func:`make_optimizer`), lets the policy write
precisions after every step, and writes the
run directory (:mod:`fxquant.run_dir`): ``metrics.jsonl`` per step (loss, accuracy, per-layer
precisions, BitOPs of :mod:`fxquant.bitops`, wall time), a checkpoint per epoch, and at the end the
deployed ``precision_map.json`` (BN folded) with per-epoch history. The policy may add loss terms
(:meth:`Policy.loss_terms`) and touch gradients before the step (:meth:`Policy.before_step`).
``--policy cpt`` without ``bits_min`` first runs the precision range test
(:mod:`fxquant.policies.prt`) and records its result in ``prt.json`` and in the run's options.
Before the first step the trainer states which compute stays in float (:mod:`fxquant.census`:
one line per float op, or "all compute is quantized") and records it in ``run.json``
(``census``, also in ``results``), so ``mean bits`` is never read as covering layers it does not.

**Time.** ``metrics.jsonl``'s ``time`` and the results' ``train_seconds`` are the training loop's
wall time summed over the original run and every resume (a checkpoint carries ``elapsed``); steps
redone after a ``kill -9`` are counted once, for the attempt that produced the kept metrics.

**Interruptions and resume.** Checkpoints are atomic. SIGINT/SIGTERM stop at the next step
boundary with a checkpoint of that step; ``kill -9`` leaves the last epoch's checkpoint. A
checkpoint stores the RNG state at the start of its epoch and at its step; ``resume`` restores the
epoch-start state, replays the data order up to the step, then restores the step state, so the
resumed run draws exactly the numbers the uninterrupted one drew: final weights and precision map
are identical (same machine and thread count).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxquant.bitops import BitOpsMeter, layer_costs
from fxquant.census import census_lines, take_census
from fxquant.errors import (CheckpointError, ModelFileError, RunDirError, TrainingError, TrainingInterrupted,
                            UsageError)
from fxquant.fixed_point import MIN_BITS
from fxquant.io import atomic_write_json, atomic_write_text
from fxquant.model_file import ModelFile, load_model_file
from fxquant.passes import FoldBatchNorm
from fxquant.policies import make_policy
from fxquant.policies.base import Policy, mean_bits
from fxquant.precision_map import PrecisionMap
from fxquant.quantized_graph import build_quantized_graph
from fxquant.quantizers import ACT, WEIGHT, FixedPointQuantizer, quantizers
from fxquant.rng import rng_state, seed_everything, set_rng_state
from fxquant.run_dir import METRICS, PRECISION_MAP, RunDir


OPTIMIZERS = ("sgd", "adamw")
"""What :func:`make_optimizer` builds: ``sgd`` (the default) and ``adamw``."""
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.01}
"""Weight decay of each optimizer when :class:`TrainOptions` is given none: SGD's 5e-4 (fxquant's
recipe since the start), AdamW's usual 0.01 (torch's default, and what the FP32 BERT figure of
docs/transformers.md was measured with)."""


@dataclass
class TrainOptions:
    """Training settings, recorded in ``run.json`` (``train``) and read back by ``resume``.

    ``weight_decay=None`` means the optimizer's own default (:data:`DEFAULT_WEIGHT_DECAY`); it is
    resolved here, so the recorded options always hold the number that was used. A run directory
    written before ``optimizer`` / ``warmup_steps`` existed resumes as ``sgd`` without warm-up.
    """

    epochs: int = 15
    lr: float = 0.05
    batch_size: int = 64
    seed: int = 0
    weight_decay: float | None = None
    progress: bool = True
    optimizer: str = "sgd"
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}", f"choose one of {', '.join(OPTIMIZERS)}")
        if self.warmup_steps < 0:
            raise UsageError(f"warmup_steps={self.warmup_steps} must be at least 0")
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]
        elif not self.weight_decay >= 0:
            raise UsageError(f"weight_decay={self.weight_decay} must be at least 0")


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy (%) in eval mode."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def layer_precisions(qs: dict[tuple[str, str], FixedPointQuantizer]) -> dict[str, list[int]]:
    """``{layer: [w_bits, w_fl, a_bits, a_fl]}`` of ``quantizers(model)`` (``-1`` where a role is absent)."""
    out: dict[str, list[int]] = {}
    for (layer, role), q in qs.items():
        entry = out.setdefault(layer, [-1, -1, -1, -1])
        i = 0 if role == WEIGHT else 2
        entry[i], entry[i + 1] = int(q.bits), int(q.frac_bits)
    return out


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The learning-rate multiplier before optimizer step ``step`` (0-based): linear warm-up, then cosine.

    ``step < W``: ``step / W`` (the first step runs at lr 0, as Hugging Face's
    ``get_cosine_schedule_with_warmup``); then ``0.5 * (1 + cos(pi * p))`` with
    ``p = min(step - W, T - W) / (T - W)`` (``T = total_steps``, ``T - W`` at least 1). With ``W = 0``
    this is the plain cosine over ``T`` steps that ``fxquant train`` has always used, value for value.
    """
    if step < warmup_steps:
        return step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def make_optimizer(model: nn.Module, opts: TrainOptions, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """``opts.optimizer`` on ``model``'s parameters, lr ``opts.lr``, and its schedule (:func:`lr_factor`).

    * ``sgd``: momentum 0.9, Nesterov, L2 weight decay ``opts.weight_decay`` (default 5e-4);
    * ``adamw``: ``torch.optim.AdamW`` (betas 0.9/0.999, eps 1e-8), decoupled weight decay
      ``opts.weight_decay`` (default 0.01) on every parameter.

    Both step a ``LambdaLR`` once per optimizer step: ``opts.warmup_steps`` of linear warm-up, then
    cosine to 0 at ``total_steps``.
    """
    if opts.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr,
                                                             weight_decay=opts.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=0.9, nesterov=True,
                                    weight_decay=opts.weight_decay)
    warmup = opts.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    return optimizer, scheduler


class _NonFiniteLoss(Exception):
    def __init__(self, value: float) -> None:
        super().__init__(value)
        self.value = value


def train_step(model: nn.Module, policy: Policy, optimizer: torch.optim.Optimizer, scheduler: Any,
               x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[float, torch.Tensor]:
    """One whole training step as the trainer runs it; returns (task loss, logits).

    ``on_batch_begin`` → forward → cross-entropy (+ ``loss_terms``) → backward → ``before_step`` →
    optimizer step → LR step → ``on_batch_end``. ``benchmarks/policies.py`` times exactly this function
    for its policy-overhead ratio. A non-finite loss raises before anything is updated.
    """
    policy.on_batch_begin(step, model)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    loss_value = loss.item()
    extra = policy.loss_terms(model)
    if extra is not None:
        loss = loss + extra
    total = loss.item()
    if not math.isfinite(total):
        raise _NonFiniteLoss(total)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    policy.before_step(model)
    optimizer.step()
    scheduler.step()
    policy.on_batch_end(step, loss_value, model)
    return loss_value, logits


class _StopRequest:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the next step boundary and stops."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


PRT_FILE = "prt.json"


def train(model_path: Path, out: Path, policy_name: str = "static", policy_options: dict[str, Any] | None = None,
          options: TrainOptions | None = None, force: bool = False, resume: bool = False,
          prt_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``model_path`` under a policy into run directory ``out``; returns the results summary.

    ``prt_options`` (``steps_per_level``, ``window``, ``threshold``) tune the precision range test
    that ``cpt`` runs when ``policy_options`` has no ``bits_min``.
    """
    opts = options or TrainOptions()
    run = RunDir(out)
    if resume:
        info = run.read_info()
        if info.get("status") == "finished":
            raise RunDirError(f"run {out} is already finished", "start a new run with --out")
        mf = run.model_file()
        policy_name, policy_options = info["policy_name"], info["policy_options"]
        opts = TrainOptions(**{**info["train"], "progress": opts.progress})
        state = run.load_checkpoint()
    else:
        mf = load_model_file(model_path)
        policy_options = {k: v for k, v in (policy_options or {}).items() if v is not None}
        needs_prt = policy_name == "cpt" and "bits_min" not in policy_options
        # validate options before writing (a CPT B_min still to be found is checked as 2 bits)
        make_policy(policy_name, **({**policy_options, "bits_min": MIN_BITS} if needs_prt else policy_options))
        if needs_prt:
            from fxquant.policies.prt import check_prt_options, run_prt

            if opts.optimizer != "sgd":  # the range test trains with SGD: it would not measure this optimizer
                raise UsageError(f"the precision range test (--policy cpt without --bits-min) trains with SGD, "
                                 f"not {opts.optimizer}", "give --bits-min, or use --optimizer sgd")
            check_prt_options(**(prt_options or {}))
        mf.check_example_inputs()  # the factories must work, and fit, before anything is written
        if not mf.has("data"):
            raise ModelFileError(f"{mf.path}: no data() factory", "define data(batch_size) -> (train, val)")
        run.create(force)
        state = None
        if needs_prt:
            prt = run_prt(mf, **{k: policy_options[k] for k in ("bits_max", "grad_bits") if k in policy_options},
                          **(prt_options or {}), lr=opts.lr, batch_size=opts.batch_size, seed=opts.seed,
                          weight_decay=opts.weight_decay)
            atomic_write_json(run.file(PRT_FILE), prt.to_dict())
            policy_options["bits_min"] = prt.bits_min
    policy = make_policy(policy_name, **(policy_options or {}))
    info = {"model_file": {"path": str(mf.path), "sha256": mf.sha256}, "policy_name": policy_name,
            "policy_options": policy_options or {}, "policy": policy.describe(),
            "train": {k: v for k, v in asdict(opts).items() if k != "progress"}, "status": "running"}
    run.write_info(info)
    return _Loop(run, mf, policy, opts, info).run(state)


class _Loop:
    def __init__(self, run: RunDir, mf: ModelFile, policy: Policy, opts: TrainOptions, info: dict[str, Any]) -> None:
        self.run_dir, self.mf, self.policy, self.opts, self.info = run, mf, policy, opts, info
        seed_everything(opts.seed)
        self.train_loader, self.val_loader = mf.data(opts.batch_size)
        self.model = build_quantized_graph(mf)
        self.qs = quantizers(self.model)  # fixed for the whole run: one module walk, not one per step
        self.model.train()
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * opts.epochs
        self.policy.plan(self.total_steps)
        self.optimizer, self.scheduler = make_optimizer(self.model, opts, self.total_steps)
        self.pmap_history: list[dict[str, Any]] = []

    def checkpoint(self, epoch: int, step_in_epoch: int, step: int, epoch_rng: dict[str, Any]) -> None:
        self.run_dir.save_checkpoint({
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "policy": self.policy.state_dict(),
            "optimizer_name": self.opts.optimizer,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "step": step, "epoch_rng": epoch_rng,
            "rng": rng_state(), "history": json.dumps(self.pmap_history), "bitops": self.bitops.state_dict(),
            "elapsed": self.elapsed()})

    def elapsed(self) -> float:
        """Training wall time of this run so far, summed over every resume (seconds)."""
        return self.elapsed_before + time.perf_counter() - self.t0

    def restore(self, state: dict[str, Any]) -> tuple[int, int, int, dict[str, Any]]:
        saved = state.get("optimizer_name", "sgd")  # checkpoints older than the field are SGD's
        if saved != self.opts.optimizer:
            raise CheckpointError(f"checkpoint in {self.run_dir.path} holds {saved} state, run.json says "
                                  f"{self.opts.optimizer}", "start a new run")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.policy.load_state_dict(state["policy"])
            self.pmap_history = json.loads(state["history"])
            self.bitops.load_state_dict(state["bitops"])
            self.elapsed_before = float(state["elapsed"])
            return state["epoch"], state["step_in_epoch"], state["step"], state["epoch_rng"]
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint in {self.run_dir.path} does not fit this run: {exc}",
                                  "start a new run") from exc

    def run(self, state: dict[str, Any] | None) -> dict[str, Any]:
        from tqdm import tqdm

        metrics_path = self.run_dir.file(METRICS)
        first_x, _ = next(iter(self.train_loader))
        census = take_census(self.model, tuple(self.mf.example_inputs() or (first_x,))).to_dict()
        self.info["census"] = census
        self.run_dir.write_info(self.info)
        for line in census_lines(census):
            tqdm.write(line)
        self.elapsed_before = 0.0
        self.bitops = BitOpsMeter(layer_costs(self.model, first_x), self.policy.reference_bits)
        if state is None:
            seed_everything(self.opts.seed)
            self.policy.on_train_begin(self.model, first_x)
            self.bitops = BitOpsMeter(self.bitops.costs, self.policy.reference_bits)  # starting widths
            epoch, skip, step = 0, 0, 0
            epoch_rng = rng_state()
            atomic_write_text(metrics_path, "")
        else:
            epoch, skip, step, epoch_rng = self.restore(state)
            lines = metrics_path.read_text().splitlines()[:step] if metrics_path.exists() else []
            atomic_write_text(metrics_path, "".join(line + "\n" for line in lines))  # a kill keeps the old file
        self.t0 = time.perf_counter()
        with _StopRequest() as stop, open(metrics_path, "a") as metrics, \
                tqdm(total=self.total_steps, initial=step, disable=not self.opts.progress, unit="step",
                     dynamic_ncols=True) as bar:
            while epoch < self.opts.epochs:
                set_rng_state(epoch_rng)
                batches = iter(self.train_loader)
                for _ in range(skip):
                    next(batches)
                if skip:
                    set_rng_state(state["rng"])
                for i, (x, y) in enumerate(batches, start=skip):
                    try:
                        loss_value, logits = train_step(self.model, self.policy, self.optimizer, self.scheduler,
                                                        x, y, step)
                    except _NonFiniteLoss as exc:
                        raise TrainingError(f"loss is {exc.value} at epoch {epoch} step {step}; stopped, "
                                            f"the last good checkpoint is kept in {self.run_dir.path}",
                                            "lower --lr or raise the bit widths") from None
                    step += 1
                    acc = 100.0 * float((logits.argmax(1) == y).float().mean())
                    w_bits, a_bits = mean_bits(self.model, WEIGHT, self.qs), mean_bits(self.model, ACT, self.qs)
                    metrics.write(json.dumps({"step": step, "epoch": epoch, "loss": loss_value, "acc": acc,
                                              "w_bits": w_bits, "a_bits": a_bits,
                                              "time": self.elapsed(),
                                              **self.bitops.step(len(y)),
                                              "layers": layer_precisions(self.qs)}) + "\n")
                    bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{acc:.1f}", bits=f"W{w_bits:.1f}/A{a_bits:.1f}")
                    bar.update()
                    if stop.signal is not None:
                        metrics.flush()
                        self.checkpoint(epoch, i + 1, step, epoch_rng)
                        self.info["status"] = "interrupted"
                        self.run_dir.write_info(self.info)
                        raise TrainingInterrupted(f"interrupted by signal {stop.signal} at epoch {epoch} step {step}; "
                                                  f"checkpoint saved in {self.run_dir.path}",
                                                  f"continue with: fxquant train --resume {self.run_dir.path}")
                skip = 0
                val_acc = evaluate(self.model, self.val_loader)
                self.policy.on_epoch_end(epoch, self.model)
                pmap = PrecisionMap.from_model(self.model, type(self.model).__name__)
                self.pmap_history.append({"epoch": epoch, "val_acc": val_acc,
                                          "layers": {n: lp.to_dict() for n, lp in pmap.layers.items()}})
                epoch += 1
                epoch_rng = rng_state()
                metrics.flush()
                self.checkpoint(epoch, 0, step, epoch_rng)
                bar.write(f"epoch {epoch}/{self.opts.epochs}: val acc {val_acc:.2f}%")
        return self.finish(self.elapsed())

    def finish(self, seconds: float) -> dict[str, Any]:
        train_val_acc = evaluate(self.model, self.val_loader)
        deployed = self.model
        deployed.eval()
        FoldBatchNorm()(deployed)
        self.policy.on_train_end(deployed)
        deployed_acc = evaluate(deployed, self.val_loader)
        pmap = PrecisionMap.from_model(deployed, self.info["policy"].get("policy", ""))
        pmap.model_name = type(self.mf.model()).__name__
        pmap.history = self.pmap_history
        pmap.save(self.run_dir.file(PRECISION_MAP))
        results = {"val_acc": train_val_acc, "deployed_val_acc": deployed_acc,
                   "mean_weight_bits": mean_bits(deployed, WEIGHT), "mean_act_bits": mean_bits(deployed, ACT),
                   "train_seconds": seconds, "census": self.info["census"]}
        self.info.update(status="finished", results=results)
        self.run_dir.write_info(self.info)
        return results
