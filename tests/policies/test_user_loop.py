"""The 10-line training loop of docs/policies.md drives every policy (no fxquant trainer).

Each policy must actually change the widths the forward runs at (the quantizers start off, at 32
bits); the expected widths are worked out by hand from each policy's rule, not from its code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxquant.policies import make_policy
from fxquant.quantizers import ACT, WEIGHT, quantizers


def _loop(gm, name: str, options: dict) -> tuple[list[dict], torch.Tensor]:
    """Run the documented loop for 2 epochs of 4 batches; the widths each step's forward ran at."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)]
    epochs, seen = 2, []
    assert {int(q.bits) for q in quantizers(gm).values()} == {32}  # off before the policy starts
    # --- the loop from docs/policies.md ---
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    policy = make_policy(name, **options)
    policy.plan(epochs * len(data))
    policy.on_train_begin(gm, data[0][0])
    step = 0
    for epoch in range(epochs):
        for x, y in data:
            policy.on_batch_begin(step, gm)
            seen.append({key: (int(q.bits), int(q.frac_bits), int(q.grad_bits)) for key, q in quantizers(gm).items()})
            loss = F.cross_entropy(gm(x), y)
            extra = policy.loss_terms(gm)
            opt.zero_grad()
            (loss if extra is None else loss + extra).backward()
            policy.before_step(gm)
            opt.step()
            policy.on_batch_end(step, loss.item(), gm)
            step += 1
        policy.on_epoch_end(epoch, gm)
    # ---
    return seen, loss


def test_static_sets_every_width(tiny) -> None:
    seen, loss = _loop(tiny, "static", {"bits": 6})
    assert torch.isfinite(loss)
    assert all({bits for bits, _, _ in step.values()} == {6} for step in seen)  # weights and activations, every step


def test_cpt_cycles_the_forward_width(tiny) -> None:
    # B_t = round(3 + (7 - 3) (1 - cos(pi x)) / 2), x = (t mod T) / T, T = 8 steps / 2 cycles = 4:
    # x = 0, 1/4, 1/2, 3/4 -> 3 + 4 * (0, 0.146, 0.5, 0.854) = 3, 3.59, 5, 6.41 -> 3, 4, 5, 6
    seen, loss = _loop(tiny, "cpt", {"bits_min": 3, "bits_max": 7, "cycles": 2})
    assert torch.isfinite(loss)
    expected = [3, 4, 5, 6, 3, 4, 5, 6]
    for layer_role in (("conv", WEIGHT), ("fc", WEIGHT), ("input", ACT), ("conv", ACT)):
        assert [step[layer_role][0] for step in seen] == expected, layer_role
    assert [step[("fc", ACT)][0] for step in seen] == [7] * 8  # the graph output stays at B_max
    assert all(bits == 8 for step in seen for _, _, bits in step.values())  # BW static at 8


def test_adapt_starts_at_its_initial_format_and_switches(tiny) -> None:
    seen, loss = _loop(tiny, "adapt", {"lb_min": 2, "lb_max": 4})
    assert torch.isfinite(loss)
    for layer in ("conv", "fc"):
        formats = [step[(layer, WEIGHT)] for step in seen]
        assert formats[0] == (8, 4, 8)  # <init_bits = 8, init_frac_bits = 4>, gradients at max(8, BW)
        assert formats[1] == formats[0]  # no switch before the first lookback (lb_min = 2 steps) ends
        assert len({f[:2] for f in formats}) > 1, f"{layer}: AdaPT never switched its weight format"
        assert all(grad == max(bits, 8) for bits, _, grad in formats)  # grad_bits_min = 8
    assert all(step[(layer, ACT)][0] == 8 and step[(layer, ACT)][2] == 32
               for step in seen for layer in ("input", "conv", "fc"))  # act_bits 8, errors unquantized
