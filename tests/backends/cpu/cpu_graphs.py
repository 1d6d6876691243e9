"""Small IntegerGraphs for the CPU backend tests (random integer weights, fixed seeds)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "export"))
from tests.export.integer_graphs import F, GraphMaker, cnn, mlp  # noqa: E402,F401

from fxquant.integer_graph import IntegerGraph  # noqa: E402


def residual_block(seed: int = 0) -> IntegerGraph:
    """ResNet basic block with a strided 1x1 projection, then global average pool and a linear."""
    m = GraphMaker((3, 16, 16), F(8, 5), seed)
    stem = m.conv("stem", "input", 16, F(8, 7), F(8, 3))
    h = m.conv("b.conv1", stem, 32, F(8, 7), F(8, 3), stride=2)
    h = m.conv("b.conv2", h, 32, F(8, 7), F(8, 2), relu=False)
    s = m.conv("b.shortcut", stem, 32, F(8, 7), F(8, 4), k=1, stride=2, pad=0, relu=False)
    h = m.add("b.add", h, s, F(8, 3))
    p = m.pool("avgpool", h, "avgpool2d", 8, F(8, 3))
    return m.graph(m.linear("fc", m.flatten("flat", p), 10, F(8, 7), F(8, 2)))


def mixed_bits(seed: int = 0) -> IntegerGraph:
    """2-, 4- and 8-bit weights, 3..8-bit activations, negative FL and FL > BW, standalone ReLU."""
    m = GraphMaker((2, 8, 7), F(6, 3), seed)
    h = m.conv("conv1", "input", 4, F(4, 2), F(5, 1))
    h = m.conv("conv2", h, 6, F(2, 1), F(7, -1), relu=False)
    h = m.relu("relu2", h)
    h = m.pool("pool", h)
    a = m.conv("conv3", h, 4, F(4, 5), F(3, 0), k=1, pad=0)
    b = m.requantize("skip", h, F(4, -2))
    s = m.add("add", a, m.conv("conv4", b, 4, F(5, 4), F(6, 2), k=1, pad=0), F(4, 1), relu=False)
    h = m.linear("fc1", m.flatten("flat", s), 16, F(2, 1), F(5, 3), relu=True)
    h = m.linear("fc2", h, 24, F(4, 3), F(8, 3), relu=True)
    return m.graph(m.linear("fc3", h, 10, F(8, 9), F(8, 4)))
