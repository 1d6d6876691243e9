"""Side-by-side CPU latency of a run: PyTorch eager FP32, ORT FP32, ORT QDQ and fxquant-TVM, one process.

Only verified artifacts are timed (:func:`fxquant.bench.verified_artifact_dir`): the TVM library
is loaded from ``RUN/cpu/`` after the ``cpu`` target's report certifies it bit-exact for the run's
integer graph and a re-run on held-out inputs (through the target's ``run``) agrees; the QDQ model
likewise from ``RUN/onnx-qdq/``. The float baselines (PyTorch eager on the trained float model,
ORT on ``RUN/onnx-fp32/``) are not integer-exact and are marked ``verified: false``.

For each batch size the engines are timed in turns (:func:`fxquant.bench.time_runners`); reported
per engine: p50 / p90 latency in ms, throughput (inputs/s at p50), and the ratio to ORT FP32 at
p50. **Every engine runs with the same thread count** ``threads`` (default: the host's cores):
ORT ``intra_op_num_threads``, ``torch.set_num_threads`` and TVM's thread pool
(:func:`~fxquant.backends.cpu.build.set_tvm_threads`, checked). Every engine takes the same numpy inputs, one array per model
input (float32, or int64 token ids: :func:`fxquant.bench.batch_inputs`), in the dtype it declares,
and returns numpy (fxquant-TVM quantizes a float input in its first kernel and takes token ids as
int32; each input is copied into a reused TVM tensor, the output read through DLPack); these
copies are part of each call. Every figure is
written with the CPU model and flags (:func:`fxquant.bench.machine`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fxquant.bench import (Engine, as_inputs, baseline_engine, machine, onnx_engine, time_engines, time_runners,
                           verified_artifact_dir, write_bench)
from fxquant.backends.cpu.build import set_tvm_threads

REFERENCE = "ORT FP32"
def tvm_runner(model: Any, x: np.ndarray | Sequence[np.ndarray]) -> Callable[[], Any]:
    """One call of a loaded CPU module on its inputs ``x`` (one array, or one per module input: each
    staged in the dtype the module's entry declares, float32, or int32 for token ids, which must be
    integral; outputs read through DLPack)."""
    xs = as_inputs(x)
    if model.input_dtypes and len(xs) != len(model.input_dtypes):
        from fxquant.errors import ExportError

        raise ExportError(f"the CPU module takes {len(model.input_dtypes)} inputs, bench has {len(xs)}",
                          "run `fxquant export --target cpu` again")

    def run() -> Any:
        out = model.run_tvm(*[model.staged(i, xi) for i, xi in enumerate(xs)])
        return np.from_dlpack(out) if hasattr(out, "numpy") else [np.from_dlpack(o) for o in out]

    return run


def cpu_engine(dep: Any, threads: int) -> Engine:
    """fxquant-TVM on the verified ``RUN/cpu`` library (the files the cpu target built and verified)."""
    from fxquant.backends.cpu.build import CpuModel
    from fxquant.backends.registry import get_target

    target = get_target("cpu")
    out_dir, report = verified_artifact_dir(target, dep)
    model = CpuModel.load(out_dir)  # what CpuTarget.run loads, after its host check
    return Engine("fxquant-TVM", f"{target.name}/{report['artifact']['library']}", report["graph_fingerprint"],
                  True, lambda x: tvm_runner(model, x))


def torch_engine(dep: Any, threads: int) -> Engine:
    """PyTorch eager on the trained float model (quantizers stripped, BN folded)."""
    import torch

    from fxquant.backends.base import graph_fingerprint
    from fxquant.passes import StripQuantizers

    float_model = copy.deepcopy(dep.model)
    StripQuantizers()(float_model)
    float_model.eval()
    torch.set_num_threads(threads)

    def make(x: np.ndarray | Sequence[np.ndarray]) -> Callable[[], Any]:
        # float inputs as float32, integer ones (token ids) as int64, as the model was trained on them
        xts = [torch.from_numpy(np.ascontiguousarray(xi, np.int64 if np.issubdtype(xi.dtype, np.integer)
                                                     else np.float32)) for xi in as_inputs(x)]

        def run() -> Any:
            with torch.inference_mode():
                return float_model(*xts)

        return run

    return Engine("PyTorch eager FP32", f"(trained float model of {dep.model_file.path.name})",
                  graph_fingerprint(dep.graph), False, make)


def bench_cpu(run_dir: Path, *, batches: tuple[int, ...] = (1, 64), threads: int | None = None,
              budget_s: float = 2.0) -> dict[str, Any]:
    """Time every engine on the run's verified artifacts; write ``RUN/bench-cpu.json`` / ``.md``.

    The returned report carries the markdown table under ``"markdown"`` (the CLI prints it).
    """
    from fxquant.backends.registry import get_target
    from fxquant.deployment import load_deployment

    threads = threads or os.cpu_count() or 1
    tvm_threads = set_tvm_threads(threads)  # before any TVM run sizes the pool
    dep = load_deployment(run_dir)
    engines = [cpu_engine(dep, threads), onnx_engine(get_target("onnx-qdq"), dep, threads, "ORT fxquant QDQ"),
               baseline_engine(dep, threads), torch_engine(dep, threads)]
    engines = [engines[2], engines[3], engines[1], engines[0]]  # ORT FP32 first: the ratio's reference
    x_all, _ = dep.held_out(max(batches))
    rows = time_engines(engines, x_all, batches, budget_s)
    sizes = {e.artifact: (dep.run.path / e.artifact).stat().st_size for e in engines
             if (dep.run.path / e.artifact).is_file()}
    result = {"target": "cpu", "machine": machine(threads), "tvm_num_threads": tvm_threads,
              "ort_intra_op_threads": threads, "torch_threads": threads, "rows": rows, "sizes_bytes": sizes}
    return write_bench(dep.run.path, "cpu", result, markdown(result))


def markdown(result: dict[str, Any]) -> str:
    from fxquant.bench import render_markdown

    m = result["machine"]
    table = render_markdown(f"CPU: {m['cpu']} ({m['cores']} cores; {' '.join(m['flags'])})", result["rows"],
                            m["threads"])
    lines = ["", "| artifact | bytes |", "|---|---:|"] + [f"| `{k}` | {v} |" for k, v in result["sizes_bytes"].items()]
    return table + "\n".join(lines) + "\n"





def bench_depthwise(channels: int = 144, size: int = 56, stride: int = 1, batch: int = 1, threads: int = 1,
                    budget_s: float = 3.0, seed: int = 0) -> dict[str, Any]:
    """One MobileNetV2-like depthwise 3x3 layer (``channels`` x ``size``^2, padding 1, + bias + ReLU),
    three engines timed in turns in this process with ``threads`` threads each:

    * ``depthwise`` -- :func:`.vision_kernels.grouped_conv2d` (groups = channels);
    * ``dense zeros`` -- the groups=1 :func:`.kernels.conv2d` on the same layer written as a dense
      ``[C, C, 3, 3]`` weight that is zero off the diagonal (what a backend without grouped
      kernels would run);
    * ``ORT FP32`` -- onnxruntime ``Conv(group=C)`` on float32 (the reference of the ratios).

    Both TVM kernels are checked bit-exact against ``IntegerGraph.run`` of the layer first.
    """
    import onnx
    import onnxruntime as ort
    import tvm
    from onnx import TensorProto, helper

    from fxquant.backends.cpu import kernels, packing, vision_kernels
    from fxquant.backends.cpu.features import resolve_target
    from fxquant.backends.tvm_epilogue import Requant
    from fxquant.fixed_point import FixedPoint
    from fxquant.integer_graph import IntegerGraph, Op, Value

    rng = np.random.default_rng(seed)
    c, k = channels, 3
    x = rng.integers(-128, 128, (batch, c, size, size)).astype(np.int8)
    w = rng.integers(-128, 128, (c, 1, k, k))
    bias = rng.integers(-4000, 4000, c)
    rq = Requant(-9, 8, True)
    graph_in = Value("x", (c, size, size), FixedPoint(8, 4))
    oh = (size + 2 - k) // stride + 1
    op = Op("dw", "conv2d", ("x",), "y", FixedPoint(8, 4 + 7 - 9), weight=w, weight_fmt=FixedPoint(8, 7), bias=bias,
            attrs={"stride": (stride, stride), "padding": (1, 1), "groups": c, "relu": True})
    graph = IntegerGraph([graph_in], [op], ["y"], {"x": graph_in, "y": Value("y", (c, oh, oh), op.out_fmt)})
    expected = graph.run(x.astype(np.int64))["y"]

    target = {"kind": "llvm", "mcpu": resolve_target("host").mcpu, "num-cores": threads}
    set_tvm_threads(threads)
    y = tvm.runtime.empty((batch, c, oh, oh), "int8")
    xt = tvm.runtime.tensor(x)
    dshape = vision_kernels.GroupConvShape(c, size, size, c, c, (k, k), (stride, stride), (1, 1))
    dw = tvm.compile(vision_kernels.grouped_conv2d(dshape, rq), target=target)
    dw_args = [xt, tvm.runtime.tensor(packing.pack_tap_pairs(w)), tvm.runtime.tensor(bias.astype(np.int32)), y]
    dense_w = np.zeros((c, c, k, k), np.int64)
    dense_w[np.arange(c), np.arange(c)] = w[:, 0]
    cshape = kernels.ConvShape(c, size, size, c, (k, k), (stride, stride), (1, 1))
    dense = tvm.compile(kernels.conv2d(cshape, rq), target=target)
    dense_args = [xt, tvm.runtime.tensor(packing.pack_conv_weight(dense_w, cshape.block[0])),
                  tvm.runtime.tensor(bias.astype(np.int32)), y]
    for lib, args, name in ((dw, dw_args, "fxq_gconv2d"), (dense, dense_args, "fxq_conv2d")):
        lib[name](*args)
        if not np.array_equal(y.numpy().astype(np.int64), expected):
            raise AssertionError(f"{name} differs from IntegerGraph.run")

    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], group=c, pads=[1, 1, 1, 1], strides=[stride, stride],
                            kernel_shape=[k, k])
    model = helper.make_model(helper.make_graph(
        [node, helper.make_node("Relu", ["y"], ["z"])], "dw",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, size, size])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [c, 1, k, k], (w / 128.0).astype(np.float32).ravel()),
         helper.make_tensor("b", TensorProto.FLOAT, [c], (bias / 2**11).astype(np.float32))]),
        opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(onnx._serialize(model) if hasattr(onnx, "_serialize") else model.SerializeToString(),
                                opts, providers=["CPUExecutionProvider"])
    xf = (x / 16.0).astype(np.float32)
    runners = {"ORT FP32": lambda: sess.run(None, {"x": xf}),
               "depthwise": lambda: dw["fxq_gconv2d"](*dw_args),
               "dense zeros": lambda: dense["fxq_conv2d"](*dense_args)}
    times = time_runners(runners, budget_s)
    p50 = {name: float(np.percentile(t, 50)) for name, t in times.items()}
    return {"layer": {"channels": c, "size": size, "stride": stride, "kernel": k, "batch": batch},
            "machine": machine(threads), "tvm_threads": threads, "ort_intra_op_threads": threads,
            "p50_us": {n: v * 1e6 for n, v in p50.items()},
            "ratio_vs_ort_fp32": {n: v / p50["ORT FP32"] for n, v in p50.items()},
            "depthwise_speedup_vs_dense": p50["dense zeros"] / p50["depthwise"]}
__all__ = ["bench_cpu", "bench_depthwise", "set_tvm_threads", "time_runners", "tvm_runner"]
