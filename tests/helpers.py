"""Test helpers: build deployed quantized graphs with given or random per-layer formats."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from fxquant.fixed_point import FixedPoint, fit_frac_bits
from fxquant.integer_graph import IntegerGraph
from fxquant.passes import FoldBatchNorm, FuseReluIntoQuantizers, InsertQuantizers, capture
from fxquant.policies.base import calibrate
from fxquant.quantizers import quantizers


def deployed(model: nn.Module, x: torch.Tensor, bits=(2, 8), fl_jitter: int = 0, seed: int = 0,
             example: tuple | None = None, fuse_relu: bool = True) -> fx.GraphModule:
    """Capture, quantize (random bits in ``bits``, FL fitted to range ± jitter), train one step, fold BN."""
    rng = random.Random(seed)
    gm = capture(model, example)
    InsertQuantizers()(gm)
    if fuse_relu:
        FuseReluIntoQuantizers()(gm)
    gm.train()
    gm(x)  # BN running statistics move away from their init
    calibrate(gm, x)
    for q in quantizers(gm).values():
        b = rng.randint(*bits)
        q.set_format(FixedPoint(b, fit_frac_bits(float(q.amax), b) + rng.randint(-fl_jitter, fl_jitter)))
    gm.eval()
    FoldBatchNorm()(gm)
    return gm


def fx_integer_outputs(gm: fx.GraphModule, x: torch.Tensor, frac_bits: int) -> np.ndarray:
    """The fx graph run in float64, output converted to integers (asserted to be integral)."""
    with torch.no_grad():
        y = gm.double()(x.double()).numpy()
    gm.float()
    k = np.ldexp(y, frac_bits)
    assert np.array_equal(k, np.rint(k)), "fx float64 output is not on its fixed-point grid"
    return k.astype(np.int64)


def trained_digits_run(run: Path, weight_bits: int, n_inputs: int) -> tuple[IntegerGraph, np.ndarray]:
    """Train the digits CNN for one epoch into ``run``; its integer graph and ``n_inputs`` held-out inputs."""
    from fxquant.deployment import load_deployment
    from fxquant.trainer import TrainOptions, train

    example = Path(__file__).resolve().parents[1] / "examples" / "digits_cnn.py"
    train(example, run, "static", {"bits": weight_bits, "act_bits": 8, "grad_bits": None},
          TrainOptions(epochs=1, lr=0.05, batch_size=64, seed=0, progress=False), force=True)
    dep = load_deployment(run)
    x, _ = dep.held_out(n_inputs)
    return dep.graph, x


def assert_lowering_exact(gm: fx.GraphModule, x: torch.Tensor) -> IntegerGraph:
    """Lower ``gm`` (example ``x[:1]``) and check ``IntegerGraph.run`` against the fx graph in float64, LSB for LSB."""
    from fxquant.passes import lower_to_integer_graph

    graph = lower_to_integer_graph(gm, x[:1])
    out = graph.run(*graph.quantize_inputs(x.numpy()))[graph.outputs[0]]
    np.testing.assert_array_equal(out, fx_integer_outputs(gm, x, graph.values[graph.outputs[0]].fmt.frac_bits))
    return graph
