"""The TVM CPU target: an IntegerGraph as a TVM shared library of fxquant's own x86 kernels.

The contract (:mod:`fxquant.backends.base`): ``check`` lists every reason the kernels cannot build
a graph (the rules of :mod:`fxquant.legality` with this target's limits, and the accumulator bound
of the kernel each layer will take, :mod:`.packing`); ``build`` lowers and compiles it
(:mod:`.build`) and writes, all relative to ``out_dir``::

    fxquant_cpu.so   main(inputs..., p0, p1, ...) -> int8 output integers (tvm.runtime only)
    params.npz       p0, p1, ...: the packed weights and biases
    entry.json       the entry signature: inputs (name, shape, frac_bits, dtype[, vocab]), outputs, params

``run`` loads the library from ``out_dir`` and feeds it ``k * 2^-FL`` in float32 (exact for the
integers of at most 8 bits it takes), so the module's own input quantizer returns ``k``; token ids
(a graph input an ``embedding`` reads) are fed as int32, never quantized, and refused outside
``[0, vocab)`` (:class:`~fxquant.errors.InputRangeError`, as the reference).

Limits: activations (and graph inputs) 2..8 bits, stored as int8, except token ids (int32, any
``<BW,0>``) and a 9-bit softmax output (``[0, 255]``: uint8), which only ``matmul`` and ``slice`` read;
weights 2..16 bits (int8, or int16 into the same ``vpmaddwd``; the 4/2-bit packed and the VNNI paths
take the weights whose integers fit them); int32 accumulators (average pools: window sum times the
reciprocal ``M``; ``matmul``: ``2^(BW_a-1) 2^(BW_b-1) K``); ``linear`` on the last axis of any rank
(leading dims folded into rows); ``mul`` broadcasting equal-rank shapes; ``matmul`` of equal ranks
>= 2 whose leading dims are equal or 1. Grouped and depthwise convolutions, ``cat``, ``clamp``,
``lut``, ``mul``, ``reshape``, ``transpose``, ``upsample_nearest``, ``conv_transpose2d`` and pools
with any window, dilation and ceil mode have their own kernels (:mod:`.vision_kernels`); ``matmul``,
``embedding``, ``slice``, ``softmax`` (masks, causal) and ``layernorm`` theirs
(:mod:`.transformer_kernels`), each a TIR kernel (no default legalization, no float).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fxquant import legality
from fxquant.backends.base import Problem, Target, refuse
from fxquant.backends.cpu import packing
from fxquant.backends.cpu.features import host_cpu, uses_vnni
from fxquant.errors import RunDirError
from fxquant.integer_graph import IntegerGraph
from fxquant.io import atomic_write_json

OPS = frozenset({"conv2d", "linear", "add", "avgpool2d", "maxpool2d", "relu", "flatten", "requantize", "mul_pow2",
                 "cat", "clamp", "lut", "mul", "reshape", "transpose", "upsample_nearest", "conv_transpose2d",
                 "matmul", "embedding", "slice", "softmax", "layernorm", "constant"})
UNSIGNED_READERS = ("matmul", "slice")
"""The kernels that read a uint8-stored (9-bit softmax) value."""
LIMITS: dict[str, Any] = {"act_bits": (2, packing.ACT_BITS), "weight_bits": (2, packing.MAX_WEIGHT_BITS),
                          "acc_bits": 32}


def kernel_problems(graph: IntegerGraph, vnni: bool) -> list[Problem]:
    """The int32 accumulator rule for the kernel each layer takes on a target with(out) VNNI."""
    problems = []
    for op in graph.ops:
        if op.kind == "conv2d" and op.weight is not None:
            bound = packing.conv_bound(op.weight, op.bias)
        elif op.kind == "linear" and op.weight is not None:
            w = np.asarray(op.weight).reshape(op.weight.shape[0], -1)
            kind = packing.linear_kind(w, vnni)
            bound = packing.linear_bound(kind, w, op.bias)
        elif op.kind in ("conv_transpose2d", "mul", "avgpool2d", "matmul"):  # avgpool: every window's sum times its M
            bound = graph.accumulator_bound(op)
        elif op.kind == "add":
            fl = max(graph.values[i].fmt.frac_bits or 0 for i in op.inputs)
            bound = packing.add_bound(tuple(fl - (graph.values[i].fmt.frac_bits or 0) for i in op.inputs))
        else:
            continue
        if not legality.fits(bound, LIMITS["acc_bits"]):
            problems.append(Problem(op.name, op.kind, f"worst-case accumulator {bound} exceeds int32"))
    return problems


def graph_problems(graph: IntegerGraph, vnni: bool) -> list[Problem]:
    """Every reason beyond the op kinds (:data:`OPS`) the CPU kernels cannot build ``graph``."""
    broken = legality.format_problems(graph)
    if broken:  # widths and bounds are meaningless without integer formats
        return broken
    return (storage_width_problems(graph)
            + legality.fit_problems(graph)
            + legality.shape_problems(graph, groups=True, add_arity=2, linear_any_rank=True)
            + legality.avg_window_problems(graph, reciprocal=True)
            + legality.window_problems(graph, dilation=True, ceil_mode=True)
            + layout_problems(graph)
            + kernel_problems(graph, vnni))


def storage_width_problems(graph: IntegerGraph) -> list[Problem]:
    """The width rule (:func:`fxquant.legality.width_problems`) on what this target stores as int8
    activations: token-id inputs are int32 tensors (any ``<BW,0>`` width) and a 9-bit softmax output
    (and a slice of it) is a uint8 tensor (``[0, 255]``), which only :data:`UNSIGNED_READERS` kernels
    (or the graph output) read."""
    from fxquant.backends.cpu.storage import id_inputs, unsigned_values

    ids, unsigned = id_inputs(graph), unsigned_values(graph)
    problems = [p for p in legality.width_problems(graph, weight_bits=LIMITS["weight_bits"],
                                                   act_bits=LIMITS["act_bits"])
                if not (p.kind == "input" and p.layer in ids) and p.layer not in {
                    op.name for op in graph.ops if op.output in unsigned}]
    for op in graph.ops:
        for i, name in enumerate(op.inputs):
            if name in ids and op.kind != "constant" and (op.kind != "embedding" or i != 0):
                problems.append(Problem(op.name, op.kind, f"reads the token ids {name!r} (int32 on this target); "
                                                          "only an embedding reads ids (a constant only their batch size)"))
            elif name in unsigned and op.kind not in UNSIGNED_READERS:
                problems.append(Problem(op.name, op.kind, f"reads the 9-bit softmax output {name!r} (uint8 on this "
                                                          f"target); only {', '.join(UNSIGNED_READERS)} read it: "
                                                          "use an output of at most 8 bits"))
    return problems


def layout_problems(graph: IntegerGraph) -> list[Problem]:
    """Shapes the element-wise and window kernels do not take: a ``mul`` broadcasting across ranks
    or along mismatched axes, a ``cat`` along the batch axis, windows on a value that is not an image."""
    problems = []
    for op in graph.ops:
        shapes = [tuple(graph.values[i].shape) for i in op.inputs]
        if op.kind == "mul":
            a, b = shapes
            if len(a) != len(b) or any(p != q and 1 not in (p, q) for p, q in zip(a, b)):
                problems.append(Problem(op.name, op.kind, f"mul of shapes {list(a)} x {list(b)}; this target "
                                                          "broadcasts equal-rank shapes only"))
        elif op.kind == "matmul":
            a, b = shapes
            if len(a) != len(b) or len(a) < 2 or any(p != q and 1 not in (p, q) for p, q in zip(a[:-2], b[:-2])):
                problems.append(Problem(op.name, op.kind, f"matmul of shapes {list(a)} x {list(b)}; this target "
                                                          "takes equal ranks >= 2 (leading dims equal or 1)"))
        elif op.kind == "cat":
            dim = op.attrs.get("dim", 1) % (len(shapes[0]) + 1)
            if dim == 0:
                problems.append(Problem(op.name, op.kind, "cat along the batch axis"))
        elif op.kind in ("maxpool2d", "avgpool2d", "upsample_nearest", "conv_transpose2d", "conv2d") \
                and len(shapes[0]) != 3:
            problems.append(Problem(op.name, op.kind, f"{op.kind} on a value of shape {list(shapes[0])}; "
                                                      "this target's kernel takes [batch, C, H, W]"))
    return problems


class CpuTarget(Target):
    name = "cpu"
    summary = "TVM shared library of fxquant's AVX2 / AVX-512 VNNI integer kernels (x86-64)"
    ran = "the TVM CPU library (fxquant_cpu.so) on this host's CPU"
    ops = OPS
    limits = LIMITS
    option_defaults = {"mcpu": "host"}

    def unavailable(self) -> str | None:
        info = host_cpu()
        if not info.has_avx2:
            return f"host CPU {info.model!r} has no AVX2 + FMA (the kernels need x86-64-v3)"
        from tvm.support.cc import get_cc

        if get_cc() is None:
            return "no C++ compiler (g++, clang++ or $CXX) to link the TVM library"
        return None

    def check_graph(self, graph: IntegerGraph, mcpu: str = "host") -> list[Problem]:
        return graph_problems(graph, uses_vnni(mcpu))

    def build(self, graph: IntegerGraph, out_dir: Path, mcpu: str = "host") -> dict[str, Any]:
        from fxquant.backends.cpu.build import ENTRY, LIBRARY, PARAMS, compile_graph, save_params
        from fxquant.backends.cpu.features import resolve_target
        from fxquant.io import atomic_write_via_path

        problems = self.check(graph, mcpu=mcpu)
        if problems:
            raise refuse(self, problems)
        out_dir = Path(out_dir)
        llvm = resolve_target(mcpu)
        ex, params = compile_graph(graph, llvm)
        atomic_write_via_path(out_dir / LIBRARY, ex.export_library)
        save_params(out_dir / PARAMS, params)
        entry = {"entry": "main(float32 inputs | int32 token ids..., p0, p1, ...) -> int8 output integers",
                 "llvm": {"mcpu": llvm.mcpu, "vnni": llvm.vnni, "target": llvm.tvm_target()},
                 "inputs": [input_spec(graph, v.name) for v in graph.inputs],
                 "outputs": list(graph.outputs), "params": sorted(params, key=lambda k: int(k[1:]))}
        atomic_write_json(out_dir / ENTRY, entry)
        return {"library": LIBRARY, "params": PARAMS, "entry_file": ENTRY, **entry,
                "param_bytes": int(sum(p.nbytes for p in params.values())), "host_cpu": host_cpu().to_dict()}

    def run(self, out_dir: Path, int_inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        from fxquant.backends.cpu.build import ENTRY, CpuModel
        from fxquant.backends.cpu.features import LlvmCpu, check_runnable

        out_dir = Path(out_dir)
        try:
            entry = json.loads((out_dir / ENTRY).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{out_dir} holds no CPU build ({ENTRY} unreadable: {exc})",
                              "run `fxquant export --target cpu` first") from exc
        # code for a CPU this host lacks would die with SIGILL: refuse it first
        check_runnable(LlvmCpu(entry["llvm"]["mcpu"], entry["llvm"]["vnni"]))
        xs = [model_input(k, spec) for k, spec in zip(int_inputs, entry["inputs"], strict=True)]
        return CpuModel.load(out_dir).run(*xs)


def input_spec(graph: IntegerGraph, name: str) -> dict[str, Any]:
    """An input's entry in ``entry.json``: name, shape, format, and the dtype ``main`` takes (float32;
    int32 token ids with the ``vocab`` of the embedding that reads them)."""
    from fxquant.backends.cpu.storage import IDS_DTYPE, id_inputs

    v = graph.value(name)
    spec: dict[str, Any] = {"name": v.name, "shape": ["n", *v.shape], "frac_bits": v.fmt.frac_bits,
                            "bits": v.fmt.bits, "dtype": "float32"}
    if name in id_inputs(graph):
        spec["dtype"] = IDS_DTYPE
        spec["vocab"] = min(int(op.weight.shape[0]) for op in graph.ops
                            if op.kind == "embedding" and op.inputs[0] == name)
    return spec


def model_input(k: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """What ``main`` takes for the integers ``k`` of one input: ``k 2^-FL`` in float32 (its input
    quantizer gives ``k`` back), or the token ids themselves as int32, refused outside ``[0, vocab)``
    (the kernel never reads outside its table; ids are never clipped)."""
    from fxquant.errors import InputRangeError

    k = np.asarray(k)
    if spec.get("dtype", "float32") == "float32":
        return np.ldexp(k.astype(np.float64), -spec["frac_bits"]).astype(np.float32)
    vocab = int(spec["vocab"])
    bad = (k != np.floor(k)) | (k < 0) | (k >= vocab) if k.size else np.zeros(0, bool)
    if bad.any():
        raise InputRangeError(f"input {spec['name']!r} holds {k[bad].reshape(-1)[0]!r}, not a token id in [0, {vocab})",
                              "feed integer ids of this vocabulary; ids are never rounded or clipped")
    return k.astype(spec["dtype"])


__all__ = ["CpuTarget", "graph_problems", "input_spec", "kernel_problems", "model_input", "storage_width_problems"]
