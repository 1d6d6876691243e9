"""Analytic resource and latency **estimates** for the generated HLS design (no vendor tools run).

Reads the :class:`.plan.ModelPlan`; ``docs/fpga.md`` documents the model. These are first-order
estimates to compare precisions and reuse factors, not synthesis results (run ``build_prj.tcl``
for those). For a conv/dense layer with ``M`` multiplications per pipeline iteration (all weights
of a dense layer, all weights of a conv layer for one output pixel), reuse factor ``R``,
input/weight widths ``a``/``b``, accumulator width ``A``, ``O`` outputs per iteration:

* multipliers ``n_mult = ceil(M / R)``; one is a DSP48E2 (27x18 signed, ``ceil(wide/27) *
  ceil(narrow/18)`` DSPs) when ``max(a, b) >= 10``, else fabric at ``a * b`` LUTs;
* LUTs: multipliers + ``n_mult * S`` (adder tree at the product-sum width ``S =
  accumulator_bits(a, b, fan_in)``) + ``ceil(O / R) * (A + BW_out)`` (bias add at the full
  accumulator width ``A``, rounding adder and saturation per requantize);
* weights (``Σ params · bits``, biases at int32): with ``R = 1`` fully partitioned into logic
  (no memory blocks); otherwise ``n_mult`` banks of depth ``ceil(weights / n_mult)``: a bank of
  at most 1024 bits is LUTRAM (``ceil(depth / 64) * b`` LUTs), a larger one BRAM18 in 1Kx18 mode
  (``ceil(b / 18) * ceil(depth / 1024)``); a layer above :data:`URAM_MIN_BITS` goes to URAM
  (``ceil(bits / 294912)``);
* latency: ``iterations * R + ceil(log2(fan_in + 1)) + 3`` cycles (multiply, adder tree,
  requantize, register), layer II ``iterations * R``. Pooling: one output pixel per cycle;
  element-wise ops (relu, requantize, clamp, cat, lut) 1 cycle (add: 2, mul: 3); ops that only
  move integers (flatten, reshape, transpose, upsample_nearest, mul_pow2) are wiring: 0 LUTs, 0 cycles.
* ``conv_transpose2d`` is sized as a conv (every weight one multiplier per output pixel, an upper
  bound: a stride-s layer uses about 1/s^2 of them per pixel).
* ``mul`` (all elements in parallel): ``n_out`` multipliers of ``BW_a x BW_b`` (DSP or LUTs as above)
  and a requantize each. Average pooling: per channel a window adder tree and one multiplier
  ``sum x m[d]`` (the divisor's reciprocal), the ``m`` table a small ROM.
* ``lut``: the table is a ROM of ``2^BW_in x BW_out`` bits (``rom_bits``, one copy). All elements are
  looked up in the same cycle, so the design holds ``n`` copies: a table of at most 1024 bits as
  LUT ROM (``ceil(2^BW_in / 64) * BW_out`` LUTs per copy), a larger one in dual-port BRAM18
  (``ceil(n / 2)`` copies of ``ceil(BW_out / 18) * ceil(2^BW_in / 1024)``) -- hls4ml's
  ``io_parallel`` activation tables, whose cost grows with both width and parallelism.
* ``matmul``: ``ceil(out_size K / R)`` multipliers of ``BW_a x BW_b`` and the adder trees at the
  accumulator width, a requantize per output; latency ``R + ceil(log2(K + 1)) + 3``. ``slice`` is wiring.
* ``constant``: constant drivers (its ROM bits counted, no logic: synthesis folds the copy).
* ``embedding``: the table is a ROM read by every id in the same cycle (``n_ids`` copies, as a
  ``lut``'s table: LUT ROM up to 1024 bits, dual-port BRAM18 beyond), a requantize per output.
* ``softmax`` (every row in parallel): per row a max tree and a sum tree over ``L``, one divider of
  ``num_bits`` (``num_bits^2`` LUTs, ``num_bits`` cycles: restoring division); per element an exp
  ROM read (copies as a ``lut``'s table) and an ``e x r`` multiplier; latency
  ``2 ceil(log2 L) + num_bits + 4``.
* ``layernorm`` (every row in parallel): per element three multipliers (``c^2``, ``(c << t) r``,
  ``gamma h``, DSP or LUTs as above); per row a sum tree, a 62-bit division by ``n`` and a 52-bit
  reciprocal division (``bits^2`` LUTs each) and the 32-step square root (``32 x 64`` LUTs); latency
  ``2 ceil(log2(n + 1)) + 62 + 32 + 52 + 6``.
* whole model (``DATAFLOW``): latency = Σ layer latencies, II = max layer II; ``io="stream"``
  adds ``N_INPUT + N_OUTPUT`` cycles to the latency for the stream read/write loops.
"""

from __future__ import annotations

import math
from typing import Any

from fxquant.fixed_point import accumulator_bits

from .plan import LayerPlan, ModelPlan

DSP_MIN_BITS = 10
"""Multipliers whose widest operand is below this map to LUTs (fabric), others to DSP48E2."""
DSP_A, DSP_B = 27, 18
LUTRAM_MAX_BITS = 1024
BRAM_DEPTH, BRAM_WIDTH = 1024, 18
URAM_MIN_BITS, URAM_BITS = 1 << 20, 4096 * 72
MOVE_KINDS = ("flatten", "reshape", "transpose", "upsample_nearest", "mul_pow2", "slice")
"""Kinds that only move (or relabel) integers: wiring in hardware."""
MODEL = "fxquant analytic v2 (docs/fpga.md); estimate, not synthesis"
PART_CAPACITY: dict[str, dict[str, int]] = {
    "xcu250-figd2104-2L-e": {"dsp": 12288, "lut": 1728000, "bram_18k": 5376, "uram": 1280},
    "xc7z020clg400-1": {"dsp": 220, "lut": 53200, "bram_18k": 280, "uram": 0},
}


def _multiplier(a: int, b: int) -> tuple[int, int]:
    """(DSPs, LUTs) of one signed ``a x b`` multiplier."""
    if max(a, b) < DSP_MIN_BITS:
        return 0, a * b
    wide, narrow = max(a, b), min(a, b)
    return math.ceil(wide / DSP_A) * math.ceil(narrow / DSP_B), 0


def _memory(layer: LayerPlan, n_mult: int, reuse: int) -> tuple[int, int, int]:
    """(BRAM18, URAM, LUTRAM LUTs) holding the layer's weights and biases."""
    if reuse == 1 or layer.weight_bits == 0:
        return 0, 0, 0
    if layer.weight_bits > URAM_MIN_BITS:
        return 0, math.ceil(layer.weight_bits / URAM_BITS), 0
    assert layer.op.weight is not None and layer.op.weight_fmt is not None  # weight_bits > 0
    width = layer.op.weight_fmt.bits
    depth = math.ceil(layer.op.weight.size / n_mult)
    if depth * width <= LUTRAM_MAX_BITS:
        return 0, 0, n_mult * math.ceil(depth / 64) * width
    return n_mult * math.ceil(width / BRAM_WIDTH) * math.ceil(depth / BRAM_DEPTH), 0, 0


def _rom(copies: int, entries: int, bits: int) -> tuple[int, int]:
    """``(lut, bram_18k)`` of ``copies`` reads per cycle of a ROM of ``entries x bits``: LUT ROM up to
    :data:`LUTRAM_MAX_BITS` bits, dual-port BRAM18 (``ceil(copies / 2)`` copies) beyond."""
    if entries * bits <= LUTRAM_MAX_BITS:
        return copies * math.ceil(entries / 64) * bits, 0
    return 0, math.ceil(copies / 2) * math.ceil(bits / BRAM_WIDTH) * math.ceil(entries / BRAM_DEPTH)


def estimate_layer(layer: LayerPlan, reuse: int) -> dict[str, Any]:
    """Resources and timing of one layer (see the module docstring for the model)."""
    op, out_bits = layer.op, layer.output.fmt.bits
    dsp = lut = bram = uram = 0
    n_mult = 0
    rom_bits = 0
    if layer.kind in ("conv2d", "linear", "conv_transpose2d"):
        assert op.weight_fmt is not None  # checked by plan_graph
        n_mult = math.ceil(layer.mults / reuse)
        a, b = layer.inputs[0].fmt.bits, op.weight_fmt.bits
        mult_dsp, mult_lut = _multiplier(a, b)
        outs = layer.out_size // layer.iterations
        dsp = n_mult * mult_dsp
        bram, uram, lutram = _memory(layer, n_mult, reuse)
        lut = (n_mult * (mult_lut + accumulator_bits(a, b, layer.fan_in))
               + math.ceil(outs / reuse) * (layer.acc_bits + out_bits) + lutram)
        ii = layer.iterations * reuse
        latency = ii + math.ceil(math.log2(layer.fan_in + 1)) + 3
    elif layer.kind in ("maxpool2d", "avgpool2d"):
        kh, kw = op.attrs["kernel"]
        channels = layer.output.shape[0]
        if layer.kind == "avgpool2d":
            sum_bits, mult_bits = layer.detail["sum_bits"], layer.detail["mult_bits"]
            n_mult = channels
            mult_dsp, mult_lut = _multiplier(sum_bits, mult_bits)
            dsp = n_mult * mult_dsp
            rom_bits = len(layer.detail["mults"]) * mult_bits
            lut = (channels * ((kh * kw - 1) * sum_bits + mult_lut + layer.acc_bits + out_bits)
                   + math.ceil(rom_bits / 64))
        else:
            lut = channels * (kh * kw - 1) * layer.inputs[0].fmt.bits
        ii = layer.iterations
        latency = ii + math.ceil(math.log2(kh * kw)) + 1 + (layer.kind == "avgpool2d")
    elif layer.kind in MOVE_KINDS:
        ii, latency = 1, 0
    elif layer.kind == "constant":  # constant drivers: synthesis folds the copied ROM into the consumers
        rom_bits = layer.out_size * out_bits
        ii, latency = 1, 0
    elif layer.kind == "lut":
        entries = layer.detail["table"].size
        rom_bits = entries * out_bits
        if rom_bits <= LUTRAM_MAX_BITS:
            lut = layer.out_size * math.ceil(entries / 64) * out_bits
        else:
            bram = math.ceil(layer.out_size / 2) * math.ceil(out_bits / BRAM_WIDTH) * math.ceil(entries / BRAM_DEPTH)
        ii, latency = 1, 1
    elif layer.kind == "matmul":
        d = layer.detail
        n_mult = math.ceil(layer.mults / reuse)
        mult_dsp, mult_lut = _multiplier(*(v.fmt.bits for v in layer.inputs))
        dsp = n_mult * mult_dsp
        lut = n_mult * (mult_lut + layer.acc_bits) + math.ceil(layer.out_size / reuse) * (layer.acc_bits + out_bits)
        ii = reuse
        latency = reuse + math.ceil(math.log2(d["k"] + 1)) + 3
    elif layer.kind == "embedding":
        d = layer.detail
        assert op.weight_fmt is not None  # checked by plan_graph
        lut, bram = _rom(d["n_ids"], d["vocab"] * d["dim"], op.weight_fmt.bits)
        lut += layer.out_size * (layer.acc_bits + out_bits)
        ii, latency = 1, 2
    elif layer.kind == "softmax":
        d = layer.detail
        rows = layer.out_size // d["len"]
        rom_bits = d["table"].size * d["exp_t_bits"]
        lut, bram = _rom(layer.out_size, d["table"].size, d["exp_t_bits"])
        n_mult = layer.out_size
        mult_dsp, mult_lut = _multiplier(d["exp_t_bits"], d["recip_bits"])
        dsp = n_mult * mult_dsp
        lut += (rows * (d["num_bits"] ** 2 + d["len"] * (layer.inputs[0].fmt.bits + d["sum_bits"]))
                + n_mult * (mult_lut + layer.acc_bits + out_bits))
        ii = reuse
        latency = 2 * math.ceil(math.log2(d["len"] + 1)) + d["num_bits"] + 4
    elif layer.kind == "layernorm":
        d = layer.detail
        assert op.weight_fmt is not None  # checked by plan_graph
        n_mult = math.ceil(layer.mults / reuse)
        per = [_multiplier(d["centered_bits"], d["centered_bits"]), _multiplier(32, 52),
               _multiplier(d["h_bits"], op.weight_fmt.bits)]
        dsp = math.ceil(layer.out_size / reuse) * sum(m[0] for m in per)
        lut = (math.ceil(layer.out_size / reuse) * (sum(m[1] for m in per) + layer.acc_bits + out_bits)
               + d["rows"] * (d["n"] * d["sum_bits"] + 62 ** 2 + 52 ** 2 + 32 * 64))
        ii = reuse
        latency = 2 * math.ceil(math.log2(d["n"] + 1)) + 62 + 32 + 52 + 6
    elif layer.kind == "mul":
        n_mult = layer.out_size
        mult_dsp, mult_lut = _multiplier(*(v.fmt.bits for v in layer.inputs))
        dsp = n_mult * mult_dsp
        lut = n_mult * (mult_lut + layer.acc_bits + out_bits)
        ii, latency = 1, 3
    else:  # relu, requantize, clamp, add, cat: one unit per element
        per_element = out_bits if layer.kind == "relu" else layer.acc_bits + out_bits
        if layer.kind == "add":
            per_element += layer.acc_bits
        if layer.kind == "clamp":  # the two bound comparators
            per_element += 2 * out_bits
        lut = layer.out_size * per_element
        ii, latency = 1, 2 if layer.kind == "add" else 1
    return {"name": op.name, "kind": layer.kind, "out_bits": out_bits, "acc_bits": layer.acc_bits,
            "multipliers": n_mult, "dsp": dsp, "lut": lut, "bram_18k": bram, "uram": uram,
            "weight_bits": layer.weight_bits, "rom_bits": rom_bits, "latency_cycles": latency, "ii": ii}


def estimate(plan: ModelPlan, *, part: str, clock_ns: float, reuse: int, io: str) -> dict[str, Any]:
    """Per-layer and total estimates; ``weight_memory_bits`` equals ``graph.param_bits()``."""
    layers = [estimate_layer(layer, reuse) for layer in plan.layers]
    total = {key: sum(layer[key] for layer in layers) for key in ("dsp", "lut", "bram_18k", "uram")}
    latency = sum(layer["latency_cycles"] for layer in layers)
    if io == "stream":
        latency += plan.in_size + plan.out_size
    ii = max([layer["ii"] for layer in layers] + ([plan.in_size] if io == "stream" else []))
    report: dict[str, Any] = {
        "estimate": True, "model": MODEL, "part": part, "clock_ns": clock_ns, "reuse": reuse, "io": io,
        "layers": layers, "total": total,
        "weight_memory_bits": sum(layer["weight_bits"] for layer in layers),
        "rom_bits": sum(layer["rom_bits"] for layer in layers),
        "param_bits": plan.graph.param_bits(),
        "latency_cycles": latency, "latency_ns": latency * clock_ns, "ii_cycles": ii,
        "throughput_per_s": 1e9 / (ii * clock_ns),
    }
    if part in PART_CAPACITY:
        cap = PART_CAPACITY[part]
        report["utilization_pct"] = {k: round(100.0 * total[k] / cap[k], 3) if cap[k] else None for k in cap}
    return report
