"""Write a self-contained Vitis HLS C++ project for an :class:`~fxquant.integer_graph.IntegerGraph`.

Runs after :func:`.plan.plan_graph` (which checks and sizes the graph). Like hls4ml, the generated
C++ holds only configuration and calls: every piece of math lives in the fixed, hand-written
headers under ``templates/`` (copied to ``firmware/nnet_utils/``). Project layout::

    firmware/defines.h        one ap_int<BW> typedef per value (comment: <BW,FL>, ap_fixed twin)
    firmware/parameters.h     one config struct per layer (shapes, accumulator width, shift, reuse)
    firmware/weights/*.h      weights and int32 biases as raw integer arrays
    firmware/fxq_model.{h,cpp} the top function fxq_model (HLS pragmas) + fxq_model_raw host helper
    firmware/nnet_utils/      the fxq_*.h library
    bridge.cpp                extern "C" fxq_run_batch for Python (ctypes)
    tb/fxq_tb.cpp, tb_data/   testbench with golden input/output vectors from IntegerGraph.run
    build_prj.tcl             Vitis HLS csim / csynth / cosim
    Makefile                  the g++ C-simulation build that :mod:`.csim` runs

A value ``<BW,FL>`` is an ``ap_int<BW>`` holding its integer; the requantize semantics (round
half to even, saturate) are stated in ``templates/fxq_common.h`` and ``docs/number_format.md``.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fxquant.errors import ExportError, UsageError
from fxquant.fixed_point import LAYERNORM_FRAC_BITS, LAYERNORM_RECIP_BITS, FixedPoint
from fxquant.integer_graph import IntegerGraph

from .plan import LayerPlan, ModelPlan, check_graph_inputs, plan_graph, pool_attrs

TOP = "fxq_model"
TEMPLATES = Path(__file__).parent / "templates"
IO_MODES = ("parallel", "stream")
GOLDEN_SAMPLES = 16
"""Random golden vectors written when ``generate_project`` gets no ``test_inputs``."""
CXX_STD = "-std=c++14"
KERNEL_HEADERS = {"conv2d": "fxq_conv2d.h", "linear": "fxq_dense.h", "conv_transpose2d": "fxq_conv_transpose2d.h",
                  "maxpool2d": "fxq_pool.h", "avgpool2d": "fxq_pool.h", "relu": "fxq_activation.h",
                  "requantize": "fxq_activation.h", "clamp": "fxq_activation.h", "lut": "fxq_activation.h",
                  "add": "fxq_merge.h", "mul": "fxq_merge.h", "cat": "fxq_merge.h", "flatten": "fxq_common.h",
                  "reshape": "fxq_common.h", "mul_pow2": "fxq_common.h", "transpose": "fxq_layout.h",
                  "upsample_nearest": "fxq_layout.h", "slice": "fxq_layout.h", "matmul": "fxq_matmul.h",
                  "embedding": "fxq_embedding.h", "softmax": "fxq_softmax.h", "layernorm": "fxq_layernorm.h",
                  "constant": "fxq_common.h"}


def raw_ctype(bits: int) -> str:
    """The smallest C integer type that stores a raw ``bits``-bit weight (``bits <= 16``)."""
    return "int8_t" if bits <= 8 else "int16_t"


def _ports(values: tuple, stem: str, array: str) -> list[tuple[str, str, str, int]]:
    """``(array, type, size macro, size)`` of each top-level port: ``in`` / ``input_t`` / ``N_INPUT``
    for a one-input graph, ``in0``, ``in1``, ... / ``input0_t`` / ``N_INPUT0`` otherwise (outputs alike)."""
    one = len(values) == 1
    macro = "N_INPUT" if stem == "input" else "N_OUTPUT"
    return [(array if one else f"{array}{i}", f"{stem}_t" if one else f"{stem}{i}_t", macro if one else f"{macro}{i}",
             math.prod(v.shape)) for i, v in enumerate(values)]


def in_ports(plan: ModelPlan) -> list[tuple[str, str, str, int]]:
    return _ports(plan.inputs, "input", "in")


def out_ports(plan: ModelPlan) -> list[tuple[str, str, str, int]]:
    return _ports(plan.outputs, "result", "out")


def _input_index(name: str, plan: ModelPlan) -> int | None:
    return next((i for i, v in enumerate(plan.inputs) if v.name == name), None)


def value_type(name: str, plan: ModelPlan) -> str:
    i = _input_index(name, plan)
    return in_ports(plan)[i][1] if i is not None else f"{_value_ident(name, plan)}_t"


def _value_ident(name: str, plan: ModelPlan) -> str:
    for layer in plan.layers:
        if layer.output.name == name:
            return layer.ident
    raise ExportError(f"value {name!r} has no producer in the graph")


def _array(name: str, plan: ModelPlan) -> str:
    i = _input_index(name, plan)
    return in_ports(plan)[i][0] if i is not None else f"{_value_ident(name, plan)}_out"


def _fmt_comment(fmt: FixedPoint) -> str:
    return f"{fmt} == ap_fixed<{fmt.bits},{fmt.bits - fmt.frac_bits},AP_RND_CONV,AP_SAT>"


def _check_options(part: str, clock_ns: float, reuse: int, io: str) -> None:
    if io not in IO_MODES:
        raise UsageError(f"io={io!r} is not an FPGA io mode", f"use one of {', '.join(IO_MODES)}")
    if isinstance(reuse, bool) or not isinstance(reuse, int) or reuse < 1:
        raise UsageError(f"reuse={reuse!r} must be an integer >= 1")
    if not clock_ns > 0:
        raise UsageError(f"clock_ns={clock_ns!r} must be positive")
    if not part or any(c.isspace() for c in part):
        raise UsageError(f"part={part!r} is not an FPGA part name", "e.g. xcu250-figd2104-2L-e")


def _int_lines(values: Iterable[int], per_line: int = 24) -> str:
    vals = [str(int(v)) for v in values]
    return ",\n".join("    " + ", ".join(vals[i:i + per_line]) for i in range(0, len(vals), per_line))


def _struct(ident: str, comment: str, types: list[tuple[str, str]], consts: list[tuple[str, str, object]]) -> str:
    lines = [comment, f"struct config_{ident} {{"]
    lines += [f"    typedef {t} {n};" for n, t in types]
    lines += [f"    static const {ct} {n} = {str(v).lower() if isinstance(v, bool) else v};" for ct, n, v in consts]
    return "\n".join(lines + ["};"])


def _window_consts(layer: LayerPlan, kernel: tuple[int, int], stride, pad, dil=None) -> list[tuple[str, str, object]]:
    c, h, w = layer.inputs[0].shape
    _, oh, ow = layer.output.shape
    consts: list[tuple[str, str, object]] = [("unsigned", "in_c", c), ("unsigned", "in_h", h), ("unsigned", "in_w", w),
                                             ("unsigned", "out_h", oh), ("unsigned", "out_w", ow)]
    consts += [("unsigned", "k_h", kernel[0]), ("unsigned", "k_w", kernel[1]), ("unsigned", "stride_h", stride[0]),
               ("unsigned", "stride_w", stride[1]), ("unsigned", "pad_h", pad[0]), ("unsigned", "pad_w", pad[1])]
    if dil is not None:
        consts += [("unsigned", "dil_h", dil[0]), ("unsigned", "dil_w", dil[1])]
    return consts


def _config(layer: LayerPlan, plan: ModelPlan, reuse: int) -> str:
    """The configuration struct(s) of one layer (a ``cat`` has one per input)."""
    op, out, kind = layer.op, layer.output, layer.kind
    out_t = ("out_t", value_type(out.name, plan))
    ins = [value_type(i, plan) for i in op.inputs]
    acc_t = ("accum_t", f"ap_int<{layer.acc_bits}>")
    requant = [("int", "out_bits", out.fmt.bits), ("int", "shift", layer.shift)]
    relu = [("bool", "relu", bool(op.attrs.get("relu")))]
    comment = f"// {op.name} ({kind}): accumulator ap_int<{layer.acc_bits}> on FL {layer.acc_frac_bits}, output {out.fmt}"
    if kind == "cat":
        d = layer.detail
        return "\n\n".join(_struct(
            f"{layer.ident}_{i}", f"// {op.name} (cat) input {i}: {layer.inputs[i].fmt} -> {out.fmt}, "
                                  f"slice {d['offsets'][i]}..+{d['inner'][i]} of {d['out_inner']}",
            [out_t, ("in_t", t)],
            [("int", "out_bits", out.fmt.bits), ("int", "shift", layer.in_shifts[i]), *relu,
             ("unsigned", "outer", d["outer"]), ("unsigned", "inner", d["inner"][i]),
             ("unsigned", "out_inner", d["out_inner"]), ("unsigned", "offset", d["offsets"][i])])
            for i, t in enumerate(ins))
    if kind == "softmax":
        return _softmax_config(layer, plan, reuse, comment)
    types: list[tuple[str, str]] = [out_t]
    types += [(f"in{i}_t", t) for i, t in enumerate(ins)] if len(ins) > 1 else [("in_t", ins[0])]
    consts: list[tuple[str, str, object]] = []
    if kind in ("conv2d", "linear", "conv_transpose2d"):
        assert op.weight_fmt is not None and op.weight is not None  # checked by plan_graph
        types += [acc_t, ("weight_t", f"ap_int<{op.weight_fmt.bits}>"),
                  ("weight_raw_t", raw_ctype(op.weight_fmt.bits)), ("bias_raw_t", "int32_t")]
        n_out = op.weight.shape[0] if kind != "conv_transpose2d" else out.shape[0]
        consts += requant + relu + [("bool", "has_bias", op.bias is not None),
                                    ("unsigned", "n_bias", n_out if op.bias is not None else 1),
                                    ("unsigned", "reuse_factor", reuse),
                                    ("unsigned", "n_mult", math.ceil(layer.mults / reuse))]
        if kind == "linear":
            consts += [("unsigned", "n_in", op.weight.shape[1]), ("unsigned", "n_out", op.weight.shape[0]),
                       ("unsigned", "rows", layer.detail["rows"])]
        else:
            consts += [("unsigned", "out_c", out.shape[0]), ("unsigned", "groups", op.attrs.get("groups", 1))]
            consts += _window_consts(layer, op.weight.shape[2:], op.attrs.get("stride", (1, 1)),
                                     op.attrs.get("padding", (0, 0)), op.attrs.get("dilation", (1, 1)))
    elif kind == "maxpool2d":
        comment = f"// {op.name} (maxpool2d): integers pass through, format {out.fmt}"
        kernel, stride, pad, dil = pool_attrs(op)
        consts += [("int", "in_bits", layer.inputs[0].fmt.bits)] + _window_consts(layer, kernel, stride, pad, dil)
    elif kind == "avgpool2d":
        kernel, stride, pad, _ = pool_attrs(op)
        d = layer.detail
        comment += f"; window sum * m[d], divisors d in {list(d['divisors'])}"
        types += [acc_t, ("sum_t", f"ap_int<{d['sum_bits']}>"), ("mult_t", f"ap_int<{d['mult_bits']}>"),
                  ("mult_raw_t", "int64_t")]
        consts += requant + relu + _window_consts(layer, kernel, stride, pad)
    elif kind in ("requantize", "clamp"):
        types.append(acc_t)
        consts += requant + ([] if kind == "clamp" else relu) + [("unsigned", "n", layer.out_size)]
        if kind == "clamp":
            lo, hi = op.attrs.get("lo"), op.attrs.get("hi")
            consts += [("bool", "has_lo", lo is not None), ("long long", "lo", int(lo or 0)),
                       ("bool", "has_hi", hi is not None), ("long long", "hi", int(hi or 0))]
    elif kind == "lut":
        comment = f"// {op.name} (lut): ROM of {layer.detail['table'].size} entries, {layer.inputs[0].fmt} -> {out.fmt}"
        types.append(("table_raw_t", raw_ctype(out.fmt.bits)))
        consts += [("int", "in_bits", layer.inputs[0].fmt.bits), ("unsigned", "table_size", layer.detail["table"].size),
                   ("unsigned", "n", layer.out_size)]
    elif kind == "add":
        types.append(acc_t)
        consts += requant + relu + [("unsigned", "n", layer.out_size), ("int", "shift0", layer.in_shifts[0]),
                                    ("int", "shift1", layer.in_shifts[1])]
    elif kind == "mul":
        d = layer.detail
        types.append(acc_t)
        consts += requant + relu + [("unsigned", "n0", math.prod(layer.inputs[0].shape)),
                                    ("unsigned", "n1", math.prod(layer.inputs[1].shape))]
        consts += [("unsigned", f"d{i}", n) for i, n in enumerate(d["dims"])]
        consts += [("unsigned", f"{ab}{i}", n) for ab, st in zip("ab", d["strides"]) for i, n in enumerate(st)]
    elif kind == "matmul":
        d = layer.detail
        types.append(acc_t)
        consts += requant + relu + [("unsigned", "reuse_factor", reuse),
                                    ("unsigned", "n0", math.prod(layer.inputs[0].shape)),
                                    ("unsigned", "n1", math.prod(layer.inputs[1].shape)),
                                    ("unsigned", "d0", d["dims"][0]), ("unsigned", "d1", d["dims"][1]),
                                    ("unsigned", "m", d["m"]), ("unsigned", "k", d["k"]), ("unsigned", "n", d["n"])]
        consts += [("unsigned", f"{ab}{i}", n) for ab, st in zip("ab", d["strides"]) for i, n in enumerate(st)]
    elif kind == "embedding":
        d = layer.detail
        comment = (f"// {op.name} (embedding): ROM of {d['vocab']} x {d['dim']} at {op.weight_fmt}, ids "
                   f"{layer.inputs[0].fmt} in [0, {d['vocab']}), output {out.fmt}")
        types.append(("table_raw_t", raw_ctype(op.weight_fmt.bits)))
        consts += [("int", "out_bits", out.fmt.bits), ("int", "shift", layer.shift),
                   ("int", "weight_bits", op.weight_fmt.bits), ("unsigned", "n_ids", d["n_ids"]),
                   ("unsigned", "vocab", d["vocab"]), ("unsigned", "dim", d["dim"])]
    elif kind == "layernorm":
        d = layer.detail
        comment += f"; rows of {d['n']}, eps_D {d['eps']}"
        types += [acc_t, ("weight_t", f"ap_int<{op.weight_fmt.bits}>"), ("weight_raw_t", raw_ctype(op.weight_fmt.bits)),
                  ("bias_raw_t", "int32_t"), ("sum_t", f"ap_int<{d['sum_bits']}>"),
                  ("centered_t", f"ap_int<{d['centered_bits']}>"), ("h_t", f"ap_int<{d['h_bits']}>")]
        consts += requant + relu + [("bool", "has_bias", op.bias is not None),
                                    ("unsigned", "n_bias", d["n"] if op.bias is not None else 1),
                                    ("unsigned", "reuse_factor", reuse), ("unsigned", "rows", d["rows"]),
                                    ("unsigned", "n", d["n"]), ("unsigned long long", "eps", f"{d['eps']}ULL"),
                                    ("int", "recip_bits", LAYERNORM_RECIP_BITS),
                                    ("int", "h_frac_bits", LAYERNORM_FRAC_BITS)]
    elif kind in ("transpose", "upsample_nearest", "slice"):
        comment = f"// {op.name} ({kind}): integers move, format {out.fmt}"
        d = layer.detail
        consts += [("unsigned", "n_in", math.prod(layer.inputs[0].shape)), ("unsigned", "offset", d["offset"])]
        consts += [("unsigned", f"d{i}", n) for i, n in enumerate(d["dims"])]
        consts += [("unsigned", f"s{i}", n) for i, n in enumerate(d["strides"])]
    else:  # relu
        comment = f"// {op.name} ({kind}): integers pass through, format {out.fmt}"
        consts.append(("unsigned", "n", layer.out_size))
    return _struct(layer.ident, comment, types, consts)


def _softmax_config(layer: LayerPlan, plan: ModelPlan, reuse: int, comment: str) -> str:
    op, out, d = layer.op, layer.output, layer.detail
    mask_t = value_type(op.inputs[1], plan) if len(op.inputs) > 1 else "int8_t"  # no mask: a raw {1}
    n_mask = math.prod(layer.inputs[1].shape) if len(op.inputs) > 1 else 1
    comment += (f"; exp ROM of {d['table'].size} entries at E = {d['exp_bits']}, K = {d['recip_k']}, "
                f"{'a mask' if len(op.inputs) > 1 else 'no mask'}{', causal' if d['causal'] else ''}")
    types = [("out_t", value_type(out.name, plan)), ("in_t", value_type(op.inputs[0], plan)), ("mask_t", mask_t),
             ("table_raw_t", "int32_t"), ("exp_t", f"ap_uint<{d['exp_t_bits']}>"), ("sum_t", f"ap_uint<{d['sum_bits']}>"),
             ("recip_t", f"ap_uint<{d['recip_bits']}>"), ("accum_t", f"ap_int<{layer.acc_bits}>")]
    m = d["mask_strides"]
    consts = [("int", "in_bits", layer.inputs[0].fmt.bits), ("int", "out_bits", out.fmt.bits),
              ("int", "shift", layer.shift), ("unsigned", "reuse_factor", reuse),
              ("unsigned", "d0", d["dims"][0]), ("unsigned", "d1", d["dims"][1]), ("unsigned", "d2", d["dims"][2]),
              ("unsigned", "len", d["len"]), ("unsigned", "n_mask", n_mask), ("unsigned", "m0", m[0]),
              ("unsigned", "m1", m[1]), ("unsigned", "m2", m[2]), ("unsigned", "mj", m[3]),
              ("bool", "causal", d["causal"]), ("unsigned", "table_size", d["table"].size),
              ("int", "recip_k", d["recip_k"]), ("int", "num_bits", d["num_bits"])]
    return _struct(layer.ident, comment, types, consts)


COPY_KINDS = ("flatten", "reshape", "mul_pow2")
"""Kinds whose integers keep their flat CHW order: a copy (no configuration struct)."""
UNCONFIGURED_KINDS = COPY_KINDS + ("constant",)
"""Kinds with no configuration struct (``constant``: a copy of its ROM)."""
TABLE_KINDS = ("conv2d", "linear", "conv_transpose2d", "avgpool2d", "lut", "embedding", "softmax", "layernorm",
               "constant")
"""Kinds with a constant array header in ``firmware/weights/``."""


def _weights_header(layer: LayerPlan) -> str:
    op = layer.op
    guard = f"FXQ_W_{layer.ident.upper()}_H_"
    if layer.kind == "lut":
        table = layer.detail["table"]
        ctype = raw_ctype(layer.output.fmt.bits)
        body = (f"// {op.name}: table of {op.attrs.get('function', 'a function')} on {layer.inputs[0].fmt} -> "
                f"{layer.output.fmt}, entry k - qmin_in for input integer k (a ROM)\n"
                f"static const {ctype} t_{layer.ident}[{table.size}] = {{\n{_int_lines(table)}\n}};\n")
    elif layer.kind == "embedding":
        table = op.weight
        body = (f"// {op.name}: embedding table {op.weight_fmt} shape {tuple(table.shape)}, row-major (a ROM)\n"
                f"static const {raw_ctype(op.weight_fmt.bits)} t_{layer.ident}[{table.size}] = {{\n"
                f"{_int_lines(table.ravel())}\n}};\n")
    elif layer.kind == "constant":
        body = (f"// {op.name}: constant integers {layer.output.fmt} shape {tuple(op.weight.shape)}, row-major "
                f"(a ROM copied into every sample)\n"
                f"static const {raw_ctype(layer.output.fmt.bits)} t_{layer.ident}[{op.weight.size}] = {{\n"
                f"{_int_lines(op.weight.ravel())}\n}};\n")
    elif layer.kind == "softmax":
        table = layer.detail["table"]
        body = (f"// {op.name}: exp ROM, entry i = round_half_even(exp(-i 2^-{layer.inputs[0].fmt.frac_bits}) "
                f"2^{layer.detail['exp_bits']}) (fixed_point.softmax_exp_table)\n"
                f"static const int32_t t_{layer.ident}[{table.size}] = {{\n{_int_lines(table)}\n}};\n")
        if len(op.inputs) == 1:
            body += f"// no mask input: every entry kept\nstatic const int8_t nm_{layer.ident}[1] = {{1}};\n"
    elif layer.kind == "avgpool2d":
        mults = layer.detail["mults"]
        body = (f"// {op.name}: m[d] = M_d * 2^(S - s_d) for every window divisor d (0: no window has it)\n"
                f"static const int64_t m_{layer.ident}[{len(mults)}] = {{\n{_int_lines(mults)}\n}};\n")
    else:
        assert op.weight is not None and op.weight_fmt is not None  # checked by plan_graph
        bias = op.bias if op.bias is not None else np.zeros(1, dtype=np.int64)
        what = "gamma" if layer.kind == "layernorm" else "weight"
        body = (f"// {op.name}: {what} {op.weight_fmt} shape {tuple(op.weight.shape)}; bias int32 on FL "
                f"{layer.acc_frac_bits}{'' if op.bias is not None else ' (none: one unused zero)'}\n"
                f"static const {raw_ctype(op.weight_fmt.bits)} w_{layer.ident}[{op.weight.size}] = {{\n"
                f"{_int_lines(op.weight.ravel())}\n}};\n"
                f"static const int32_t b_{layer.ident}[{bias.size}] = {{\n{_int_lines(bias.ravel())}\n}};\n")
    return f"#ifndef {guard}\n#define {guard}\n#include <cstdint>\n{body}#endif\n"


def _cat_function(layer: LayerPlan, plan: ModelPlan) -> str:
    """A ``cat`` of any number of inputs: one function (one producer of its output), one call per slice."""
    args = [f"const {value_type(i, plan)} x{k}[{math.prod(v.shape)}]"
            for k, (i, v) in enumerate(zip(layer.op.inputs, layer.inputs))]
    args.append(f"{value_type(layer.output.name, plan)} y[{layer.out_size}]")
    calls = [f"    fxq::cat_part<config_{layer.ident}_{k}>(x{k}, y);" for k in range(len(layer.inputs))]
    return "\n".join([f"// {layer.op.name}: cat of {len(layer.inputs)} inputs", f"static void cat_{layer.ident}({', '.join(args)}) {{",
                      "#pragma HLS PIPELINE II = 1", *calls, "}", ""])


def _call(layer: LayerPlan, plan: ModelPlan) -> str:
    ins = [_array(i, plan) for i in layer.op.inputs]
    out = f"{layer.ident}_out"
    cfg = f"config_{layer.ident}"
    kind = layer.kind
    if kind in ("conv2d", "linear", "conv_transpose2d"):
        fn = "dense" if kind == "linear" else kind
        return f"fxq::{fn}<{cfg}>({ins[0]}, {out}, w_{layer.ident}, b_{layer.ident});"
    if kind == "avgpool2d":
        return f"fxq::avgpool2d<{cfg}>({ins[0]}, {out}, m_{layer.ident});"
    if kind == "embedding":
        return f"fxq::embedding<{cfg}>({ins[0]}, {out}, t_{layer.ident});"
    if kind == "softmax":
        mask = ins[1] if len(ins) > 1 else f"nm_{layer.ident}"
        return f"fxq::softmax<{cfg}>({ins[0]}, {mask}, {out}, t_{layer.ident});"
    if kind == "layernorm":
        return f"fxq::layernorm<{cfg}>({ins[0]}, {out}, w_{layer.ident}, b_{layer.ident});"
    if kind == "lut":
        return f"fxq::lut<{cfg}>({ins[0]}, {out}, t_{layer.ident});"
    if kind == "cat":
        return f"cat_{layer.ident}({', '.join(ins)}, {out});"
    if kind == "constant":
        return (f"fxq::copy<{raw_ctype(layer.output.fmt.bits)}, {value_type(layer.output.name, plan)}, "
                f"{layer.out_size}>(t_{layer.ident}, {out});")
    if kind in COPY_KINDS:
        t_in = value_type(layer.op.inputs[0], plan)
        return f"fxq::copy<{t_in}, {value_type(layer.output.name, plan)}, {layer.out_size}>({ins[0]}, {out});"
    fn = {"requantize": "requantize_layer", "transpose": "gather", "upsample_nearest": "gather",
          "slice": "gather"}.get(kind, kind)
    return f"fxq::{fn}<{cfg}>({', '.join(ins)}, {out});"


def _partition(var: str, size: int, reuse: int) -> str:
    if reuse == 1:
        return f"#pragma HLS ARRAY_PARTITION variable = {var} complete"
    return f"#pragma HLS ARRAY_PARTITION variable = {var} cyclic factor = {math.ceil(size / reuse)}"


def _top_cpp(plan: ModelPlan, reuse: int, io: str) -> str:
    ins, outs = in_ports(plan), out_ports(plan)
    body = []
    if io == "stream":
        args = [f"hls::stream<{t}> &{a}_stream" for a, t, _, _ in ins + outs]
        body += [f"#pragma HLS INTERFACE axis port = {a}_stream" for a, _, _, _ in ins + outs]
        body.append("#pragma HLS DATAFLOW")
        for a, t, macro, size in ins:
            body += [f"    FXQ_BUFFER {t} {a}[{macro}];", _partition(a, size, reuse),
                     f"    for (unsigned i = 0; i < {macro}; i++) {{", "#pragma HLS PIPELINE II = 1",
                     f"        {a}[i] = {a}_stream.read();", "    }"]
    else:
        args = [f"const {t} {a}[{macro}]" for a, t, macro, _ in ins] + [f"{t} {a}[{macro}]" for a, t, macro, _ in outs]
        body.append(f"#pragma HLS INTERFACE ap_vld port = {','.join(a for a, _, _, _ in ins + outs)}")
        body += [_partition(a, size, reuse) for a, _, _, size in ins + outs]
        body.append("#pragma HLS DATAFLOW")
    sig = f"void {TOP}({', '.join(args)}) {{"
    for layer in plan.layers:
        out = f"{layer.ident}_out"
        body += [f"    // {layer.op.name}: {layer.kind} -> {layer.output.fmt} {layer.output.shape}",
                 f"    FXQ_BUFFER {value_type(layer.output.name, plan)} {out}[{layer.out_size}];",
                 _partition(out, layer.out_size, reuse), f"    {_call(layer, plan)}"]
    for (a, t, macro, _), v in zip(outs, plan.outputs):
        last = _array(v.name, plan)
        if io == "stream":
            body += [f"    for (unsigned i = 0; i < {macro}; i++) {{", "#pragma HLS PIPELINE II = 1",
                     f"        {a}_stream.write({last}[i]);", "    }"]
        else:
            body.append(f"    fxq::copy<{t}, {t}, {macro}>({last}, {a});")
    includes = sorted({KERNEL_HEADERS[layer.kind] for layer in plan.layers})
    weights = [f'#include "weights/w_{layer.ident}.h"' for layer in plan.layers if layer.kind in TABLE_KINDS]
    cats = [_cat_function(layer, plan) for layer in plan.layers if layer.kind == "cat"]
    return "\n".join([f"// Generated by fxquant: top function {TOP}; all math is in nnet_utils/fxq_*.h.",
                      f'#include "{TOP}.h"', '#include "parameters.h"'] + [f'#include "{h}"' for h in includes]
                     + weights + [""] + cats + [sig] + body + ["}", ""])


def _top_h(plan: ModelPlan, io: str) -> str:
    ins, outs = in_ports(plan), out_ports(plan)
    helper = ["    unsigned p = 0;"]
    if io == "stream":
        decl = f"void {TOP}({', '.join(f'hls::stream<{t}> &{a}_stream' for a, t, _, _ in ins + outs)});"
        helper += [f"    hls::stream<{t}> s_{a};" for a, t, _, _ in ins + outs]
        helper += [f"    for (unsigned i = 0; i < {macro}; i++) s_{a}.write({t}(in[p++]));" for a, t, macro, _ in ins]
        helper += [f"    {TOP}({', '.join(f's_{a}' for a, _, _, _ in ins + outs)});", "    p = 0;"]
        helper += [f"    for (unsigned i = 0; i < {macro}; i++) out[p++] = s_{a}.read().to_int64();"
                   for a, t, macro, _ in outs]
        stream_inc = ["#ifdef FXQ_STREAM_SHIM", '#include "fxq_stream.h"', "#else", '#include "hls_stream.h"', "#endif"]
    else:
        decl = (f"void {TOP}({', '.join([f'const {t} {a}[{m}]' for a, t, m, _ in ins] + [f'{t} {a}[{m}]' for a, t, m, _ in outs])});")
        helper += [f"    {t} x_{a}[{macro}];" for a, t, macro, _ in ins + outs]
        helper += [f"    for (unsigned i = 0; i < {macro}; i++) x_{a}[i] = {t}(in[p++]);" for a, t, macro, _ in ins]
        helper += [f"    {TOP}({', '.join(f'x_{a}' for a, _, _, _ in ins + outs)});", "    p = 0;"]
        helper += [f"    for (unsigned i = 0; i < {macro}; i++) out[p++] = x_{a}[i].to_int64();" for a, t, macro, _ in outs]
        stream_inc = []
    return "\n".join(["// Generated by fxquant.", "#ifndef FXQ_MODEL_H_", "#define FXQ_MODEL_H_",
                      '#include "defines.h"'] + stream_inc + ["", decl, "",
                      "#ifndef __SYNTHESIS__",
                      "// Host-side helper for the testbench and the ctypes bridge: one sample, raw integers, every",
                      "// input concatenated in graph order (N_INPUT in all), every output likewise (N_OUTPUT).",
                      f"inline void {TOP}_raw(const long long *in, long long *out) {{"] + helper
                     + ["}", "#endif", "#endif", ""])


def _defines_h(plan: ModelPlan) -> str:
    lines = ["// Generated by fxquant: one ap_int<BW> per value, holding the integer k of k * 2^-FL.",
             "#ifndef FXQ_DEFINES_H_", "#define FXQ_DEFINES_H_", '#include "ap_int.h"', "#include <cstdint>", "",
             f"#define N_INPUT {plan.in_size}", f"#define N_OUTPUT {plan.out_size}"]
    ins, outs = in_ports(plan), out_ports(plan)
    lines += [f"#define {macro} {size}" for _, _, macro, size in ins + outs if macro not in ("N_INPUT", "N_OUTPUT")]
    lines.append("")
    ids = {op.inputs[0] for op in plan.graph.ops if op.kind == "embedding"}
    for (_, t, _, _), v in zip(ins, plan.inputs):
        what = "token ids, integers in [0, V)" if v.name in ids else _fmt_comment(v.fmt)
        lines.append(f"typedef ap_int<{v.fmt.bits}> {t};  // {v.name}: {what}")
    for layer in plan.layers:
        fmt = layer.output.fmt
        lines.append(f"typedef ap_int<{fmt.bits}> {layer.ident}_t;  // {layer.output.name}: {_fmt_comment(fmt)}")
    lines += [f"typedef {value_type(v.name, plan)} {t};" for (_, t, _, _), v in zip(outs, plan.outputs)]
    lines += ["#endif", ""]
    return "\n".join(lines)


def _parameters_h(plan: ModelPlan, reuse: int) -> str:
    return "\n\n".join(["// Generated by fxquant: one configuration struct per layer.\n#ifndef FXQ_PARAMETERS_H_\n"
                        '#define FXQ_PARAMETERS_H_\n#include "defines.h"']
                       + [_config(layer, plan, reuse) for layer in plan.layers if layer.kind not in UNCONFIGURED_KINDS]
                       + ["#endif\n"])


_BRIDGE = f"""// Generated by fxquant: extern "C" entry points for Python (ctypes) C-simulation.
#include "{TOP}.h"

extern "C" {{
int fxq_n_input() {{ return N_INPUT; }}
int fxq_n_output() {{ return N_OUTPUT; }}
// Runs n samples: in is n x N_INPUT raw input integers, out receives n x N_OUTPUT raw output integers.
void fxq_run_batch(const long long *in, long long *out, long long n) {{
    for (long long b = 0; b < n; b++) {TOP}_raw(in + b * N_INPUT, out + b * N_OUTPUT);
}}
}}
"""

_TESTBENCH = f"""// Generated by fxquant: C-simulation testbench. Reads golden vectors (one sample per line) from
// tb_data/ (or the directory given as argv[1]), runs {TOP} on each input and compares the outputs
// bit for bit. Exit status 0 iff every sample matches.
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include "{TOP}.h"

int main(int argc, char **argv) {{
    const std::string dir = argc > 1 ? argv[1] : "tb_data";
    std::ifstream fin((dir + "/tb_input.dat").c_str()), fout((dir + "/tb_output.dat").c_str());
    if (!fin || !fout) {{
        std::printf("fxq_tb: cannot open %s/tb_input.dat or tb_output.dat\\n", dir.c_str());
        return 2;
    }}
    std::string lin, lout;
    long long n = 0, mismatches = 0;
    while (std::getline(fin, lin) && std::getline(fout, lout)) {{
        long long in[N_INPUT], expected[N_OUTPUT], got[N_OUTPUT];
        std::istringstream sin(lin), sout(lout);
        for (unsigned i = 0; i < N_INPUT; i++) sin >> in[i];
        for (unsigned i = 0; i < N_OUTPUT; i++) sout >> expected[i];
        {TOP}_raw(in, got);
        bool ok = true;
        for (unsigned i = 0; i < N_OUTPUT; i++) ok = ok && got[i] == expected[i];
        if (!ok) mismatches++;
        n++;
    }}
    std::printf("fxq_tb: %lld samples, %lld mismatches\\n", n, mismatches);
    return (n > 0 && mismatches == 0) ? 0 : 1;
}}
"""


def _tcl(part: str, clock_ns: float) -> str:
    flags = f"{CXX_STD} -Ifirmware -Ifirmware/nnet_utils"
    return f"""# Generated by fxquant. Vitis HLS: vitis_hls -f build_prj.tcl
# Steps: set csim / synth / cosim to 0 or 1 below.
set csim 1
set synth 1
set cosim 1
open_project -reset fxq_prj
set_top {TOP}
add_files firmware/{TOP}.cpp -cflags "{flags}"
add_files -tb tb/fxq_tb.cpp -cflags "{flags}"
add_files -tb tb_data
open_solution -reset solution1
set_part {{{part}}}
create_clock -period {clock_ns} -name default
if {{$csim}} {{ csim_design -argv tb_data }}
if {{$synth}} {{ csynth_design }}
if {{$cosim}} {{ cosim_design -argv tb_data }}
exit
"""


def write_golden(project_dir: Path, graph: IntegerGraph, int_inputs) -> None:
    """Write ``tb_data/tb_input.dat`` and the reference outputs ``tb_output.dat`` (one sample a line:
    every input's integers concatenated in graph order; every output's likewise)."""
    xs = check_graph_inputs(graph, int_inputs)
    ref = graph.run(*xs)
    tb = project_dir / "tb_data"
    tb.mkdir(parents=True, exist_ok=True)
    for name, arrs in (("tb_input.dat", xs), ("tb_output.dat", [ref[o] for o in graph.outputs])):
        rows = np.concatenate([a.reshape(a.shape[0], -1) for a in arrs], axis=1)
        (tb / name).write_text("".join(" ".join(map(str, r.tolist())) + "\n" for r in rows))


def random_inputs(graph: IntegerGraph, n: int, seed: int = 0) -> list[np.ndarray]:
    """Seeded integer inputs: token ids in ``[0, V)`` for an input an ``embedding`` reads (the smallest
    ``V`` of those reading it), anything in the format's range for the others."""
    rng = np.random.default_rng(seed)
    vocab: dict[str, int] = {}
    for op in graph.ops:  # an input read by several tables: ids valid for every one
        if op.kind == "embedding" and op.weight is not None:
            vocab[op.inputs[0]] = min(vocab.get(op.inputs[0], op.weight.shape[0]), op.weight.shape[0])
    return [rng.integers(0, vocab[v.name], size=(n, *v.shape)) if v.name in vocab
            else rng.integers(v.fmt.qmin, v.fmt.qmax + 1, size=(n, *v.shape)) for v in graph.inputs]


def generate_project(graph: IntegerGraph, out_dir: Path, *, part: str = "xcu250-figd2104-2L-e",
                     clock_ns: float = 5.0, reuse: int = 1, io: str = "parallel",
                     test_inputs=None) -> Path:
    """Write the HLS project for ``graph`` into ``out_dir`` and return ``out_dir``.

    ``test_inputs`` (one batch of integer inputs per graph input; one array for a one-input graph)
    become the testbench's golden vectors, with outputs from :meth:`IntegerGraph.run`; without them,
    ``GOLDEN_SAMPLES`` seeded random inputs (:func:`random_inputs`) are used.
    """
    from .csim import makefile  # the build recipe lives with the builder

    _check_options(part, clock_ns, reuse, io)
    plan = plan_graph(graph)
    out_dir = Path(out_dir)
    fw = out_dir / "firmware"
    if (fw / "nnet_utils" / "fxq_common.h").is_file():  # an earlier generated project: start clean
        shutil.rmtree(fw)
    (fw / "weights").mkdir(parents=True, exist_ok=True)
    lib = fw / "nnet_utils"
    lib.mkdir(exist_ok=True)
    for header in TEMPLATES.glob("*.h"):
        shutil.copyfile(header, lib / header.name)
    (fw / "defines.h").write_text(_defines_h(plan))
    (fw / "parameters.h").write_text(_parameters_h(plan, reuse))
    for layer in plan.layers:
        if layer.kind in TABLE_KINDS:
            (fw / "weights" / f"w_{layer.ident}.h").write_text(_weights_header(layer))
    (fw / f"{TOP}.h").write_text(_top_h(plan, io))
    (fw / f"{TOP}.cpp").write_text(_top_cpp(plan, reuse, io))
    (out_dir / "bridge.cpp").write_text(_BRIDGE)
    (out_dir / "tb").mkdir(exist_ok=True)
    (out_dir / "tb" / "fxq_tb.cpp").write_text(_TESTBENCH)
    (out_dir / "build_prj.tcl").write_text(_tcl(part, clock_ns))
    (out_dir / "Makefile").write_text(makefile())
    if test_inputs is None:
        test_inputs = random_inputs(graph, GOLDEN_SAMPLES)
    write_golden(out_dir, graph, test_inputs)
    return out_dir
