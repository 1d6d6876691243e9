"""Property test: random mixed-precision conv → requantize → linear graphs export bit-exactly."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.export.integer_graphs import F, GraphMaker, sample_inputs

from fxquant.export.onnx_qdq import to_qdq
from fxquant.export.qonnx import to_qonnx
from fxquant.export.verify import verify_onnx

bits8 = st.integers(2, 8)
frac = st.integers(-4, 12)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), fmts=st.lists(st.tuples(bits8, frac), min_size=6, max_size=6),
       relu=st.booleans(), channels=st.integers(1, 4))
def test_random_mixed_precision_is_bit_exact(seed: int, fmts: list[tuple[int, int]], relu: bool, channels: int) -> None:
    f_in, f_w, f_conv, f_rq, f_w2, f_out = (F(b, fl) for b, fl in fmts)
    m = GraphMaker((channels, 4, 4), f_in, seed)
    h = m.conv("conv", "input", 3, f_w, f_conv, relu=relu)
    h = m.flatten("flat", m.requantize("rq", h, f_rq, relu=not relu))
    graph = m.graph(m.linear("fc", h, 5, f_w2, f_out))
    x = sample_inputs(graph, n=8, seed=seed, spread=2.0 ** (f_in.bits - 1 - f_in.frac_bits) / 2)
    verify_onnx(to_qdq(graph), graph, x, "qdq")
    verify_onnx(to_qonnx(graph), graph, x, "qonnx")
