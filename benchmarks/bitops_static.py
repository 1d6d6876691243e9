"""BitOPs of static W8A8/G8 training relative to FP32, from the layer costs alone (no training).

For a static policy the ratio does not depend on the weights or on the step, so it follows from
:func:`fxquant.bitops.layer_costs` of the trainer's graph (:func:`fxquant.quantized_graph.build_quantized_graph`)
and :func:`fxquant.bitops.step_bitops`. Prints, per example model, how many layers have an error
gradient no quantizer touches (counted at 32 bits) and the ratio. Usage::

    PYTHONPATH=. .venv/bin/python benchmarks/bitops_static.py [--bits 8] [--grad-bits 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fxquant.bitops import FP32_BITS, layer_costs, step_bitops
from fxquant.model_file import load_model_file
from fxquant.policies.static import StaticPolicy
from fxquant.quantized_graph import build_quantized_graph

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--grad-bits", type=int, default=8)
    args = ap.parse_args()
    for name in ("digits_cnn", "resnet20"):
        mf = load_model_file(ROOT / "examples" / f"{name}.py")
        gm = build_quantized_graph(mf)
        example = mf.example_inputs()
        x = example[0] if example else next(iter(mf.data(2)[0]))[0]
        StaticPolicy(bits=args.bits, grad_bits=args.grad_bits).on_train_begin(gm, x)
        costs = layer_costs(gm, x)
        ratio = step_bitops(costs, 1) / step_bitops(costs, 1, FP32_BITS, FP32_BITS)
        print(f"{name}: {len(costs)} layers, {sum(c.error_q is None for c in costs)} with float error gradients; "
              f"static W{args.bits}A{args.bits}/G{args.grad_bits} BitOPs = {ratio:.4f} x FP32")


if __name__ == "__main__":
    main()
