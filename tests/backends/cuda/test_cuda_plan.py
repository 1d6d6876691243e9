"""Launch planning: fusion, weight packing, int32 bounds and unsupported graphs (no GPU, no nvcc)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.backends.cuda.cuda_graphs import F, GraphMaker, linear_on_matrix, mixed_net, residual_net, vision_net
from tests.export.integer_graphs import matmul_graph

from fxquant.backends.cuda.plan import (CatSpec, DirectConvSpec, GemmSpec, LutSpec, MatmulSpec, MulSpec, PoolSpec, pack_weight,
                                        plan_graph, unpack_weight)
from fxquant.backends.cuda.target import CudaTarget
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
    (gemm,) = [k for k in plan_graph(linear_on_matrix()).kernels.values() if isinstance(k, GemmSpec) and not k.large]
    assert (gemm.tokens, gemm.in_shape, gemm.out_shape) == ((4,), (4, 6), (4, 3))  # token-wise: rows (sample, token)
    plan = plan_graph(matmul_graph())  # two activations: the reduction kernel, one thread per output
    (spec,) = [k for k in plan.kernels.values() if isinstance(k, MatmulSpec)]
    assert (spec.a_shape, spec.b_shape, spec.shape, spec.rq.shift) == ((4, 4), (4, 4), (4, 4), -6)
    m = GraphMaker((4,), F(12, 4))
    with pytest.raises(UnsupportedOpError, match=r"fc \(linear\): 12-bit input; this target holds 2-8-bit activations "
                                                 r"for linear \(input 'input'"):
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


def test_vision_ops_have_one_launch_or_view() -> None:
    graph = vision_net()
    plan = plan_graph(graph)
    covered = [op for launch in plan.launches for op in launch.ops] + list(plan.views)
    assert sorted(covered) == sorted(op.name for op in graph.ops)
    assert set(plan.views) == {"shuffle.split", "shuffle.merge", "flat"}
    kinds = {launch.ops[0]: plan.kernels[launch.kernel] for launch in plan.launches if launch.ops}
    assert isinstance(kinds["dw"], DirectConvSpec) and not kinds["dw"].transpose and kinds["dw"].groups == 8
    assert isinstance(kinds["deconv"], DirectConvSpec) and kinds["deconv"].transpose
    assert isinstance(kinds["expand"], GemmSpec)  # groups=1 convs stay on the dp4a GEMM
    assert isinstance(kinds["se.excite"], MulSpec) and kinds["se.excite"].b_shape == (8, 1, 1)
    assert isinstance(kinds["cat"], CatSpec) and kinds["cat"].dim == 0
    assert [rq.shift for rq in kinds["cat"].rqs] == [-1, -1]  # <8,4> -> <7,3>
    assert isinstance(kinds["se.gate"], LutSpec) and plan.params["se.gate.table"].shape == (256,)
    np.testing.assert_array_equal(plan.params["se.gate.table"], graph.ops[6].attrs["table"])
    # grouped weights as they are: [O, C/g, kh, kw] and the transposed conv's [C, O/g, kh, kw]
    assert plan.params["dw.weight"].shape == (8, 1, 3, 3) and plan.params["deconv.weight"].shape == (16, 4, 2, 2)


def test_a_grouped_conv_is_never_fused_with_an_add() -> None:
    from tests.conformance.zoo import GraphMaker as ZooMaker

    m = ZooMaker((4, 5, 5), F(8, 4))
    h = m.conv_general("dw", "input", 4, F(6, 5), F(8, 4), kernel=(3, 3), padding=(1, 1), groups=4)
    plan = plan_graph(m.graph(m.add("add", h, "input", F(8, 4), relu=False)))
    assert [launch.ops for launch in plan.launches[1:]] == [("dw",), ("add",)]


def test_average_divisors_by_hand() -> None:
    """A 2x2/2 ceil-mode average on 3x3: windows of 2x2, 2x1, 1x2 and 1x1 cells (no padding)."""
    from tests.conformance.zoo import GraphMaker as ZooMaker

    m = ZooMaker((1, 3, 3), F(8, 4))
    graph = m.graph(m.pool_ceil("avg", "input", "avgpool2d", kernel=(2, 2), stride=(2, 2), ceil_mode=True,
                                out_fmt=F(8, 4)))
    (spec,) = [k for k in plan_graph(graph).kernels.values() if isinstance(k, PoolSpec)]
    assert spec.out_hw == (2, 2)
    assert [(d, m_, rq.shift) for d, m_, rq in spec.divisors] == [(1, 1, 0), (2, 1, -1), (4, 1, -2)]
    m = ZooMaker((1, 6, 6), F(8, 3))
    graph = m.graph(m.pool_ceil("avg", "input", "avgpool2d", kernel=(3, 3), stride=(3, 3), out_fmt=F(8, 3)))
    (spec,) = [k for k in plan_graph(graph).kernels.values() if isinstance(k, PoolSpec)]
    # 9 cells: M = round(2^(14+3) / 9) = 14564 at FL + 17
    assert [(d, m_, rq.shift) for d, m_, rq in spec.divisors] == [(9, 14564, -17)]


def test_check_refuses_what_the_kernels_lack() -> None:
    from tests.conformance.zoo import GraphMaker as ZooMaker

    m = ZooMaker((2, 3, 3), F(8, 4))
    row = m.linear("row", m.flatten("flat", "input"), 3, F(6, 5), F(8, 4))
    graph = m.graph(m._op("mul", "mul", ("input", row), (2, 3, 3), F(8, 4)))  # (2,3,3) x (3,): ranks differ
    m2 = ZooMaker((2, 4, 4), F(8, 4))
    avg = m2.pool_ceil("avg", "input", "avgpool2d", kernel=(2, 2), stride=(1, 1), out_fmt=F(8, 4))
    g2 = m2.graph(avg)
    g2.ops[0].attrs["dilation"] = (2, 2)
    g2.values["avg"] = g2.values["avg"].__class__("avg", (2, 2, 2), F(8, 4))
    m3 = ZooMaker((2, 4, 4), F(8, 4))
    g3 = m3.graph(m3.cat("cat", ("input", "input"), F(8, 4)))
    g3.ops[0].attrs["dim"] = 0
    problems = [p for g in (graph, g2, g3) for p in CudaTarget().check(g)]
    assert [(p.layer, p.kind) for p in problems] == [("mul", "mul"), ("avg", "avgpool2d"), ("cat", "cat")]
    assert "broadcasts size-1 dimensions of inputs of equal rank only" in problems[0].reason
    assert "average pooling with dilation (2, 2)" in problems[1].reason
    assert "cat on the batch dimension" in problems[2].reason
