"""Quantizer modules: precision in buffers, changed every step without dynamo recompiles."""

from __future__ import annotations

import torch
import torch._dynamo

from fxquant.fixed_point import FixedPoint
from fxquant.passes import InsertQuantizers, capture
from fxquant.quantizers import quantizers


def test_precision_changes_cause_zero_recompiles(cnn):
    gm = capture(cnn)
    InsertQuantizers(FixedPoint(8, 4), FixedPoint(8, 4), grad_bits=8)(gm)
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    step = torch.compile(gm, backend=counting_backend, fullgraph=True)
    x = torch.randn(4, 1, 8, 8)
    gm.eval()  # BN in eval: compiled and eager calls see the same statistics
    outputs = []
    for bits in (8, 7, 6, 5, 4, 3):
        for q in quantizers(gm).values():
            q.set_format(FixedPoint(bits, bits))
        y = step(x)
        y.sum().backward()
        assert torch.equal(y, gm(x))  # the compiled graph follows the buffers
        outputs.append(y.detach())
    assert len(compiles) == 1, f"{len(compiles)} compilations for 6 precision changes"
    assert len({tuple(o.flatten().tolist()) for o in outputs}) == 6  # precision really changed
    torch._dynamo.reset()


def test_state_dict_carries_precision(mlp):
    gm = capture(mlp)
    InsertQuantizers()(gm)
    quantizers(gm)[("fc1", "weight")].set_format(FixedPoint(5, 7))
    state = gm.state_dict()
    other = capture(type(mlp)())
    InsertQuantizers()(other)
    other.load_state_dict(state)
    assert quantizers(other)[("fc1", "weight")].fmt == FixedPoint(5, 7)


def test_stochastic_seed_advances_each_training_step(mlp):
    gm = capture(mlp)
    InsertQuantizers(FixedPoint(4, 2), FixedPoint(4, 2))(gm)
    q = quantizers(gm)[("fc1", "weight")]
    q.stochastic.fill_(True)
    gm.train()
    x = torch.randn(2, 16)
    a, b = gm(x), gm(x)
    assert int(q.seed) == 2 and not torch.equal(a, b)
    gm.eval()
    stochastic_eval = gm(x)
    assert int(q.seed) == 2
    q.stochastic.fill_(False)
    assert torch.equal(stochastic_eval, gm(x))  # eval rounds to nearest whatever the flag says
