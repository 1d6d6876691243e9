"""``fxquant bench``: latency of *verified* artifacts only, side by side with their float baselines.

Order (the backend contract, :mod:`fxquant.backends.base`): for each integer artifact a bench
times, :func:`verified_artifact_dir` first makes sure ``RUN/<target>/report.json`` certifies a
bit-exact export of exactly the run's integer graph (exporting it, with the reference check
against the trained model and verification, when it is missing or was made from another graph),
then re-runs the artifact on held-out inputs against :meth:`IntegerGraph.run` (a file changed
after export is caught here). Any failure is an :class:`~fxquant.errors.ExportError`: one line,
exit 2, nothing timed.

Timing (:func:`time_runners`): blocks of calls per engine after a warm-up, the engines taking
turns for three rounds, so a noisy shared machine slows all of them alike; p50 / p90 latency (ms),
throughput (inputs/s at p50), ratio to the first engine (the float baseline) at p50. Every engine in
one table runs with the **same thread count** (``threads``, default the host's cores; stated in
the table). Every row names its artifact (path relative to ``RUN``), the graph fingerprint and
``verified`` (``false`` only for the float baselines, which are not integer-exact by design).
Ratios are taken within one run, never across machines.

Inputs (:func:`batch_inputs`): one array per model input, batch first, in the dtype the held-out
data have (float32, or int64 token ids); a batch larger than the held-out set repeats its rows
whole (``np.resize``), so token ids stay ids of the vocabulary. Each engine feeds every input in the
dtype its artifact declares (ORT: the session input's element type, :func:`feed_as`; TVM: the
module's entry signature, :meth:`fxquant.backends.cpu.build.CpuModel.staged`); ids are converted
between integer types, never rounded from floats.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np

from fxquant.io import atomic_write_json, atomic_write_text

SETTLE_S = 0.1
"""Pause before each timed block, so the previous engine's spinning threads go to sleep."""
VERIFY_N = 64
"""Held-out inputs an artifact is re-run on before it is timed."""
EXPORT_VERIFY_N = 1000
"""Held-out inputs of an export bench makes itself (as ``fxquant export``'s ``--verify`` default)."""
ONNX_BENCH_TARGETS = ("onnx-qdq", "qonnx")
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
"""onnxruntime's input element types (``NodeArg.type``) as numpy dtypes."""

Inputs = Sequence[np.ndarray]
"""One array per model input, in the graph's input order, batch first."""


def as_inputs(x: np.ndarray | Inputs) -> tuple[np.ndarray, ...]:
    """``x`` as one array per model input: a bare array is the only input of a one-input model."""
    return (x,) if isinstance(x, np.ndarray) else tuple(x)


def batch_inputs(x_all: np.ndarray | Inputs, batch: int) -> tuple[np.ndarray, ...]:
    """Each input at batch size ``batch``: its held-out rows, repeated whole when there are fewer
    (``np.resize`` over the batch axis), in their own dtype (token ids stay valid int64 ids)."""
    return tuple(np.resize(x, (batch, *x.shape[1:])) for x in as_inputs(x_all))


def feed_as(x: np.ndarray, dtype: Any, what: str) -> np.ndarray:
    """``x`` as a contiguous array of ``dtype``. Into an integer dtype only from integers (or floats
    that are integers, e.g. ids read as float32): a fractional value is an :class:`InputRangeError`,
    never rounded."""
    x = np.asarray(x)
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(x.dtype, np.integer):
        if x.size and np.any(x != np.floor(x)):
            from fxquant.errors import InputRangeError

            raise InputRangeError(f"{what}: the artifact takes {np.dtype(dtype).name}, the input holds "
                                  f"{x[x != np.floor(x)].reshape(-1)[0]!r}, not an integer",
                                  "feed integer ids; ids are never rounded")
    return np.ascontiguousarray(x, dtype)


@dataclass
class Engine:
    """One timed engine: what it runs (``artifact`` relative to RUN) and a runner factory, called
    with the batch's model inputs (one array per input, :data:`Inputs`)."""

    name: str
    artifact: str
    fingerprint: str
    verified: bool
    make: Callable[[tuple[np.ndarray, ...]], Callable[[], Any]]


def time_runners(runners: dict[str, Callable[[], Any]], budget_s: float, rounds: int = 3,
                 min_runs: int = 5) -> dict[str, list[float]]:
    """Blocks of consecutive calls per engine, the engines taking turns for ``rounds`` rounds.

    Blocks rather than single interleaved calls, with a pause before each block: ORT's and TVM's
    thread pools spin after a call, and a pool still spinning steals the cores from the next
    engine (on a 2-core machine this alone made TVM 3x slower at batch 1).
    """
    times: dict[str, list[float]] = {k: [] for k in runners}
    slot = budget_s / (rounds * len(runners))
    for _ in range(rounds):
        for name, run in runners.items():
            time.sleep(SETTLE_S)
            for _ in range(3):
                run()
            start = time.perf_counter()
            runs = 0
            while runs < min_runs or time.perf_counter() - start < slot:
                t0 = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - t0)
                runs += 1
    return times


def machine(threads: int | None = None) -> dict[str, Any]:
    """CPU model, flags of interest, cores and the thread count every engine ran with."""
    from fxquant.host import host_cpu

    info = host_cpu()
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512bw", "avx_vnni", "amx_int8", "amx_tile")
    return {"cpu": info.model, "flags": [f for f in wanted if f in info.flags], "cores": os.cpu_count(),
            "threads": threads}


def verified_artifact_dir(target: Any, dep: Any, n_verify: int = VERIFY_N) -> tuple[Path, dict[str, Any]]:
    """``RUN/<target>`` and its report, certified bit-exact for ``dep.graph`` (module docstring).

    Missing or stale (another graph): exported here through :func:`fxquant.backends.base.export`
    with the reference check. A report that is not bit-exact, or an artifact that no longer
    matches the reference on ``n_verify`` held-out inputs, raises :class:`ExportError`.
    """
    from fxquant.backends.base import export, graph_fingerprint, read_report, verified_artifact, verify
    from fxquant.errors import ExportError, FxquantError

    out_dir = dep.run.path / target.name
    report = read_report(out_dir)
    if report is None or report.get("graph_fingerprint") != graph_fingerprint(dep.graph):
        x_export, _ = dep.held_out(EXPORT_VERIFY_N)
        export(target, dep.graph, out_dir, list(as_inputs(x_export)), model=dep.model)
    x, _ = dep.held_out(n_verify)
    report = verified_artifact(target, dep.graph, out_dir)
    try:
        again = verify(target, out_dir, dep.graph, dep.graph.quantize_inputs(*as_inputs(x)))
    except FxquantError:
        raise
    except Exception as exc:  # a damaged file: the runtime's own error, named, instead of a traceback
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ExportError(f"the {target.name} export in {out_dir} cannot be run: {type(exc).__name__}: {first} "
                          "(nothing was timed)", f"run `fxquant export --target {target.name}` again") from exc
    if not again["bit_exact"]:
        raise ExportError(f"the {target.name} export in {out_dir} no longer matches the integer reference: "
                          f"{again['mismatches']} of {again['n']} held-out samples differ (nothing was timed)",
                          f"run `fxquant export --target {target.name}` again")
    return out_dir, report


def baseline_engine(dep: Any, threads: int) -> Engine:
    """ORT on the FP32 ONNX baseline (``RUN/onnx-fp32``, written here if missing or stale)."""
    from fxquant.export.targets import FP32_DIR, MODEL_FILE, fp32_baseline

    facts = fp32_baseline(dep.graph, dep.run.path / FP32_DIR)
    path = dep.run.path / FP32_DIR / MODEL_FILE
    return Engine("ORT FP32", f"{FP32_DIR}/{MODEL_FILE}", facts["graph_fingerprint"], False,
                  lambda x: ort_runner(path, x, threads))


def ort_runner(model: Any, x: np.ndarray | Inputs, threads: int) -> Callable[[], Any]:
    """One ORT call on ``model`` (ModelProto or path): each input fed in the element type the model
    declares for it (float32 for images, int64 for token ids), converted once, outside the call."""
    from fxquant.errors import ExportError
    from fxquant.export.verify import session

    sess = session(model, threads=threads)
    declared, xs = sess.get_inputs(), as_inputs(x)
    what = f"ONNX model {model}" if isinstance(model, (str, Path)) else "ONNX model"
    if len(declared) != len(xs):
        raise ExportError(f"{what} takes {len(declared)} inputs ({', '.join(i.name for i in declared)}), "
                          f"bench has {len(xs)}", "export it again from this run")
    feed = {}
    for arg, xi in zip(declared, xs):
        if arg.type not in ORT_DTYPES:
            raise ExportError(f"{what}: input {arg.name!r} is {arg.type}, which bench does not feed",
                              f"inputs bench feeds: {', '.join(ORT_DTYPES)}")
        feed[arg.name] = feed_as(xi, ORT_DTYPES[arg.type], f"{what} input {arg.name!r}")
    return lambda: sess.run(None, feed)


def onnx_engine(target: Any, dep: Any, threads: int, label: str) -> Engine:
    """ORT on the verified ``onnx-qdq`` / ``qonnx`` artifact (QONNX: its lowered form, as ``run``)."""
    import onnx

    from fxquant.export.targets import MODEL_FILE

    out_dir, report = verified_artifact_dir(target, dep)
    runnable = target.runnable(onnx.load(str(out_dir / MODEL_FILE)))
    return Engine(label, f"{target.name}/{report['artifact']['file']}", report["graph_fingerprint"], True,
                  lambda x: ort_runner(runnable, x, threads))


def time_engines(engines: list[Engine], x_all: np.ndarray | Inputs, batches: tuple[int, ...],
                 budget_s: float) -> list[dict[str, Any]]:
    """One row per engine and batch (the first engine is the ratio's baseline); ``x_all``: the
    held-out inputs (one array, or one per model input), batched by :func:`batch_inputs`."""
    rows: list[dict[str, Any]] = []
    for batch in batches:
        x = batch_inputs(x_all, batch)
        times = time_runners({e.name: e.make(x) for e in engines}, budget_s)
        base = float(np.percentile(times[engines[0].name], 50))
        for e in engines:
            p50, p90 = float(np.percentile(times[e.name], 50)), float(np.percentile(times[e.name], 90))
            rows.append({"engine": e.name, "batch": batch, "p50_ms": p50 * 1e3, "p90_ms": p90 * 1e3,
                         "throughput": batch / p50, "runs": len(times[e.name]), "ratio": p50 / base,
                         "artifact": e.artifact, "graph_fingerprint": e.fingerprint, "verified": e.verified})
    return rows


def render_markdown(title: str, rows: list[dict[str, Any]], threads: int) -> str:
    """The table of rows, with the thread count every engine ran with and the artifact of each row."""
    baseline = rows[0]["engine"] if rows else ""
    lines = [f"## {title}", "", f"Every engine: {threads} thread{'s' if threads != 1 else ''}.", "",
             f"| engine | batch | p50 ms | p90 ms | inputs/s | vs {baseline} | artifact | verified |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['engine']} | {r['batch']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['throughput']:.0f} | {r['ratio']:.2f}x | `{r['artifact']}` ({r['graph_fingerprint']}) | "
                     f"{'yes' if r['verified'] else 'no (float baseline)'} |")
    return "\n".join(lines) + "\n"


def write_bench(run_dir: Path, target: str, report: dict[str, Any], markdown: str) -> dict[str, Any]:
    """``RUN/bench-<target>.json`` and ``.md``; the report with ``markdown`` added."""
    atomic_write_json(Path(run_dir) / f"bench-{target}.json", report)
    atomic_write_text(Path(run_dir) / f"bench-{target}.md", markdown)
    return {**report, "markdown": markdown}


def bench_onnx(run_dir: Path, target_name: str = "onnx-qdq", batches: tuple[int, ...] = (1, 64), *,
               threads: int | None = None, budget_s: float = 1.5) -> dict[str, Any]:
    """ORT FP32 baseline vs ORT on the verified ``onnx-qdq`` (or ``qonnx``) artifact of a run."""
    from fxquant.backends.registry import get_target
    from fxquant.deployment import load_deployment

    threads = threads or os.cpu_count() or 1
    dep = load_deployment(run_dir)
    target = get_target(target_name)
    engines = [onnx_engine(target, dep, threads, f"ORT fxquant {target.name}"), baseline_engine(dep, threads)]
    engines.insert(0, engines.pop())  # the baseline first: it is the ratio's reference
    x_all, _ = dep.held_out(max(batches))
    rows = time_engines(engines, x_all, batches, budget_s)
    sizes = {e.artifact: (dep.run.path / e.artifact).stat().st_size for e in engines}  # both are files
    report = {"target": target.name, "machine": machine(threads), "rows": rows, "sizes_bytes": sizes,
              "size_ratio_vs_fp32": sizes[engines[1].artifact] / sizes[engines[0].artifact],
              "theoretical_bytes": dep.graph.param_bits() / 8}
    md = render_markdown(f"ONNX Runtime on {report['machine']['cpu']}", rows, threads)
    md += (f"\nSizes: " + ", ".join(f"`{k}` {v} B" for k, v in sizes.items())
           + f" ({report['size_ratio_vs_fp32']:.3f}x); Σ params·bits/8 = {report['theoretical_bytes']:.0f} B\n")
    return write_bench(dep.run.path, target.name, report, md)


__all__ = ["Engine", "as_inputs", "batch_inputs", "bench_onnx", "baseline_engine", "feed_as", "machine",
           "onnx_engine", "ort_runner", "render_markdown", "time_engines", "time_runners", "verified_artifact_dir",
           "write_bench"]
