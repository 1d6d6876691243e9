"""Small IntegerGraphs for the CUDA backend tests (random integer weights, fixed seeds)."""

from __future__ import annotations

from tests.export.integer_graphs import F, GraphMaker, cnn, mlp  # noqa: F401 (re-exported)

from fxquant.integer_graph import IntegerGraph


def residual_net(seed: int = 0) -> IntegerGraph:
    """Stem, a basic block with a strided 1x1 projection (both branches GEMMs), global avgpool, linear."""
    m = GraphMaker((3, 12, 12), F(8, 5), seed)
    stem = m.conv("stem", "input", 16, F(8, 7), F(8, 3))
    h = m.conv("b.conv1", stem, 24, F(8, 7), F(8, 3), stride=2)
    h = m.conv("b.conv2", h, 24, F(8, 7), F(8, 2), relu=False)
    s = m.conv("b.shortcut", stem, 24, F(8, 7), F(8, 4), k=1, stride=2, pad=0, relu=False)
    h = m.add("b.add", h, s, F(8, 3))
    h = m.conv("c.conv", h, 24, F(8, 7), F(8, 3), relu=False)
    h = m.add("c.add", h, s, F(7, 2))  # s is read twice: an identity-style skip, fused into c.conv
    p = m.pool("avgpool", h, "avgpool2d", 2, F(8, 3))
    return m.graph(m.linear("fc", m.flatten("flat", p), 10, F(8, 7), F(8, 2)))


def mixed_net(seed: int = 0) -> IntegerGraph:
    """2/4/8-bit weights (packed int4 GEMMs), 3..8-bit activations, FL < 0 and FL > BW, standalone
    ReLU and requantize, max pooling, an unfused add, odd shapes (K and O not tile multiples)."""
    m = GraphMaker((3, 9, 7), F(6, 3), seed)
    h = m.conv("conv1", "input", 5, F(4, 2), F(5, 1))
    h = m.conv("conv2", h, 6, F(2, 1), F(7, -1), relu=False)
    h = m.relu("relu2", h)
    h = m.pool("pool", h)
    a = m.requantize("skip", h, F(4, -2))
    s = m.add("add", h, a, F(5, 0), relu=False)
    h = m.linear("fc1", m.flatten("flat", s), 33, F(3, 1), F(5, 3), relu=True)
    h = m.linear("fc2", h, 20, F(8, 9), F(8, 3), relu=True)
    return m.graph(m.linear("fc3", h, 10, F(8, 7), F(8, 4)))
