"""The vision-zoo ops (issue 13) in both ONNX flavours: exact at the width and window extremes,
integer paths where float32 would round, fusion kept, limits refused by ``check``.

The conformance suite runs the zoo cases on both targets; these tests pin what the zoo's 8-bit
cases do not reach: 16-bit products and window sums, 12-bit tables (int16 storage), int16 pools
and upsampling (float ONNX ops) beside the 8-bit ones folded onto the stored integers, the
qonnx package's own executor, and the float baseline's divisors against torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.core.onnx_exec import execute_onnx
from qonnx.util.cleanup import cleanup_model
from tests.conformance.zoo import CASES, F, GraphMaker
from tests.export.integer_graphs import sample_inputs
from tests.export.test_onnx_qdq import optimized_ops

from fxquant.backends.registry import get_target
from fxquant.errors import UnsupportedOpError
from fxquant.export.limits import FLOAT32_EXACT_BOUND, float32_risks
from fxquant.export.onnx_qdq import check_artifact, to_fp32, to_qdq
from fxquant.export.qonnx import lower_quant, to_qonnx
from fxquant.export.verify import session, verify_onnx
from fxquant.integer_graph import IntegerGraph
from fxquant.legality import ceil_adds_window

ZOO = ["clamp_family", "lut_activations", "squeeze_excite", "mobilenet_block", "batchnorm_depthwise",
       "maxpool_ceil", "maxpool_dilated", "avgpool_any", "avgpool_global_7x7", "avgpool_3x3", "channel_shuffle",
       "upsample_nearest", "conv_transpose"]


def exact_both(graph: IntegerGraph, spread: float = 3.0, n: int = 16) -> None:
    """Both flavours pass the ONNX checker and equal ``IntegerGraph.run`` on saturating inputs."""
    x = sample_inputs(graph, n=n, spread=spread)
    for flavour, model in (("qdq", to_qdq(graph)), ("qonnx", to_qonnx(graph))):
        check_artifact(model, flavour)
        assert verify_onnx(model, graph, x, flavour)["mismatches"] == 0, flavour


def node_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("case", ZOO)
def test_qonnx_package_executes_the_zoo_bit_exactly(case: str) -> None:
    graph, inputs = CASES[case].build()
    x = inputs[0][:4]
    model = cleanup_model(ModelWrapper(to_qonnx(graph)), override_inpsize=4)
    out = execute_onnx(model, {model.graph.input[0].name: x})[model.graph.output[0].name]
    fmt = graph.values[graph.outputs[0]].fmt
    np.testing.assert_array_equal(np.ldexp(out.astype(np.float64), fmt.frac_bits),
                                  graph.run(*graph.quantize_inputs(x))[graph.outputs[0]])


def test_16_bit_products_multiply_in_int32_in_qdq_and_are_refused_by_qonnx(tmp_path: Path) -> None:
    """|a b| up to 2^30: float32 would round the product before the requantize. QDQ multiplies the
    int32 integers and requantizes in float64; QONNX (a float32 Mul) refuses, naming the op."""
    m = GraphMaker((3, 4, 4), F(16, 10), seed=3)
    gate = m.pool_ceil("gate", m.requantize("g16", "input", F(16, 12)), "avgpool2d", kernel=(4, 4), stride=(4, 4),
                       out_fmt=F(16, 14))
    graph = m.graph(m.mul("excite", "input", gate, F(16, 11), relu=True))
    assert graph.accumulator_bound(graph.ops[-1]) > FLOAT32_EXACT_BOUND
    model = to_qdq(graph)
    assert verify_onnx(model, graph, sample_inputs(graph, spread=40.0), "qdq")["mismatches"] == 0
    assert "excite" in float32_risks(graph) and "excite" not in onnx_risks(model)  # not computed in float32
    casts = [n for n in model.graph.node if n.op_type == "Cast" and n.name.startswith(("input_i32", "gate_i32"))]
    assert {onnx.helper.get_attribute_value(a) for n in casts for a in n.attribute} == {onnx.TensorProto.INT32}
    assert ("", "Mul") in optimized_ops(model, tmp_path)
    problems = get_target("qonnx").check(graph)
    assert [(p.layer, p.kind) for p in problems] == [("excite", "mul")]
    assert "beyond float32's exact 2^24" in problems[0].reason
    assert get_target("onnx-qdq").check(graph) == []


def onnx_risks(model: onnx.ModelProto) -> list[str]:
    import json

    from fxquant.export.onnx_builder import META_FLOAT32_RISKS

    return json.loads({p.key: p.value for p in model.metadata_props}[META_FLOAT32_RISKS])


def test_8_bit_gates_fuse_to_qlinearmul(tmp_path: Path) -> None:
    graph, _ = CASES["squeeze_excite"].build()
    ops = {op for _, op in optimized_ops(to_qdq(graph), tmp_path)}
    assert {"QLinearMul", "QLinearConv", "QLinearAveragePool", "Gather"} <= ops
    assert not ops & {"Mul", "Conv", "AveragePool"}, ops


@pytest.mark.parametrize(("bits", "kernel", "stride", "padding", "ceil"), [
    (16, (7, 7), (7, 7), (0, 0), False),   # a global 7x7 of 16-bit integers: sum * M beyond 2^24
    (16, (3, 3), (2, 2), (1, 1), True),    # padding counted, ceil-mode edge windows of 6 and 4 cells
    (12, (5, 5), (3, 3), (2, 2), True),
    (8, (2, 3), (1, 2), (1, 1), False),
    (3, (4, 4), (2, 2), (2, 1), True),     # a power-of-two window with padding: the reciprocal path too
])
def test_any_average_window_is_exact(bits: int, kernel, stride, padding, ceil) -> None:
    m = GraphMaker((2, 9, 8), F(bits, bits - 3), seed=bits)
    graph = m.graph(m.pool_ceil("avg", "input", "avgpool2d", kernel=kernel, stride=stride, padding=padding,
                                ceil_mode=ceil, out_fmt=F(bits, bits - 2)))
    exact_both(graph, spread=6.0)
    assert float32_risks(graph) == []  # the sums stay below 2^24, the multiply by M is float64
    assert "AveragePool" not in node_types(to_qdq(graph))


def test_window_sums_beyond_float32_are_refused() -> None:
    m = GraphMaker((1, 23, 23), F(16, 4), seed=1)
    graph = m.graph(m.pool_ceil("avg", "input", "avgpool2d", kernel=(23, 23), stride=(23, 23), out_fmt=F(16, 4)))
    for name in ("onnx-qdq", "qonnx"):
        (problem,) = get_target(name).check(graph)
        assert (problem.layer, problem.kind) == ("avg", "avgpool2d")
        assert f"sum can reach {529 << 15}, beyond float32's exact 2^24" in problem.reason
    with pytest.raises(UnsupportedOpError, match=r"avg \(avgpool2d\): average window sum"):
        to_qdq(graph)


def test_power_of_two_windows_keep_one_averagepool() -> None:
    m = GraphMaker((2, 8, 8), F(8, 3), seed=2)
    graph = m.graph(m.pool_ceil("avg", "input", "avgpool2d", kernel=(2, 2), stride=(2, 2), ceil_mode=True,
                                out_fmt=F(8, 4)))  # ceil mode without an edge window
    assert node_types(to_qdq(graph)).count("AveragePool") == 1
    assert node_types(to_qonnx(graph)).count("AveragePool") == 1
    exact_both(graph)


@pytest.mark.parametrize("bits", [8, 12])
def test_dilated_ceil_mode_max_pools(bits: int) -> None:
    """8 bits: MaxPool on the stored uint8 integers (folded); 12 bits (int16): a float MaxPool."""
    m = GraphMaker((2, 10, 9), F(bits, 3), seed=bits)
    h = m.pool_ceil("a", "input", "maxpool2d", kernel=(3, 2), stride=(2, 2), padding=(1, 1), dilation=(2, 3),
                    ceil_mode=True)
    graph = m.graph(m.pool_ceil("b", h, "maxpool2d", kernel=(2, 2), stride=(2, 2), ceil_mode=True))
    assert all(ceil_adds_window(graph, op) for op in graph.ops)  # both have a partial edge window
    exact_both(graph, spread=20.0)
    model = onnx.shape_inference.infer_shapes(to_qdq(graph))
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.value_info, *model.graph.input]}
    pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
    assert [types[p.input[0]] for p in pools] == [onnx.TensorProto.UINT8 if bits == 8 else onnx.TensorProto.FLOAT] * 2


@pytest.mark.parametrize(("in_fmt", "out_fmt"), [(F(12, 8), F(8, 4)), (F(3, 1), F(16, 12)), (F(8, 5), F(2, 1))])
def test_tables_are_integer_gathers(in_fmt, out_fmt) -> None:
    """12-bit inputs (int16 storage, 4096 entries), 3-bit ones, a 16-bit table: ``Cast → Add →
    Gather`` on the integers in QDQ, no function evaluated in float in either flavour."""
    m = GraphMaker((2, 5, 5), in_fmt, seed=in_fmt.bits)
    graph = m.graph(m.lut("silu", "input", "silu", out_fmt))
    exact_both(graph, spread=2.0 ** (in_fmt.bits - in_fmt.frac_bits))
    model = to_qdq(graph)
    (table,) = [t for t in model.graph.initializer if t.name.startswith("silu.table")]
    assert list(table.dims) == [1 << in_fmt.bits]
    assert set(node_types(model)) <= {"QuantizeLinear", "Clip", "Cast", "Add", "Gather", "DequantizeLinear"}
    assert node_types(model).count("Gather") == 1
    assert not {"Sigmoid", "Exp", "Tanh", "Div"} & set(node_types(to_qonnx(graph)))


def test_clamp_bounds_and_their_refusal() -> None:
    m = GraphMaker((3, 4, 4), F(12, 6), seed=5)
    a = m.clamp("relu6", "input", F(12, 8), 0.0, 6.0)             # int16 storage: float Clip between Q/DQ
    b = m.clamp("hardtanh", "input", F(5, 2), -1.0, 1.0)          # requantize, then clip
    graph = m.graph(m.cat("cat", (m.clamp("low", a, F(8, 4), -0.5, None), b), F(8, 3)))
    exact_both(graph, spread=8.0)
    graph.ops[0].attrs.update(lo=5000, hi=4000)
    for name in ("onnx-qdq", "qonnx"):
        (problem,) = get_target(name).check(graph)
        assert (problem.layer, problem.kind) == ("relu6", "clamp")
        assert "leave the output format <12,8>" in problem.reason


@pytest.mark.parametrize("bits", [8, 12])
def test_nearest_upsampling_and_transposes(bits: int) -> None:
    m = GraphMaker((2, 3, 4), F(bits, 3), seed=bits)
    h = m.upsample("up", "input", (3, 2))
    h = m.transpose("t", h, (2, 0, 1))
    graph = m.graph(m.transpose("t2", m.reshape("r", h, (4, 9, 4)), (1, 2, 0)))
    exact_both(graph, spread=30.0)
    model = to_qdq(graph)
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    (resize,) = [n for n in model.graph.node if n.op_type == "Resize"]
    assert (producers[resize.input[0]] == "DequantizeLinear") == (bits > 8)  # 8 bits: on the uint8 integers
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and producers[n.input[0]] == "DequantizeLinear"]


def test_conv_transpose_with_full_range_weights_and_its_float32_limit() -> None:
    m = GraphMaker((4, 3, 3), F(8, 4), seed=7)
    h = m.conv_transpose("up", "input", 6, F(8, 7), F(8, 3), kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                         output_padding=(1, 1), dilation=(1, 1), relu=True)
    graph = m.graph(m.conv_transpose("up_g", h, 4, F(4, 3), F(8, 2), kernel=(2, 3), stride=(2, 1), padding=(0, 1),
                                     dilation=(2, 1), groups=2, bias=False))
    graph.ops[0].weight[0, 0] = -128  # a weight that needs all 8 bits
    exact_both(graph, spread=10.0)
    wide = GraphMaker((64, 2, 2), F(16, 8), seed=8)
    wide_graph = wide.graph(wide.conv_transpose("up", "input", 2, F(16, 14), F(16, 4), kernel=(3, 3), bias=False))
    for name in ("onnx-qdq", "qonnx"):
        (problem,) = get_target(name).check(wide_graph)
        assert (problem.layer, problem.kind) == ("up", "conv_transpose2d")
        assert "ONNX ConvTranspose has no integer form" in problem.reason


def test_fp32_baseline_divides_like_torch() -> None:
    """The float baseline's average pools use torch's divisors (count_include_pad, ceil mode)."""
    graph, _ = CASES["avgpool_any"].build()
    model = to_fp32(graph)
    check_artifact(model, "fp32")
    x = sample_inputs(graph, n=4)
    pools = [op for op in graph.ops]
    y = torch.from_numpy(x).double()
    for op in pools:
        y = torch.nn.functional.avg_pool2d(y, op.attrs["kernel"], op.attrs["stride"], op.attrs.get("padding", 0),
                                           ceil_mode=bool(op.attrs.get("ceil_mode")), count_include_pad=True)
    (out,) = session(model).run(None, {"input": x})
    np.testing.assert_allclose(out, y.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ZOO)
def test_fp32_baseline_builds_the_zoo(case: str) -> None:
    graph, inputs = CASES[case].build()
    model = to_fp32(graph)
    check_artifact(model, case)
    assert not {"QuantizeLinear", "DequantizeLinear"} & set(node_types(model))
    report = verify_onnx(model, graph, inputs[0], "fp32")
    assert report["n"] == inputs[0].shape[0]


@pytest.mark.parametrize("out_fmt", [F(8, 7), F(8, 3), F(4, 0), F(8, -2), F(6, 10), F(12, 5)])
@pytest.mark.parametrize("relu", [False, True])
def test_every_8_bit_product_requantizes_exactly(out_fmt, relu: bool) -> None:
    """All 256 x 256 products of two 8-bit activations (``(256, 1) x (1, 256)`` broadcast), as
    onnxruntime fuses them (QLinearMul) and as QONNX's float Mul computes them."""
    from fxquant.integer_graph import Op, Value

    a, b = Value("a", (256, 1), F(8, 4)), Value("b", (1, 256), F(8, 3))
    out = Value("y", (256, 256), out_fmt)
    graph = IntegerGraph([a, b], [Op("y", "mul", ("a", "b"), "y", out_fmt, attrs={"relu": relu})], ["y"],
                         {"a": a, "b": b, "y": out})
    ks = np.arange(-128, 128, dtype=np.int64)
    ka, kb = ks.reshape(1, 256, 1), ks.reshape(1, 1, 256)
    want = graph.run(ka, kb)["y"]
    feed = {"a": np.ldexp(ka, -4).astype(np.float32), "b": np.ldexp(kb, -3).astype(np.float32)}
    for flavour, model in (("qdq", to_qdq(graph)), ("qonnx", to_qonnx(graph))):
        runnable = model if flavour == "qdq" else lower_quant(model)
        (got,) = session(runnable).run(["y"], feed)
        np.testing.assert_array_equal(np.ldexp(got.astype(np.float64), out_fmt.frac_bits), want, err_msg=flavour)


@pytest.mark.parametrize(("channels", "w_fmt", "stride", "padding", "output_padding", "dilation", "groups"), [
    (256, F(8, 7), (2, 2), (1, 1), (1, 1), (1, 1), 1),   # 8-bit weights: one ConvInteger
    (64, F(12, 10), (2, 1), (0, 2), (1, 0), (1, 2), 2),  # split 12-bit weights, grouped, dilated
    (384, F(8, 6), (3, 2), (3, 0), (0, 1), (1, 1), 2),   # padding beyond d(k-1): the zero-inserted input is cropped
])
def test_conv_transpose_beyond_float32_runs_as_convinteger(channels, w_fmt, stride, padding, output_padding, dilation,
                                                           groups, tmp_path: Path) -> None:
    m = GraphMaker((channels, 3, 4), F(8, 4), seed=groups)
    graph = m.graph(m.conv_transpose("up", "input", 8, w_fmt, F(16, 2), kernel=(3, 2), stride=stride,
                                     padding=padding, output_padding=output_padding, dilation=dilation,
                                     groups=groups, relu=groups == 2))
    op = graph.ops[0]
    op.weight = np.where(m.rng.random(op.weight.shape) < 0.5, w_fmt.qmin, w_fmt.qmax)  # bound far beyond 2^24
    assert graph.accumulator_bound(op) > FLOAT32_EXACT_BOUND
    model = to_qdq(graph)
    assert "ConvTranspose" not in node_types(model) and ("", "ConvInteger") in optimized_ops(model, tmp_path)
    assert onnx_risks(model) == []
    assert verify_onnx(model, graph, sample_inputs(graph, spread=40.0), "qdq")["mismatches"] == 0
    (problem,) = get_target("qonnx").check(graph)
    assert "ONNX ConvTranspose has no integer form" in problem.reason


def test_output_padding_beyond_the_stride() -> None:
    """torch allows ``output_padding < max(stride, dilation)``, onnxruntime ``< stride``: within the
    padding it becomes a smaller end pad (exact); beyond it ``check`` refuses, naming the rule."""
    m = GraphMaker((2, 4, 5), F(8, 3), seed=11)
    graph = m.graph(m.conv_transpose("up", "input", 2, F(6, 5), F(8, 2), kernel=(3, 2), stride=(1, 1), padding=(2, 1),
                                     output_padding=(1, 1), dilation=(2, 2)))
    exact_both(graph)
    graph.ops[0].attrs["padding"] = (0, 1)
    for name in ("onnx-qdq", "qonnx"):
        (problem,) = get_target(name).check(graph)
        assert "ONNX ConvTranspose takes output_padding < stride" in problem.reason
