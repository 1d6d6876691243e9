"""The FPGA target: an IntegerGraph as a Vitis HLS C++ project, C-simulated with g++.

The contract (:mod:`fxquant.backends.base`): ``check`` lists every limit a graph breaks
(:func:`.plan.graph_problems`: the :mod:`fxquant.legality` rules, then each layer's own plan);
``build`` writes the project (:func:`.codegen.generate_project`, seeded golden vectors in
``tb_data/``), compiles the C model and the testbench with g++ (:func:`.csim.build`, products in
``build/``), runs the testbench on the golden vectors (a failure raises) and returns the analytic
resource estimates (:func:`.estimates.estimate`) with the project facts. Everything is relative to
``out_dir`` (``Makefile`` names the ``ap_types`` headers' directory, a tool path outside it).
``fxq_io.json`` holds the top function's inputs and outputs in graph order (name, shape, format;
``token_ids``: the vocabulary size of an input an ``embedding`` reads).

``run`` compiles the moved project again only if its sources changed (the build is keyed by a
hash of them), checks token ids against their vocabulary (never clipped), calls ``fxq_run_batch``
through ctypes on every input's integers concatenated in graph order and splits the outputs.

Limits: values and weights 2..16 bits (``ap_int<BW>``), accumulators of at most 64 bits, two-input
``add``, ``mul`` and ``matmul``, tables on at most 12-bit inputs, every graph output computed by an
op (:mod:`.plan` lists every op kind's form and limits).
"""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fxquant.backends.base import Problem, Target, refuse
from fxquant.backends.fpga import plan as fpga_plan
from fxquant.errors import ExportError, InputRangeError, RunDirError, UsageError
from fxquant.integer_graph import IntegerGraph
from fxquant.io import atomic_write_json

IO_FILE = "fxq_io.json"


class FpgaTarget(Target):
    name = "fpga"
    summary = "Vitis HLS C++ project (ap_int, fixed fxq_* headers), C-simulated with g++; resource estimates"
    ran = "the generated HLS C++ model compiled with g++ (C simulation on the CPU), called through ctypes"
    ops = frozenset(fpga_plan.SUPPORTED_KINDS)
    limits = {"act_bits": (2, fpga_plan.MAX_BITS), "weight_bits": (2, fpga_plan.MAX_BITS),
              "acc_bits": fpga_plan.MAX_ACC_BITS}
    option_defaults = {"part": "xcu250-figd2104-2L-e", "clock_ns": 5.0, "reuse": 1, "io": "parallel"}

    def unavailable(self) -> str | None:
        from fxquant.backends.fpga.csim import ap_types_dir, compiler
        from fxquant.errors import ToolchainError

        try:
            compiler()
            ap_types_dir()
        except ToolchainError as exc:
            return exc.message
        return None

    def check_graph(self, graph: IntegerGraph, part: str = "xcu250-figd2104-2L-e", clock_ns: float = 5.0,
                    reuse: int = 1, io: str = "parallel") -> list[Problem]:
        from fxquant.backends.fpga.codegen import _check_options

        _check_options(part, clock_ns, reuse, io)
        return fpga_plan.graph_problems(graph)

    def build(self, graph: IntegerGraph, out_dir: Path, part: str = "xcu250-figd2104-2L-e", clock_ns: float = 5.0,
              reuse: int = 1, io: str = "parallel") -> dict[str, Any]:
        from fxquant.backends.fpga import csim
        from fxquant.backends.fpga.codegen import GOLDEN_SAMPLES, TOP, generate_project
        from fxquant.backends.fpga.estimates import estimate

        problems = self.check(graph, part=part, clock_ns=clock_ns, reuse=reuse, io=io)
        if problems:
            raise refuse(self, problems)
        out_dir = Path(out_dir)
        generate_project(graph, out_dir, part=part, clock_ns=clock_ns, reuse=reuse, io=io)
        model = csim.build(out_dir)
        if not model.run_testbench():
            raise ExportError(f"the generated testbench fails on its {GOLDEN_SAMPLES} golden vectors "
                              f"(C model vs IntegerGraph.run) in {out_dir}", "report this as an FPGA backend bug")
        vocab = {op.inputs[0]: op.weight.shape[0] for op in graph.ops if op.kind == "embedding"}
        io_spec = {"top": TOP,
                   "inputs": [{"name": v.name, "shape": list(v.shape), **v.fmt.to_dict(),
                               **({"token_ids": int(vocab[v.name])} if v.name in vocab else {})}
                              for v in graph.inputs],
                   "outputs": [{"name": o, "shape": list(graph.value(o).shape), **graph.value(o).fmt.to_dict()}
                               for o in graph.outputs]}
        atomic_write_json(out_dir / IO_FILE, io_spec)
        return {**io_spec, "part": part, "clock_ns": clock_ns, "reuse": reuse, "io": io,
                "project": ".", "sources": [f"firmware/{TOP}.cpp", f"firmware/{TOP}.h", "firmware/defines.h",
                                            "firmware/parameters.h", "tb/fxq_tb.cpp", "bridge.cpp",
                                            "build_prj.tcl", "Makefile"],
                "library": model.library.relative_to(out_dir.resolve()).as_posix(),
                "testbench": model.testbench.relative_to(out_dir.resolve()).as_posix(),
                "testbench_ok": True, "golden_samples": GOLDEN_SAMPLES,
                "compile_seconds": round(model.build_seconds, 3),
                "estimates": estimate(fpga_plan.plan_graph(graph), part=part, clock_ns=clock_ns, reuse=reuse, io=io)}

    def run(self, out_dir: Path, int_inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        from fxquant.backends.fpga import csim

        out_dir = Path(out_dir)
        try:
            spec = json.loads((out_dir / IO_FILE).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{out_dir} holds no FPGA build ({IO_FILE} unreadable: {exc})",
                              "run `fxquant export --target fpga` first") from exc
        ins, outs = spec["inputs"], spec["outputs"]
        if len(int_inputs) != len(ins):
            raise UsageError(f"the FPGA build in {out_dir} takes {len(ins)} input(s) "
                             f"({', '.join(v['name'] for v in ins)}), got {len(int_inputs)}")
        xs = [np.asarray(x, np.int64) for x in int_inputs]
        n = len(xs[0])
        for v, x in zip(ins, xs):
            if x.shape != (n, *v["shape"]):
                raise UsageError(f"input {v['name']!r} has shape {x.shape}, expected ({n}, "
                                 f"{', '.join(map(str, v['shape']))})")
            if "token_ids" in v and x.size and (x.min() < 0 or x.max() >= v["token_ids"]):
                bad = x[(x < 0) | (x >= v["token_ids"])]
                raise InputRangeError(f"input {v['name']!r}: token id {int(bad[0])} outside [0, {v['token_ids']})",
                                      "feed ids of this vocabulary; ids are never clipped")
        sizes = [int(np.prod(o["shape"])) for o in outs]
        y = csim.build(out_dir).run(np.concatenate([x.reshape(n, -1) for x in xs], axis=1), n_outputs=sum(sizes))
        bounds = np.cumsum([0] + sizes)
        return [y[:, lo:hi].reshape(n, *o["shape"]) for lo, hi, o in zip(bounds[:-1], bounds[1:], outs)]




__all__ = ["FpgaTarget"]
