"""Launch planning: fusion, weight packing, int32 bounds and unsupported graphs (no GPU, no nvcc)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.backends.cuda.cuda_graphs import F, GraphMaker, mixed_net, residual_net
from tests.export.integer_graphs import matmul_graph

from fxquant.backends.cuda.plan import GemmSpec, pack_weight, plan_graph, unpack_weight
from fxquant.errors import UnsupportedOpError


def test_residual_adds_are_fused_into_a_gemm_epilogue() -> None:
    plan = plan_graph(residual_net())
    fused = [launch.ops for launch in plan.launches if len(launch.ops) == 2]
    assert fused == [("b.conv2", "b.add"), ("c.conv", "c.add")]
    assert not any(name.startswith("fxq_eltwise") for name in plan.kernels)
    assert plan.views == {"flat": ("avgpool", (216,))}


def test_every_op_has_one_launch_or_view() -> None:
    graph = mixed_net()
    plan = plan_graph(graph)
    covered = [op for launch in plan.launches for op in launch.ops] + list(plan.views)
    assert sorted(covered) == sorted(op.name for op in graph.ops)
    assert plan.launches[0].args == ("float:input",)


def test_low_bit_weights_are_packed_two_per_byte() -> None:
    plan = plan_graph(mixed_net())
    assert plan.params["conv1.weight"].dtype == np.uint8
    assert plan.params["fc2.weight"].dtype == np.int8
    spec = GemmSpec(5, 1, 1, 7, linear=True, weight_bits=4)
    w = np.random.default_rng(0).integers(-8, 8, size=(7, 5))
    packed = pack_weight(w, spec)
    assert packed.shape == (16, 8)
    # byte = nib(w[o, 2j]) | nib(w[o, 2j+1]) << 4 with nib = two's complement nibble, by hand:
    pair = pack_weight(np.array([[1, -1, -8, 7]]), GemmSpec(4, 1, 1, 1, linear=True, weight_bits=4))
    assert pair[0, :2].tolist() == [0x01 | 0xF0, 0x08 | 0x70] and not pair[0, 2:].any()
    np.testing.assert_array_equal(unpack_weight(packed)[:7, :5], w)
    assert not unpack_weight(packed)[7:].any() and not unpack_weight(packed)[:, 5:].any()


def test_equal_layers_share_a_kernel() -> None:
    m = GraphMaker((8, 6, 6), F(8, 4))
    h = m.conv("c1", "input", 8, F(8, 7), F(8, 4))
    h = m.conv("c2", h, 8, F(8, 7), F(8, 4))
    plan = plan_graph(m.graph(h))
    assert len(plan.kernels) == 2 and plan.launches[1].kernel == plan.launches[2].kernel


def test_unsupported_graphs_are_named() -> None:
    with pytest.raises(UnsupportedOpError, match="matmul"):
        plan_graph(matmul_graph())
    m = GraphMaker((4,), F(12, 4))
    with pytest.raises(UnsupportedOpError, match="input"):
        plan_graph(m.graph(m.linear("fc", "input", 4, F(8, 7), F(8, 2))))


def test_accumulator_beyond_int32_is_refused() -> None:
    m = GraphMaker((1, 2, 2), F(8, 4))
    graph = m.graph(m.conv("c", "input", 1, F(8, 7), F(8, 4), k=1, pad=0))
    graph.ops[0].bias = np.array([2**31 - 1])
    with pytest.raises(UnsupportedOpError, match="int32"):
        plan_graph(graph)


def test_wide_weights_are_refused() -> None:
    """dp4a multiplies int8: 12-bit weights are refused by check, never cast."""
    m = GraphMaker((4,), F(8, 4))
    with pytest.raises(UnsupportedOpError, match="12-bit weights; this target holds 2-8 bits"):
        plan_graph(m.graph(m.linear("fc", "input", 4, F(12, 7), F(8, 2))))


def test_linear_layers_get_a_large_batch_variant() -> None:
    plan = plan_graph(mixed_net())
    fc1 = next(launch for launch in plan.launches if launch.ops == ("fc1",))
    small, large = plan.kernels[fc1.kernel], plan.kernels[fc1.kernel_large]
    assert (small.m_tile, large.m_tile) == (16, 64) and fc1.kernel_large.startswith("fxq_linear_int4_large")
    assert all(launch.kernel_large is None for launch in plan.launches if launch.ops == ("conv1",))
