"""Analytic FPGA estimates: weight memory = Σ params·bits, DSP vs LUT multipliers, reuse scaling."""

from __future__ import annotations

import math

import pytest

from fxquant.backends.fpga.estimates import estimate
from fxquant.backends.fpga.plan import plan_graph
from fxquant.integer_graph import IntegerGraph

from tests.backends.fpga.fpga_graphs import GraphBuilder, build_cnn, build_mlp, build_residual, fp


def digits_cnn(bits: int) -> IntegerGraph:
    """A digits-CNN-shaped graph: 1x8x8 -> conv 8 -> pool -> conv 16 -> pool -> linear 10."""
    g = GraphBuilder("input", (1, 8, 8), fp(bits, bits - 1), 0)
    h = g.add("conv1", "conv2d", ("input",), (8, 8, 8), fp(bits, bits - 3), (8, 1, 3, 3), fp(bits, bits - 1),
              bias=True, padding=(1, 1), relu=True)
    h = g.add("pool1", "maxpool2d", (h,), (8, 4, 4), fp(bits, bits - 3), kernel=(2, 2))
    h = g.add("conv2", "conv2d", (h,), (16, 4, 4), fp(bits, bits - 3), (16, 8, 3, 3), fp(bits, bits - 1),
              bias=True, padding=(1, 1), relu=True)
    h = g.add("pool2", "maxpool2d", (h,), (16, 2, 2), fp(bits, bits - 3), kernel=(2, 2))
    h = g.add("flatten", "flatten", (h,), (64,), fp(bits, bits - 3))
    h = g.add("fc", "linear", (h,), (10,), fp(16, 8), (10, 64), fp(bits, bits - 1), bias=True)
    return g.graph(h)


def _est(graph: IntegerGraph, reuse: int = 1, io: str = "parallel") -> dict:
    return estimate(plan_graph(graph), part="xcu250-figd2104-2L-e", clock_ns=5.0, reuse=reuse, io=io)


@pytest.mark.parametrize("build", [build_mlp, build_cnn, build_residual])
def test_weight_memory_is_sum_of_params_times_bits(build) -> None:
    graph, _ = build()
    manual = sum(op.weight.size * op.weight_fmt.bits + (op.bias.size * 32 if op.bias is not None else 0)
                 for op in graph.ops if op.weight is not None)
    est = _est(graph)
    assert est["weight_memory_bits"] == manual == graph.param_bits()


def test_digits_cnn_8bit_maps_multipliers_to_luts() -> None:
    est = _est(digits_cnn(8))
    conv2 = est["layers"][2]
    assert conv2["multipliers"] == 16 * 8 * 9 and conv2["dsp"] == 0 and conv2["lut"] > 0
    assert conv2["ii"] == 16 and conv2["latency_cycles"] == 16 + math.ceil(math.log2(73)) + 3
    assert est["total"]["dsp"] == 0 and est["total"]["bram_18k"] == 0  # reuse 1: weights in logic
    assert est["ii_cycles"] == 64 and est["latency_cycles"] == sum(layer["latency_cycles"] for layer in est["layers"])


def test_wide_multipliers_use_dsps_and_reuse_trades_area_for_time() -> None:
    r1, r8 = _est(digits_cnn(12)), _est(digits_cnn(12), reuse=8)
    assert r1["total"]["dsp"] == sum(layer["multipliers"] for layer in r1["layers"])
    assert [layer["multipliers"] for layer in r8["layers"]] == [math.ceil(layer["multipliers"] / 8) for layer in r1["layers"]]
    assert r8["total"]["dsp"] < r1["total"]["dsp"] / 7 and r8["ii_cycles"] == 8 * r1["ii_cycles"]
    assert r8["weight_memory_bits"] == r1["weight_memory_bits"]


def test_stream_io_adds_the_stream_loops() -> None:
    parallel, stream = _est(digits_cnn(8)), _est(digits_cnn(8), io="stream")
    assert stream["latency_cycles"] == parallel["latency_cycles"] + 64 + 10
    assert stream["estimate"] is True and "utilization_pct" in stream


def test_tables_and_products_are_counted() -> None:
    """A table is a ROM of 2^BW_in x BW_out bits, replicated per parallel lookup; a mul is one
    BW_a x BW_b multiplier per output; a 3x3 average multiplies each channel's sum by m[d]."""
    from tests.backends.fpga.fpga_graphs import build_vision

    graph, _ = build_vision()
    layers = {layer["name"]: layer for layer in _est(graph)["layers"]}
    hswish = layers["hswish"]  # 10-bit input, <7,3> out: 1024 x 7 bits, 36 lookups in dual-port BRAM18
    assert hswish["rom_bits"] == 1024 * 7 and hswish["bram_18k"] == 18 * 1 * 1 and hswish["lut"] == 0
    gate = layers["gate"]  # 6-bit input, 8-bit out: 512 bits, LUT ROM (1 x 8 LUTs per copy, 4 copies)
    assert gate["rom_bits"] == 64 * 8 and gate["lut"] == 4 * 8 and gate["bram_18k"] == 0
    excite = layers["excite"]  # (4,3,3) outputs of <7,3> x <8,8>: fabric multipliers
    assert excite["multipliers"] == 36 and excite["dsp"] == 0 and excite["lut"] == 36 * (7 * 8 + 15 + 8)
    avg = layers["avg"]
    assert avg["multipliers"] == 6 and avg["rom_bits"] > 0
    assert all(layers[k]["lut"] == 0 and layers[k]["latency_cycles"] == 0 for k in ("split", "shuffle", "up", "half"))
    est = _est(graph)
    assert est["rom_bits"] == sum(layer["rom_bits"] for layer in est["layers"])
    assert est["weight_memory_bits"] == est["param_bits"] == graph.param_bits()  # tables are not params
