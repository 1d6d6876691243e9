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


def vision_net(seed: int = 0) -> IntegerGraph:
    """Every vision-zoo op the CUDA kernels build, chained: 1x1 expand -> ReLU6 (clamp) -> depthwise
    3x3 -> squeeze-excitation (global 8x8 average, 1x1 convs, sigmoid table, broadcast mul) ->
    ceil-mode 3x3/2 max pool -> nearest upsampling x2 -> cat with the expand output (mixed formats)
    -> padded 3x3/2 average (a divisor of 9) -> channel shuffle (reshape, transpose, reshape) ->
    grouped 2x2/2 transposed conv -> dilated max pool -> 2x3 average (6) -> flatten -> linear."""
    from tests.conformance.zoo import GraphMaker as ZooMaker

    m = ZooMaker((4, 8, 8), F(8, 4), seed)
    e = m.conv_general("expand", "input", 8, F(6, 5), F(8, 4), kernel=(1, 1))
    e = m.clamp("relu6", e, F(8, 4), 0.0, 6.0)
    d = m.conv_general("dw", e, 8, F(6, 5), F(8, 3), kernel=(3, 3), padding=(1, 1), groups=8)
    g = m.pool_ceil("squeeze", d, "avgpool2d", kernel=(8, 8), stride=(8, 8), out_fmt=F(8, 5))
    g = m.conv_general("se.reduce", g, 4, F(6, 5), F(8, 4), kernel=(1, 1), relu=True)
    g = m.conv_general("se.expand", g, 8, F(6, 5), F(8, 4), kernel=(1, 1))
    g = m.lut("se.gate", g, "sigmoid", F(8, 7))
    x = m.mul("se.excite", d, g, F(8, 4))
    p = m.pool_ceil("pool", x, "maxpool2d", kernel=(3, 3), stride=(2, 2), ceil_mode=True)   # 8x8 -> 4x4
    u = m.upsample("up", p, (2, 2))
    c = m.cat("cat", (u, e), F(7, 3))                                                      # 16 x 8 x 8
    a = m.pool_ceil("avg", c, "avgpool2d", kernel=(3, 3), stride=(2, 2), padding=(1, 1), out_fmt=F(8, 4))
    s = m.reshape("shuffle.split", a, (2, 8, 16))
    s = m.transpose("shuffle.swap", s, (1, 0, 2))
    s = m.reshape("shuffle.merge", s, (16, 4, 4))
    t = m.conv_transpose("deconv", s, 8, F(5, 4), F(8, 3), kernel=(2, 2), stride=(2, 2), groups=2, relu=True)
    t = m.pool_ceil("dilated", t, "maxpool2d", kernel=(2, 2), stride=(2, 2), dilation=(2, 2))  # 8x8 -> 3x3
    t = m.pool_ceil("avg6", t, "avgpool2d", kernel=(2, 3), stride=(1, 1), out_fmt=F(8, 4))
    return m.graph(m.linear("fc", m.flatten("flat", t), 10, F(8, 7), F(8, 2)))


def linear_on_matrix(seed: int = 0) -> IntegerGraph:
    """A ``linear`` over the last axis of a [4, 6] matrix: the token-wise GEMM (rows = (sample, token))."""
    m = GraphMaker((4, 6), F(8, 4), seed)
    m._op("fc", "linear", ("input",), (4, 3), F(8, 2), weight=m._rand(F(6, 5), (3, 6)), weight_fmt=F(6, 5),
          attrs={"relu": False})
    return m.graph("fc")
