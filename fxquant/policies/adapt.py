"""AdaPT: adaptive per-layer fixed-point precision (Kummer et al., "Adaptive Precision Training").

Every Conv/Linear layer ``l`` has a weight format ``<BW^l, FL^l>`` (initially ``<8,4>``), a lookback
``lb^l`` and a histogram resolution ``r^l``. Every step the policy adds the layer's normalised
weight gradient ``g/||g||`` to an accumulator (Eq. 3.4; O(weights) memory, Eq. 3.5); when a layer
has accumulated ``lb^l`` batches it runs, in the paper's order:

1. **Gradient diversity** ``Δs = lb / ||Σ_k g_k/||g_k|| ||`` (Eq. 3.5, = Eq. 3.3 on unit gradients).
2. **Lookback** ``lb_new = clamp(ceil(lb_upr / Δs), lb_lwr, lb_upr)``,
   ``lb = ceil(γ lb_new + (1 - γ) lb)``; **resolution** ``r ± 1`` (clamped to ``[r_lwr, r_upr]``)
   when ``lb`` sits at its upper / lower bound.
3. **Push-down** (:func:`fxquant.policies.kl.push_down`): true bisection for the coarsest
   ``<BW_min, FL_min>`` with a real histogram ``KL(P||Q) = 0`` at ``r`` bins.
4. **Push-up** from ``Δs`` with ``ℓ = ln Δs - 1``: if ``ℓ > 0``,
   ``s1 = max(ceil(1/ℓ²), 1)``, ``s2 = max(min(ceil(32 ℓ²), 32) - FL_min, 1)``,
   ``s = min(s1, s2) | ceil((s1 + s2)/2) | max(s1, s2)`` for strategy ``min | mean | max``;
   else ``s = 1``. Then ``FL = min(FL_min + s, 32)``, ``BW = min(max(BW_min, FL) + 1, 32)``.
5. **Buffer bits**: ``FL = min(FL, 32 - buff)``, ``BW = max(min(FL + buff, 32), BW)``.

The **strategy** is adapted every step from the loss: with ``L_avg`` the mean loss of the last
``mean(lb)`` steps, ``st <- min`` if ``L_avg > L``; else ``min -> mean -> max``.

Paper-reading choices (the text is ambiguous; the authors' code resolves some of it):

* "``log^2 Δs - 1``" is read as the code computes it, ``(ln Δs - 1)²``; the push-up FL of step 4
  (not ``FL_min``) enters the buffer step 5, as in the code; ``s2``'s floor is the paper's 1.
* fxquant's widths stop at 16 bits: a wider result keeps its FL where 16 bits still cover
  ``max|W|`` and is cut to 16 bits, giving up fraction bits (the paper's 32-bit cap).
* Not copied from the authors' code (known defects): its "KL" (``KLDivLoss`` on probabilities,
  not log-probabilities) is not a KL divergence; its FL "bisection" never moves the probe; the
  FL >= 4 floor and WL >= 8 forcing. Here FL and BW are searched over their whole legal ranges.
* ``lb`` starts at ``lb_lwr`` and ``r`` at ``r_lwr`` (the paper gives only the bounds); the
  strategy starts at ``min`` (the code's default).
* **Activations** (the paper quantizes weights and gradients per layer and says activations use
  "the same level as the layer's weights", which for a weight FL would saturate activations):
  every activation quantizer uses ``act_bits`` (default 8) with its FL following the tensor's
  range (:meth:`Policy.follow_ranges`).
* **Gradients**: each weight gradient is quantized (dynamic FL) to ``max(BW^l, grad_bits_min)``
  bits — the layer's BW as in the paper, never below 8 (CPT App. C: narrow gradients destabilise
  training; it only binds when trim or a budget make BW small). Errors are not quantized.
* **Stochastic rounding** on every quantizer during training steps; switched off after each step
  so validation and deployment round to nearest.
* **Regularisation**: ``l1 * Σ|W| + l2 * Σ W²`` over Conv/Linear weights is added to the loss
  (:meth:`loss_terms`); the trainer's SGD weight decay is a further L2 term. The paper took both
  coefficients from a grid search; defaults ``l1 = 1e-5``, ``l2 = 0``.
* **Normalised gradients** for the update (Eq. 3.4, "to limit weight growth"): each Conv/Linear
  weight gradient is divided by its L2 norm before the optimizer step (``normalize_grads``).
* Between updates a layer's weight format is fixed (no range following): ``buff`` is its headroom
  (except for layers capped by ``bits_budget``, below).

Beyond the paper (options; the defaults above are untouched):

* ``trim``: after step 5, ``BW`` becomes the fewest bits that hold the layer's quantized weights
  at its FL (:func:`fxquant.fixed_point.min_signed_bits`; ``FL >= BW`` is legal). Lossless at the
  time of the update: it drops the leading bits no weight uses. :meth:`on_train_end` applies the
  same trim to the deployed (BN-folded) weights at the FL folding fitted.
* ``bits_budget = B`` (implies ``trim``): each layer has a width cap ``W^l`` (initially 16). At
  each of the layer's updates, while the parameter-weighted mean weight width exceeds ``B`` and
  the strategy is not ``max`` (the loss is not rising), push-down goes on past KL = 0 for a layer
  wider than the budget: ``W^l <- floor(B)`` (every layer at most ``floor(B)`` bits meets the
  budget, whatever the order in which layers update); when the strategy is ``max`` (the loss
  rises) and one more bit still fits the budget, ``W^l <- W^l + 1``. A layer whose trimmed width exceeds
  its cap gets ``<W^l, fit(max|W|, W^l)>`` (the finest FL that covers its range) and, until its
  next update, its FL follows the weights' range every step as in CPT: with ``floor(B)`` bits
  there are no buffer bits, and a fixed FL would pin the largest weights at saturation (the STE
  passes no gradient there). The mean can drift above ``B`` between switches (a layer under the
  budget grows); :meth:`on_train_end` enforces the budget on the deployed model. Accuracy is
  traded for bits in the open; ``docs/benchmarks.md`` reports the trade-off.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from fxquant.errors import UsageError
from fxquant.fixed_point import MAX_BITS, MIN_BITS, OFF_BITS, FixedPoint, check_bits, check_frac_bits, fit_frac_bits
from fxquant.policies.base import Policy, set_bits
from fxquant.policies.kl import fewest_bits, push_down
from fxquant.quantizers import ACT, WEIGHT, FixedPointQuantizer, quantizers, weight_inputs

STRATEGIES = ("min", "mean", "max")
WORD_CAP = 32  # the paper's cap, before fxquant's 16-bit limit


def gradient_diversity(grad_sum_norm: float, count: int) -> float:
    """Eq. (3.5): ``lb / ||Σ g_k/||g_k|| ||`` (``inf`` for a zero sum)."""
    return count / grad_sum_norm if grad_sum_norm > 0 else math.inf


def push_up_step(diversity: float, frac_bits_min: int, strategy: str) -> int:
    """The push-up increment ``s`` of step 4 (module docstring)."""
    if not (0 < diversity < math.inf):
        return 1
    ell = math.log(diversity) - 1.0
    if ell <= 0:
        return 1
    s1 = max(math.ceil(1.0 / (ell * ell)), 1)
    s2 = max(min(math.ceil(32.0 * ell * ell), WORD_CAP) - frac_bits_min, 1)
    if strategy == "min":
        return min(s1, s2)
    if strategy == "mean":
        return math.ceil(0.5 * (s1 + s2))
    return max(s1, s2)


def push_up(fmt_min: FixedPoint, diversity: float, strategy: str, buff: int) -> tuple[int, int]:
    """Steps 4 and 5: ``(BW, FL)`` after push-up and buffer bits (the paper's 32-bit cap)."""
    fl_min = int(fmt_min.frac_bits)
    fl = min(fl_min + push_up_step(diversity, fl_min, strategy), WORD_CAP)
    bw = min(max(fmt_min.bits, fl) + 1, WORD_CAP)
    fl = min(fl, WORD_CAP - buff)
    bw = max(min(fl + buff, WORD_CAP), bw)
    return bw, fl


def fit_word(bits: int, frac_bits: int, amax: float) -> FixedPoint:
    """``<bits, frac_bits>`` within fxquant's 2..16 bits: wider words give up fraction bits."""
    if bits > MAX_BITS:
        return FixedPoint(MAX_BITS, min(frac_bits, fit_frac_bits(amax, MAX_BITS)))
    return FixedPoint(max(bits, MIN_BITS), check_frac_bits(frac_bits) or 0)


def next_strategy(strategy: str, loss_avg: float, loss: float) -> str:
    """The loss-trend rule: ``min`` while the loss is below its recent mean, else one step wider."""
    if abs(loss_avg) > abs(loss):
        return "min"
    return {"min": "mean", "mean": "max", "max": "max"}[strategy]


class AdaPTPolicy(Policy):
    """AdaPT (module docstring). Options mirror the CLI's ``--buff``, ``--lb-min`` … flags."""

    name = "adapt"

    def __init__(self, init_bits: int = 8, init_frac_bits: int = 4, buff: int = 8, lb_min: int = 25,
                 lb_max: int = 100, res_min: int = 50, res_max: int = 150, gamma: float = 0.33, act_bits: int = 8,
                 grad_bits_min: int = 8, l1: float = 1e-5, l2: float = 0.0, normalize_grads: bool = True,
                 stochastic: bool = True, trim: bool = False, bits_budget: float | None = None) -> None:
        super().__init__()
        self.init_fmt = FixedPoint(check_bits(init_bits, "init_bits"),
                                   check_frac_bits(init_frac_bits, "init_frac_bits"))
        if self.init_fmt.is_off:
            raise UsageError("--init-bits=32 switches quantization off", "use 2..16")
        self.act_bits = check_bits(act_bits, "act_bits")
        self.grad_bits_min = check_bits(grad_bits_min, "grad_bits_min")
        for name, lo, hi in (("lookback", lb_min, lb_max), ("resolution", res_min, res_max)):
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise UsageError(f"{name} bounds [{lo}, {hi}] are invalid", "give integers 1 <= min <= max")
        if not (0.0 <= gamma <= 1.0):
            raise UsageError(f"--gamma={gamma} is outside [0, 1]")
        if not (isinstance(buff, int) and 0 <= buff < WORD_CAP):
            raise UsageError(f"--buff={buff} is invalid", "use 0..31 buffer bits")
        if l1 < 0 or l2 < 0:
            raise UsageError(f"regularisation weights must be >= 0 (got l1={l1}, l2={l2})")
        if bits_budget is not None and not (MIN_BITS <= bits_budget <= MAX_BITS):
            raise UsageError(f"--bits-budget={bits_budget} is out of range", f"use {MIN_BITS}..{MAX_BITS}")
        self.buff, self.gamma, self.l1, self.l2 = buff, float(gamma), float(l1), float(l2)
        self.lb_min, self.lb_max, self.res_min, self.res_max = lb_min, lb_max, res_min, res_max
        self.normalize_grads, self.stochastic = normalize_grads, stochastic
        self.bits_budget = bits_budget
        self.trim = trim or bits_budget is not None
        self.strategy = "min"
        self.losses: list[float] = []
        self.layers: dict[str, dict[str, Any]] = {}
        self._weights: dict[str, nn.Parameter] = {}
        self._weight_values: dict[str, Any] = {}
        self._quantizers: dict[tuple[str, str], FixedPointQuantizer] = {}

    @property
    def reference_bits(self) -> int:
        return self.init_fmt.bits

    # ------------------------------------------------------------------ model bookkeeping
    def _bind(self, model: nn.Module) -> None:
        """Cache the quantizers and the weights of the quantized layers (cheap per-step access)."""
        if self._quantizers:
            return
        self._quantizers = quantizers(model)
        params = dict(model.named_parameters())
        sources = weight_inputs(model)  # the parameter each weight quantizer reads (through t(W), W * s, ...)
        missing = [layer for (layer, role) in self._quantizers if role == WEIGHT and layer not in sources]
        if missing:
            raise UsageError(f"adapt: no parameter found behind the weight quantizer of {', '.join(missing)}",
                             "AdaPT adapts parameters read by a weight quantizer; report this model")
        self._weights = {layer: params[sources[layer][0]] for (layer, role) in self._quantizers if role == WEIGHT}
        self._weight_values = {layer: sources[layer][1] for layer in self._weights}

    def _set_weight_format(self, layer: str, fmt: FixedPoint) -> None:
        q = self._quantizers[(layer, WEIGHT)]
        q.set_format(fmt)
        q.set_grad_bits(max(fmt.bits, self.grad_bits_min))

    def _mean_weight_bits(self) -> float:
        total = sum(st["bits"] * self._weights[layer].numel() for layer, st in self.layers.items())
        return total / sum(self._weights[layer].numel() for layer in self.layers)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, model: nn.Module, batch: torch.Tensor) -> None:
        self._bind(model)
        set_bits(model, act_bits=self.act_bits, grad_bits=OFF_BITS)
        for layer, w in self._weights.items():
            self.layers[layer] = {"bits": self.init_fmt.bits, "frac_bits": self.init_fmt.frac_bits,
                                  "lb": self.lb_min, "res": self.res_min, "count": 0, "cap": MAX_BITS, "capped": False,
                                  "grad_sum": torch.zeros_like(w, memory_format=torch.contiguous_format)}
            self._set_weight_format(layer, self.init_fmt)
        super().on_train_begin(model, batch)
        # follow_ranges fitted the weight FLs too: restore AdaPT's own formats
        for layer, st in self.layers.items():
            self._set_weight_format(layer, FixedPoint(st["bits"], st["frac_bits"]))
        if self.stochastic:  # quantizers round stochastically in training only, to nearest in eval
            self._bind(model)
            for q in self._quantizers.values():
                q.stochastic.fill_(True)

    def loss_terms(self, model: nn.Module) -> torch.Tensor | None:
        if self.l1 == 0 and self.l2 == 0:
            return None
        self._bind(model)
        ws = list(self._weights.values())
        term = self.l1 * sum(w.abs().sum() for w in ws) if self.l1 else 0.0
        if self.l2:
            term = term + self.l2 * sum(w.square().sum() for w in ws)
        return term

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        if not self.normalize_grads:
            return
        self._bind(model)
        for w in self._weights.values():
            if w.grad is not None:
                norm = w.grad.norm()
                if norm > 0:
                    w.grad.div_(norm)

    @torch.no_grad()
    def on_batch_end(self, step: int, loss: float, model: nn.Module) -> None:
        self._bind(model)
        self._adapt_strategy(loss)
        for layer, st in self.layers.items():
            g = self._weights[layer].grad
            if g is not None:
                norm = 1.0 if self.normalize_grads else float(g.norm())  # before_step made it a unit vector
                if norm > 0:
                    st["grad_sum"].add_(g, alpha=1.0 / norm)
            st["count"] += 1
            if st["count"] >= st["lb"]:
                self._switch_precision(layer, st)
            elif st["capped"]:
                q = self._quantizers[(layer, WEIGHT)]
                q.frac_bits.fill_(fit_frac_bits(float(q.amax), st["bits"]))
        self.follow_ranges(model, roles=(ACT,), qs=self._quantizers)

    @torch.no_grad()
    def on_train_end(self, deployed: nn.Module) -> None:
        """Trim the folded weights (folding keeps BW, refits FL); a budget still exceeded is enforced.

        Between a layer's switches the mean width can drift above the budget (a layer below it
        grows); the deployed model gets every layer wider than ``floor(B)`` cut to
        ``<floor(B), fit(max|W|)>`` when the mean exceeds ``B``.
        """
        if not self.trim:
            return
        params = dict(deployed.named_parameters())
        weights = {layer: (q, params[f"{layer}.weight"].detach().cpu().numpy().astype(np.float64).ravel())
                   for (layer, role), q in quantizers(deployed).items() if role == WEIGHT and not q.fmt.is_off}
        for q, w in weights.values():
            q.set_format(self._trimmed(w, int(q.frac_bits)))
        if self.bits_budget is None:
            return
        mean = sum(int(q.bits) * w.size for q, w in weights.values()) / sum(w.size for _, w in weights.values())
        if mean > self.bits_budget:
            cap = max(MIN_BITS, math.floor(self.bits_budget))
            for q, w in weights.values():
                if int(q.bits) > cap:
                    q.set_format(FixedPoint(cap, fit_frac_bits(float(np.max(np.abs(w))), cap)))

    def _adapt_strategy(self, loss: float) -> None:
        lb_avg = max(1, int(sum(st["lb"] for st in self.layers.values()) / max(len(self.layers), 1)))
        if len(self.losses) >= lb_avg:
            recent = self.losses[-lb_avg:]
            self.strategy = next_strategy(self.strategy, sum(recent) / lb_avg, loss)
        self.losses.append(float(loss))
        del self.losses[:-self.lb_max]

    def _switch_precision(self, layer: str, st: dict[str, Any]) -> None:
        """Steps 1-5 of the module docstring for one layer, then trim / budget."""
        diversity = gradient_diversity(float(st["grad_sum"].norm()), st["count"])
        lb_new = min(max(math.ceil(self.lb_max / diversity), self.lb_min), self.lb_max)
        st["lb"] = math.ceil(lb_new * self.gamma + (1.0 - self.gamma) * st["lb"])
        if st["lb"] >= self.lb_max:
            st["res"] = min(max(st["res"] + 1, self.res_min), self.res_max)
        elif st["lb"] <= self.lb_min:
            st["res"] = min(max(st["res"] - 1, self.res_min), self.res_max)
        w = self._weight_values[layer]().detach().cpu().numpy().astype(np.float64).ravel()  # as quantized
        fmt_min = push_down(w, st["res"])
        bits, frac_bits = push_up(fmt_min, diversity, self.strategy, self.buff)
        amax = float(np.max(np.abs(w)))
        fmt = fit_word(bits, frac_bits, amax)
        if self.bits_budget is not None:
            fmt = self._budgeted(st, w, int(fmt.frac_bits))
        elif self.trim:
            fmt = self._trimmed(w, int(fmt.frac_bits))
        st["bits"], st["frac_bits"] = fmt.bits, int(fmt.frac_bits)
        st["grad_sum"].zero_()
        st["count"] = 0
        self._set_weight_format(layer, fmt)

    @staticmethod
    def _trimmed(w: np.ndarray, frac_bits: int) -> FixedPoint:
        """Fewest bits for ``w`` at ``frac_bits``, never finer than 16 bits allow."""
        frac_bits = min(frac_bits, fit_frac_bits(float(np.max(np.abs(w))), MAX_BITS))
        return FixedPoint(fewest_bits(w, frac_bits), frac_bits)

    def _budgeted(self, st: dict[str, Any], w: np.ndarray, frac_bits: int) -> FixedPoint:
        """Trimmed format within the layer's width cap ``W^l``, after moving the cap by the budget rule."""
        trimmed = self._trimmed(w, frac_bits)
        st["bits"] = min(trimmed.bits, st["cap"])
        if self._mean_weight_bits() > self.bits_budget and self.strategy != "max" and st["bits"] > self.bits_budget:
            st["cap"] = max(MIN_BITS, math.floor(self.bits_budget))
        elif self.strategy == "max" and st["cap"] < trimmed.bits:
            st["bits"] = min(trimmed.bits, st["cap"] + 1)
            if self._mean_weight_bits() <= self.bits_budget:
                st["cap"] += 1
        st["capped"] = trimmed.bits > st["cap"]
        if not st["capped"]:
            return trimmed
        return FixedPoint(st["cap"], fit_frac_bits(float(np.max(np.abs(w))), st["cap"]))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "strategy": self.strategy, "losses": list(self.losses),
                "layers": {layer: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                           for layer, st in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.strategy = state["strategy"]
        self.losses = [float(x) for x in state["losses"]]
        self.layers = {layer: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
                       for layer, st in state["layers"].items()}
        self._quantizers, self._weights, self._weight_values = {}, {}, {}

    def describe(self) -> dict[str, Any]:
        return {"policy": self.name, "init": str(self.init_fmt), "buff": self.buff,
                "lookback": [self.lb_min, self.lb_max], "resolution": [self.res_min, self.res_max],
                "gamma": self.gamma, "act_bits": self.act_bits, "grad_bits_min": self.grad_bits_min,
                "l1": self.l1, "l2": self.l2, "normalize_grads": self.normalize_grads,
                "stochastic": self.stochastic, "trim": self.trim, "bits_budget": self.bits_budget}
