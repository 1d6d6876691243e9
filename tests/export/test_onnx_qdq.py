"""QDQ and fp32 export: ONNX validity, bit-exactness against IntegerGraph.run, ORT fusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from tests.export.integer_graphs import (F, GraphMaker, cnn, matmul_graph, mixed, mlp, reshaped, residual,
                                        sample_inputs)

from fxquant.errors import ExportError, UnsupportedOpError, UsageError
from fxquant.export.onnx_builder import META_PRECISION_MAP, META_VALUE_FORMATS
from fxquant.export.onnx_qdq import check_artifact, qdq_problems, to_fp32, to_qdq
from fxquant.export.qonnx import to_qonnx
from fxquant.export.onnx_builder import float32_risks
from fxquant.export.verify import session, verify_onnx

GRAPHS = {"mlp": mlp, "cnn": cnn, "residual": residual, "mixed": mixed, "matmul": matmul_graph,
          "reshaped": reshaped}
FLOAT_COMPUTE = {"Conv", "Gemm", "MatMul", "Add", "Sum", "AveragePool"}


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[tuple[str, str]]:
    path = tmp_path / "optimized.onnx"
    session(model, optimized_path=str(path))
    return [(n.domain, n.op_type) for n in onnx.load(path).graph.node]


@pytest.mark.parametrize("name", GRAPHS)
def test_qdq_is_valid_and_bit_exact(name: str) -> None:
    graph = GRAPHS[name]()
    model = to_qdq(graph)
    check_artifact(model, name)
    x = sample_inputs(graph)
    (out,) = session(model).run(None, {"input": x})
    k = out.astype(np.float64) * 2.0 ** graph.values[graph.outputs[0]].fmt.frac_bits
    np.testing.assert_array_equal(k, graph.run(*graph.quantize_inputs(x))[graph.outputs[0]])
    assert verify_onnx(model, graph, x, "qdq")["mismatches"] == 0


@pytest.mark.parametrize("name", ["mlp", "cnn", "residual", "matmul", "reshaped"])
def test_ort_fuses_every_float_compute_op(name: str, tmp_path: Path) -> None:
    ops = optimized_ops(to_qdq(GRAPHS[name]()), tmp_path)
    assert not [op for domain, op in ops if domain == "" and op in FLOAT_COMPUTE], ops
    fused = {op for _, op in ops}
    expected = {"mlp": {"QGemm"}, "cnn": {"QLinearConv", "QGemm"},
                "residual": {"QLinearConv", "QLinearAdd", "QLinearAveragePool", "QGemm"},
                "matmul": {"QLinearMatMul"}, "reshaped": {"QLinearConv", "QLinearAdd", "Reshape", "QGemm"}}[name]
    assert expected <= fused
    if name != "matmul":  # its standalone requantize op stays DequantizeLinear → QuantizeLinear
        # no float island at all: one QuantizeLinear at the input, one DequantizeLinear at the output
        assert [op for _, op in ops].count("QuantizeLinear") == 1 == [op for _, op in ops].count("DequantizeLinear")


def test_reshape_and_mul_pow2_act_on_the_stored_integers() -> None:
    """``mul_pow2`` is no node at all (the integers are read again at the new scale); ``reshape``
    acts on the integers (folded like Flatten), never between a DequantizeLinear and a QuantizeLinear."""
    model = to_qdq(reshaped())
    producers = {o: n for n in model.graph.node for o in n.output}
    assert not [n for n in model.graph.node if n.op_type == "Mul"]
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    assert len(reshapes) == 2 and all(producers[n.input[0]].op_type != "DequantizeLinear" for n in reshapes)
    shapes = sorted(onnx.numpy_helper.to_array(t).tolist() for t in model.graph.initializer
                    if t.name.startswith(("view.shape", "vec.shape")))
    assert shapes == [[0, 8, 8], [0, 64]]  # batch copied (0), the rest as the graph says
    # the conv output integers are read at two scales: 2^-3 (conv2, as conv) and 2^-1 (conv.alpha = 4·conv)
    conv2 = next(n for n in model.graph.node if n.op_type == "Conv" and n.output[0] == "conv2")
    conv_int = producers[conv2.input[0]].input[0]  # conv2 reads the conv integers through a DequantizeLinear
    scales = sorted(float(onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == n.input[1])))
                    for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == conv_int)
    assert scales == [2.0 ** -3, 2.0 ** -1]


def test_int16_values_stay_float_in_ort(tmp_path: Path) -> None:
    """onnxruntime has no 16-bit QLinear kernels: the 12-bit fc2 of ``mixed`` stays a float Gemm."""
    ops = optimized_ops(to_qdq(mixed()), tmp_path)
    assert [op for domain, op in ops if domain == "" and op in FLOAT_COMPUTE] == ["Gemm"]


def test_narrow_range_saturates_like_the_reference() -> None:
    m = GraphMaker((32,), F(3, 1))
    graph = m.graph(m.linear("fc", "input", 8, F(7, 4), F(2, 0), relu=False))
    x = sample_inputs(graph, spread=10.0)
    verify_onnx(to_qdq(graph), graph, x, "qdq")
    out = graph.run(*graph.quantize_inputs(x))["fc"]
    assert out.min() == -2 and out.max() == 1  # the 2-bit range is reached on both ends


def test_int4_weights_halve_the_initializer() -> None:
    m = GraphMaker((256,), F(8, 4))
    graph = m.graph(m.linear("fc", "input", 64, F(4, 3), F(8, 0), bias=False))
    small, wide = to_qdq(graph), to_qdq(graph, opset=20)
    (w4,) = [t for t in small.graph.initializer if t.name.startswith("fc.weight")]
    assert w4.data_type == onnx.TensorProto.INT4 and len(w4.raw_data) == 64 * 256 // 2
    assert small.ByteSize() < wide.ByteSize() - 64 * 256 // 2 + 200
    verify_onnx(small, graph, sample_inputs(graph), "qdq")


def test_metadata_carries_the_precision_map() -> None:
    graph = mixed()
    props = {p.key: p.value for p in to_qdq(graph).metadata_props}
    assert json.loads(props[META_PRECISION_MAP]) == graph.layers
    formats = json.loads(props[META_VALUE_FORMATS])
    assert formats["conv2"] == {"bits": 7, "frac_bits": -1, "shape": [6, 8, 8]}


def test_int8_zero_point_form_is_valid() -> None:
    graph = cnn(act=F(7, 3))
    model = to_qdq(graph, ort_x86=False)
    check_artifact(model, "cnn")
    zero_points = {onnx.numpy_helper.to_array(t).dtype for t in model.graph.initializer if t.name.startswith("zero")}
    assert zero_points <= {np.dtype(np.int8), np.dtype(np.int32)}


def _x86_without_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and "vnni" not in flags


@pytest.mark.skipif(not _x86_without_vnni(), reason="MLAS U8S8 saturation happens on x86 without VNNI only")
def test_int8_weights_saturate_in_mlas_u8s8_on_avx2() -> None:
    """The reason for ``ort_x86``: 8-bit weights in int8 hit vpmaddubsw's int16 saturation."""
    m = GraphMaker((64,), F(8, 4))
    graph = m.graph(m.linear("fc", "input", 16, F(8, 7), F(8, 2)))
    x = sample_inputs(graph, n=64)
    verify_onnx(to_qdq(graph), graph, x, "qdq")
    with pytest.raises(ExportError, match="'fc' differs .* at sample"):
        verify_onnx(to_qdq(graph, ort_x86=False), graph, x, "qdq")


def float_network(graph, x: np.ndarray) -> np.ndarray:
    """The graph as a float64 network (weights ``w * 2^-FL_w``, no quantizers), written with torch
    ops here, independently of the exporter."""
    import torch
    import torch.nn.functional as fn

    env = {graph.inputs[0].name: torch.from_numpy(x.astype(np.float64))}
    for op in graph.ops:
        xs = [env[i] for i in op.inputs]
        if op.kind in ("conv2d", "linear"):
            w = torch.from_numpy(op.weight * 2.0 ** -op.weight_fmt.frac_bits)
            fl_acc = graph.values[op.inputs[0]].fmt.frac_bits + op.weight_fmt.frac_bits
            b = None if op.bias is None else torch.from_numpy(op.bias * 2.0 ** -fl_acc)
            y = (fn.conv2d(xs[0], w, b, stride=op.attrs.get("stride", 1), padding=op.attrs.get("padding", 0))
                 if op.kind == "conv2d" else fn.linear(xs[0], w, b))
        elif op.kind == "matmul":
            y = xs[0] @ xs[1]
        elif op.kind == "add":
            y = sum(xs)
        elif op.kind == "cat":
            y = torch.cat(xs, dim=op.attrs["dim"])
        elif op.kind in ("avgpool2d", "maxpool2d"):
            pool = fn.avg_pool2d if op.kind == "avgpool2d" else fn.max_pool2d
            y = pool(xs[0], op.attrs["kernel"], op.attrs.get("stride", op.attrs["kernel"]),
                     op.attrs.get("padding", 0))
        elif op.kind == "flatten":
            y = xs[0].flatten(1)
        elif op.kind == "reshape":
            y = xs[0].reshape(len(x), *op.attrs["shape"])
        elif op.kind == "mul_pow2":
            y = xs[0] * 2.0 ** op.attrs["exponent"]
        elif op.kind == "relu":
            y = xs[0].relu()
        else:  # requantize: the float network has no quantizers
            y = xs[0]
        env[op.output] = y.relu() if op.attrs.get("relu") else y
    return env[graph.outputs[0]].numpy()


@pytest.mark.parametrize("name", GRAPHS)
def test_fp32_flavour_is_the_float_network(name: str) -> None:
    graph = GRAPHS[name]()
    model = to_fp32(graph)
    check_artifact(model, name)
    assert not {n.op_type for n in model.graph.node} & {"QuantizeLinear", "DequantizeLinear"}
    x = sample_inputs(graph)
    (out,) = session(model).run(None, {"input": x})
    want = float_network(graph, x)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    report = verify_onnx(model, graph, x, "fp32")  # reported, never raises
    assert report["n"] == 16


def test_verify_names_the_mismatching_output_and_sample() -> None:
    graph = mlp()
    model = to_qdq(graph)
    (bias,) = [t for t in model.graph.initializer if t.name.startswith("fc3.bias")]
    tampered = onnx.numpy_helper.to_array(bias).copy()
    tampered[3] += 1 << 12
    bias.CopyFrom(onnx.numpy_helper.from_array(tampered, bias.name))
    with pytest.raises(ExportError, match=r"output 'fc3' differs .* at sample 0"):
        verify_onnx(model, graph, sample_inputs(graph), "qdq")


def test_verify_rejects_bad_inputs() -> None:
    graph = mlp()
    with pytest.raises(UsageError, match="shape"):
        verify_onnx(to_qdq(graph), graph, np.zeros((2, 3), np.float32), "qdq")
    with pytest.raises(UsageError, match="flavour"):
        verify_onnx(to_qdq(graph), graph, sample_inputs(graph), "tflite")


def test_unsupported_graphs_raise() -> None:
    with pytest.raises(UnsupportedOpError, match="fc2 \\(linear\\): 12-bit value 'fc2' needs int16 QuantizeLinear, "
                                                "which opset 13 lacks"):
        to_qdq(mixed(), opset=13)
    m = GraphMaker((1, 24, 24), F(16, 4))
    with pytest.raises(UnsupportedOpError, match=r"avg \(avgpool2d\): average window sum can reach 17334272, "
                                                r"beyond float32's exact 2\^24"):
        to_qdq(m.graph(m.pool("avg", "input", "avgpool2d", 23)))
    # linear on an input of rank > 2 now builds (rows reshaped for Gemm): tests/export/test_onnx_transformer_ops.py
    with pytest.raises(UsageError, match="opset"):
        to_qdq(mlp(), opset=9)


def test_weights_outside_their_format_raise() -> None:
    graph = mlp()
    graph.ops[0].weight = graph.ops[0].weight * 4
    with pytest.raises(UnsupportedOpError, match=r"fc1 \(linear\): weights need 10 bits, more than their 8-bit"):
        to_qdq(graph)


def test_large_accumulators_use_integer_kernels_and_stay_exact() -> None:
    """|acc| > 2^24: QGemm/QLinearConv would requantize float(acc) and round twice (measured: the
    QONNX graph, run in float32, gives 64 instead of 63 here); the QDQ exporter switches to
    MatMulInteger/ConvInteger with a float64 requantization and stays exact."""
    n, target = 4096, 63 * 2**19 + 2**18 - 1  # just below a rounding tie at a 19-bit right shift
    m = GraphMaker((n,), F(8, 0))
    graph = m.graph(m.linear("fc", "input", 1, F(7, 0), F(8, -19)))
    graph.ops[0].weight = np.full((1, n), 63)
    graph.ops[0].bias = np.array([target - 127 * 63 * n])
    x = np.full((1, n), 127.0, np.float32)
    assert graph.run(*graph.quantize_inputs(x))["fc"].item() == 63
    assert float32_risks(graph) == ["fc"] and float32_risks(mlp()) == []
    model = to_qdq(graph)
    assert "MatMulInteger" in {n.op_type for n in model.graph.node}
    assert verify_onnx(model, graph, x, "qdq")["float32_risk_ops"] == []
    with pytest.raises(ExportError) as info:
        verify_onnx(to_qonnx(graph), graph, x, "qonnx")
    assert info.value.hint is not None and "exceed 2^24" in info.value.hint and ": fc" in info.value.hint


def test_integer_conv_path_matches_the_reference(tmp_path: Path) -> None:
    m = GraphMaker((128, 6, 6), F(8, 4))
    h = m.conv("conv", "input", 8, F(8, 7), F(6, 1), relu=True)
    graph = m.graph(m.flatten("flat", m.pool("pool", h)))
    graph.ops[0].weight = np.where(m.rng.random((8, 128, 3, 3)) < 0.5, -128, 127)  # fan-in 1152: bound > 2^24
    assert float32_risks(graph) == ["conv"]
    model = to_qdq(graph)
    check_artifact(model, "conv")
    assert verify_onnx(model, graph, sample_inputs(graph, spread=8.0), "qdq")["mismatches"] == 0
    assert ("", "ConvInteger") in optimized_ops(model, tmp_path)


def test_scales_outside_float32_raise() -> None:
    m = GraphMaker((4,), F(8, 64))
    graph = m.graph(m.linear("fc", "input", 2, F(8, 64), F(8, 60)))  # bias scale 2^-128
    with pytest.raises(UnsupportedOpError, match=r"fc \(linear\): bias scale 2\^-128 is outside the float32 normal"):
        to_qdq(graph)


def test_wide_weights_with_large_accumulators_are_split_and_exact(tmp_path: Path) -> None:
    """12-bit weights on 8-bit inputs, |acc| > 2^24 (here just below a rounding tie, where any
    rounding of float(acc) gives 64): the QDQ exporter sums the two 8-bit halves of each weight
    (hi·256 + lo) with MatMulInteger/ConvInteger in int32 and stays exact."""
    n, target = 4096, 63 * 2**19 + 2**18 - 1  # just below a rounding tie at a 19-bit right shift
    m = GraphMaker((n,), F(8, 0))
    graph = m.graph(m.linear("fc", "input", 1, F(12, 0), F(8, -19)))
    graph.ops[0].weight = np.full((1, n), 2047)
    graph.ops[0].bias = np.array([target - 127 * 2047 * n])
    x = np.full((1, n), 127.0, np.float32)
    assert graph.run(*graph.quantize_inputs(x))["fc"].item() == 63
    model = to_qdq(graph)
    assert [n.op_type for n in model.graph.node].count("MatMulInteger") == 2
    (out,) = session(model).run(None, {"input": x})
    assert out.item() * 2.0 ** -19 == 63
    m = GraphMaker((64, 6, 6), F(8, 4))
    h = m.conv("conv", "input", 8, F(12, 9), F(8, 1), relu=True)
    graph = m.graph(m.flatten("flat", h))
    graph.ops[0].weight = np.where(m.rng.random((8, 64, 3, 3)) < 0.5, -2048, 2047)  # bound > 2^24
    assert float32_risks(graph) == ["conv"]
    model = to_qdq(graph)
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["fxquant.float32_risk_ops"]) == []
    x = sample_inputs(graph, spread=8.0)
    (out,) = session(model).run(None, {"input": x})
    np.testing.assert_array_equal(out.astype(np.float64) * 2.0, graph.run(*graph.quantize_inputs(x))["flat"])
    assert ("", "ConvInteger") in optimized_ops(model, tmp_path)


def test_wide_weights_need_opset_21_unless_split() -> None:
    """12-bit weights are int16 initializers before opset 21 has int16 DequantizeLinear, except on
    the integer path, where they are two uint8 halves."""
    m = GraphMaker((8,), F(8, 4))
    small = m.graph(m.linear("fc", "input", 2, F(12, 10), F(8, 2)))
    (problem,) = qdq_problems(small, opset=17)
    assert (problem.layer, problem.kind) == ("fc", "linear")
    assert "12-bit weights need int16 DequantizeLinear, which opset 17 lacks" in problem.reason
    m = GraphMaker((1024,), F(8, 4))
    big = m.graph(m.linear("fc", "input", 2, F(12, 10), F(8, -8), bias=False))
    big.ops[0].weight = np.full((2, 1024), 2047)  # |acc| beyond 2^24: split halves on ConvInteger/MatMulInteger
    assert qdq_problems(big, opset=17) == []
    assert verify_onnx(to_qdq(big, opset=17), big, sample_inputs(big), "qdq")["mismatches"] == 0


def test_int16_narrow_outputs_saturate_under_full_optimization() -> None:
    """A 9-bit (int16-stored) matmul output beyond its range saturates to qmax = 255: onnxruntime's
    ClipQuantFusion dropped the float ``DQ → Clip → Q`` saturation (found by the random graphs);
    the integer Clip in int32 it cannot drop."""
    m = GraphMaker((2, 2), F(7, 10))
    a = m.relu("a", "input")
    p = m.matmul("p", a, "input", F(5, 20))
    graph = m.graph(m.matmul("out", m.relu("b", p), p, F(9, 40)))
    x = np.full((2, 2, 2), 0.25, np.float32)
    x[0] = -0.25
    assert verify_onnx(to_qdq(graph), graph, x, "qdq")["mismatches"] == 0
    assert np.all(graph.run(*graph.quantize_inputs(x))["out"][1] == 255)  # the saturating sample
