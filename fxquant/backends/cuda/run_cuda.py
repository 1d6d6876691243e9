"""Standalone GPU-host runner of an fxquant CUDA export (copied into the export directory).

Needs only ``numpy``, ``torch`` (CUDA) and the ``apache-tvm-ffi`` wheel -- not fxquant, not TVM.
In the export directory (``kernels.so``, ``plan.json``, ``params.npz``, ``reference.npz``; for the
latency table also ``baseline_weights.npz`` and, optionally, ``fp32.onnx``)::

    python run_cuda.py [--batches 1 64 256] [--iters 200] [--json cuda_bench.json] [--verify-only]

1. **Bit-exactness**: runs ``reference.npz``'s inputs (``input:<name>`` per graph input: float32, or
   int32 token ids for an input read only by embeddings) through the kernels (as they are,
   and repeated up to ``plan["large_batch"]`` for the large-batch kernels) and compares the int8
   outputs with the integer reference (``IntegerGraph.run``) saved at export; any difference
   exits with status 1.
2. **Latency** per batch size, p50 of ``--iters`` runs timed with CUDA events: fxquant kernels
   replayed from a CUDA graph (and eager), torch FP32 and bf16 eager (and CUDA graph) of the same
   network with the dequantized weights (``plan.json["float_graph"]``), and ONNX Runtime's CUDA
   execution provider on ``fp32.onnx`` when ``onnxruntime-gpu`` is installed. Prints a Markdown
   table and writes the JSON (atomically).

:class:`PlanRunner` executes ``plan.json`` with any array library; fxquant's CPU check of the
kernels' integer logic (:mod:`fxquant.backends.cuda.cpu_check`) runs the same class on numpy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


class PlanRunner:
    """Runs the launches of ``plan.json``: ``kernel(*args, out)`` in order, flatten as reshapes;
    from batch ``plan["large_batch"]`` on, a launch's ``kernel_large`` variant when it has one.

    ``kernel(name)`` returns a callable; ``empty(shape, dtype)`` allocates an integer tensor (``dtype``
    ``"int8"``, or ``"int16"`` for 9..16-bit activations); ``params``
    maps parameter names to tensors. :meth:`buffers` allocates every launch output for one batch
    size (so a CUDA graph can replay :meth:`run` on fixed memory).
    """

    def __init__(self, plan: dict[str, Any], kernel: Callable[[str], Callable[..., Any]],
                 empty: Callable[[tuple[int, ...]], Any], params: dict[str, Any]) -> None:
        self.plan, self.empty, self.params = plan, empty, params
        names = {name for launch in plan["launches"] for name in (launch["kernel"], launch["kernel_large"]) if name}
        self.kernels = {name: kernel(name) for name in names}

    def buffers(self, n: int) -> dict[str, Any]:
        return {launch["out"]: self.empty((n, *launch["out_shape"]), launch.get("out_dtype", "int8"))
                for launch in self.plan["launches"]}

    def _value(self, env: dict[str, Any], name: str) -> Any:
        view = self.plan["views"].get(name)
        if view is None:
            return env[name]
        src = self._value(env, view["input"])
        return src.reshape((src.shape[0], *view["shape"]))

    def run(self, inputs: dict[str, Any], bufs: dict[str, Any]) -> list[Any]:
        """Outputs (in ``plan["outputs"]`` order) for float32 ``inputs`` keyed by input name."""
        env = dict(bufs)
        large = next(iter(inputs.values())).shape[0] >= self.plan["large_batch"]
        for launch in self.plan["launches"]:
            args = []
            for a in launch["args"]:
                kind, _, name = a.partition(":")
                args.append(inputs[name] if kind in ("float", "int") else self.params[name] if kind == "param"
                            else self._value(env, a))
            name = launch["kernel_large"] if large and launch["kernel_large"] else launch["kernel"]
            self.kernels[name](*args, env[launch["out"]])
        return [self._value(env, name) for name in self.plan["outputs"]]


def _atomic_write_text(path: Path, text: str) -> None:
    """Temp file + ``os.replace`` (this script runs without fxquant, so not ``fxquant.io``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _float_function(name: str | None, params: dict[str, Any]) -> Callable[[Any], Any]:
    """The float function a ``lut`` op tabulates (torch's definition), identity for an unknown name."""
    import torch
    import torch.nn.functional as F

    known: dict[str, Callable[[Any], Any]] = {
        "sigmoid": torch.sigmoid, "tanh": torch.tanh, "silu": F.silu, "hardsigmoid": F.hardsigmoid,
        "hardswish": F.hardswish, "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "mish": F.mish, "softplus": F.softplus, "elu": lambda x: F.elu(x, **params),
        "leaky_relu": lambda x: F.leaky_relu(x, **params), "exp": torch.exp, "relu6": F.relu6,
        "hardtanh": lambda x: F.hardtanh(x, **params)}
    return known.get(name or "", lambda x: x)


def torch_float_model(plan: dict[str, Any], ints: dict[str, Any], dtype: Any) -> Callable[[dict[str, Any]], list[Any]]:
    """The float network of ``plan["float_graph"]`` in ``dtype``, weights ``k * 2^-FL`` from their
    integers; called with the float inputs by name."""
    import torch
    import torch.nn.functional as F

    params = {}
    for op in plan["float_graph"]:
        for key in ("weight", "bias"):
            if op[key] is not None:
                params[op[key]] = (ints[op[key]].double() * 2.0 ** -op[f"{key}_frac_bits"]).to(dtype)

    def forward(inputs: dict[str, Any]) -> list[Any]:
        env = dict(inputs)
        for op in plan["float_graph"]:
            xs, a = [env[i] for i in op["inputs"]], op["attrs"]
            kind = op["kind"]
            if kind == "conv2d":
                y = F.conv2d(xs[0], params[op["weight"]], params.get(op["bias"]), a.get("stride", 1),
                             a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1))
            elif kind == "conv_transpose2d":
                y = F.conv_transpose2d(xs[0], params[op["weight"]], params.get(op["bias"]), a.get("stride", 1),
                                       a.get("padding", 0), a.get("output_padding", 0), a.get("groups", 1),
                                       a.get("dilation", 1))
            elif kind == "linear":
                y = F.linear(xs[0], params[op["weight"]], params.get(op["bias"]))
            elif kind == "add":
                y = xs[0] + xs[1]
            elif kind == "mul":
                y = xs[0] * xs[1]
            elif kind == "matmul":
                y = torch.matmul(xs[0], xs[1])
            elif kind == "cat":
                y = torch.cat(xs, a.get("dim", 1))
            elif kind == "maxpool2d":
                y = F.max_pool2d(xs[0], a["kernel"], a.get("stride", a["kernel"]), a.get("padding", 0),
                                 a.get("dilation", 1), bool(a.get("ceil_mode", False)))
            elif kind == "avgpool2d":
                y = F.avg_pool2d(xs[0], a["kernel"], a.get("stride", a["kernel"]), a.get("padding", 0),
                                 bool(a.get("ceil_mode", False)))
            elif kind == "clamp":
                lsb = 2.0 ** -a["frac_bits"]
                y = torch.clamp(xs[0], None if a.get("lo") is None else a["lo"] * lsb,
                                None if a.get("hi") is None else a["hi"] * lsb)
            elif kind == "lut":
                y = _float_function(a.get("function"), a.get("params") or {})(xs[0])
            elif kind == "mul_pow2":
                y = xs[0] * 2.0 ** a["exponent"]
            elif kind == "transpose":
                y = xs[0].permute(0, *(p + 1 for p in a["perm"]))
            elif kind == "upsample_nearest":
                y = F.interpolate(xs[0], scale_factor=tuple(float(f) for f in a["scale"]), mode="nearest")
            elif kind == "embedding":
                y = F.embedding(xs[0].long(), params[op["weight"]])
            elif kind == "constant":
                y = params[op["weight"]].unsqueeze(0).expand(xs[0].shape[0], *op["shape"])
            elif kind == "slice":
                dim = a["dim"]
                y = (xs[0].select(dim, a["index"]) if "index" in a
                     else xs[0].narrow(dim, a["start"], a["stop"] - a["start"])[(slice(None),) * dim + (slice(None, None, a.get("step", 1)),)])
            elif kind == "softmax":
                s = xs[0]
                keep = torch.ones_like(s, dtype=torch.bool)
                if len(xs) > 1:
                    keep = keep & (xs[1] != 0)
                if a.get("causal"):
                    keep = keep & torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
                y = torch.softmax(s.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
            elif kind == "layernorm":
                y = F.layer_norm(xs[0], xs[0].shape[-1:], params[op["weight"]], params.get(op["bias"]), a["eps_float"])
            elif kind in ("flatten", "reshape"):
                y = xs[0].reshape(xs[0].shape[0], *op["shape"])
            else:  # relu, requantize
                y = xs[0]
            env[op["output"]] = torch.relu(y) if a.get("relu") or kind == "relu" else y
        return [env[name] for name in plan["outputs"]]

    return forward


def p50_us(fn: Callable[[], Any], iters: int, warmup: int = 10) -> float:
    """Median of ``iters`` CUDA-event-timed calls of ``fn`` (microseconds)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def graph_replay(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` captured once in a CUDA graph; returns the replay function."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def ort_cuda(path: Path) -> Callable[[dict[str, Any]], Callable[[], Any]] | None:
    """ORT CUDA-EP runner factory over torch CUDA tensors by input name (IO binding), or None without it."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if not path.exists() or "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]

    def make(xs: dict[str, Any]) -> Callable[[], Any]:
        binding = sess.io_binding()
        for name, x in xs.items():
            binding.bind_input(name, "cuda", 0, np.float32, list(x.shape), x.data_ptr())
        for o in out_names:
            binding.bind_output(o, "cuda")
        return lambda: sess.run_with_iobinding(binding)

    return make


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=HERE)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 64, 256])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json", type=Path, default=None, help="default: <dir>/cuda_bench.json")
    ap.add_argument("--verify-only", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import tvm_ffi

    d = args.dir
    if not (d / "reference.npz").is_file():
        print(f"error: {d / 'reference.npz'} is missing (hint: export again: every CUDA build writes it)", file=sys.stderr)
        return 2
    plan = json.loads((d / "plan.json").read_text())
    dev = torch.device("cuda")
    with np.load(d / "params.npz") as f:
        params = {k: torch.from_numpy(f[k]).to(dev) for k in f.files}
    lib = tvm_ffi.load_module(str(d / "kernels.so"))
    runner = PlanRunner(plan, lambda name: lib[name],
                        lambda shape, dtype: torch.empty(shape, dtype=getattr(torch, dtype), device=dev), params)
    specs = plan["input_specs"]
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}

    with np.load(d / "reference.npz") as ref:
        x = {s["name"]: torch.from_numpy(ref[f"input:{s['name']}"]).to(dev) for s in specs}
        samples = int(next(iter(x.values())).shape[0])
        # the samples as they are, and repeated up to the large-batch kernels' batch size
        mismatches = {}
        for reps in (1, -(-plan["large_batch"] // samples)):
            xs = {k: v.repeat(reps, *[1] * (v.dim() - 1)) for k, v in x.items()}
            got = runner.run(xs, runner.buffers(samples * reps))
            torch.cuda.synchronize()
            for name, g in zip(plan["outputs"], got):
                want = np.tile(ref[f"output:{name}"], (reps,) + (1,) * (g.dim() - 1))
                mismatches[f"{name}@batch{samples * reps}"] = int((g.cpu().numpy().astype(np.int64) != want).sum())
    result["verification"] = {"samples": samples, "mismatches": mismatches,
                              "bit_exact": not any(mismatches.values())}
    print(f"bit-exact on {samples} samples: {result['verification']['bit_exact']} {mismatches}")
    out = args.json or d / "cuda_bench.json"
    if not result["verification"]["bit_exact"] or args.verify_only:
        _atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        return 0 if result["verification"]["bit_exact"] else 1

    with np.load(d / "baseline_weights.npz") as f:
        ints = {k: torch.from_numpy(f[k]).to(dev) for k in f.files}
    fp32, bf16 = torch_float_model(plan, ints, torch.float32), torch_float_model(plan, ints, torch.bfloat16)
    ort_make = ort_cuda(d / "fp32.onnx")
    print("| batch | backend | p50 us | x torch fp32 eager |\n|---|---|---|---|")
    with torch.inference_mode():
        for n in args.batches:
            xb = {s["name"]: (torch.randint(0, s["rows"], (n, *s["shape"]), dtype=torch.int32, device=dev)
                              if s.get("dtype") == "int32" else torch.randn((n, *s["shape"]), device=dev)) for s in specs}
            xh = {k: v if v.dtype == torch.int32 else v.to(torch.bfloat16) for k, v in xb.items()}
            bufs = runner.buffers(n)
            cases: dict[str, Callable[[], Any]] = {
                "torch fp32 eager": lambda: fp32(xb), "torch bf16 eager": lambda: bf16(xh),
                "fxquant eager": lambda: runner.run(xb, bufs)}
            cases["fxquant graph"] = graph_replay(cases["fxquant eager"])
            cases["torch fp32 graph"] = graph_replay(cases["torch fp32 eager"])
            cases["torch bf16 graph"] = graph_replay(cases["torch bf16 eager"])
            if ort_make is not None:
                cases["ORT CUDA EP fp32"] = ort_make(xb)
            base = None
            for name, fn in cases.items():
                us = p50_us(fn, args.iters)
                base = us if name == "torch fp32 eager" else base
                result["rows"].append({"batch": n, "backend": name, "p50_us": round(us, 2)})
                print(f"| {n} | {name} | {us:.1f} | {us / base:.3f} |")
    _atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
