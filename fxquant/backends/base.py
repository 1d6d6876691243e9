"""The backend contract: every deployment target is one :class:`Target` implementation.

Modelled on ONNX's backend test suite: a target implements a small interface, declares what it
cannot do as data, and the same graphs run on every target against one reference
(:meth:`fxquant.integer_graph.IntegerGraph.run`).

A target:

* ``check(graph, **options) -> list[Problem]`` lists **every** unsupported op, width, bound or
  shape of ``graph`` at once, each naming the layer (rules from :mod:`fxquant.legality`, the
  target's own limits from its ``ops`` / ``limits`` data). Empty list = buildable.
* ``build(graph, out_dir, **options) -> dict`` writes the artifact into ``out_dir`` (a fresh
  temporary directory: paths inside the artifact must be relative) and returns JSON-able build
  facts (files, sizes, build seconds).
* ``run(out_dir, int_inputs) -> list[np.ndarray]`` executes the built artifact on the input
  *integers* (one array per graph input, batch first) and returns the output integers (int64, one
  per ``graph.outputs``). ``ran`` says in words what ``run`` executes (for the report).

:func:`export` is the one order every target follows: check → build in a temporary directory
beside ``out_dir`` → verify against the reference (and, given the trained model, the reference
against the model first) → write ``report.json`` → move the directory into place atomically. A
failed check, build or verification leaves nothing behind that looks like a result.

The report schema (``report.json``, :data:`REPORT_SCHEMA`), the same for every target::

    {"schema": "fxquant.export_report", "schema_version": 1, "target": "cpu", "options": {...},
     "graph_fingerprint": "…", "artifact": {...build facts...},
     "reference_check": <comparison> | null,   # IntegerGraph.run vs the trained fake-quant model
     "verification": <comparison>,             # the artifact vs IntegerGraph.run
     "bit_exact": true}                        # both comparisons exact

    <comparison> = {"ran": "…", "n": 64, "mismatches": 0, "mismatched_elements": 0,
                    "first_mismatch": null | {"output", "sample", "index", "expected", "got"},
                    "bit_exact": true,
                    "accuracy": {"top1": 96.11, "n": 360}}   # optional: a classifier exported with
                                                             # labels (the CLI passes the validation
                                                             # labels); computed from that side's outputs
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from fxquant.errors import ExportError, RunDirError, UnsupportedOpError
from fxquant.integer_graph import IntegerGraph
from fxquant.io import atomic_write_json

REPORT_FILE = "report.json"
REPORT_SCHEMA = "fxquant.export_report"
REPORT_SCHEMA_VERSION = 1
COVERAGE_DOC = "docs/coverage.md"


@dataclass(frozen=True)
class Problem:
    """One reason a target cannot build a graph: the layer, its op kind and why."""

    layer: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.layer} ({self.kind}): {self.reason}"


class Target(ABC):
    """One deployment target. Subclasses set the class attributes and implement the three methods.

    ``ops``: the IntegerGraph op kinds the target builds (anything else is a :class:`Problem`).
    ``limits``: declared numeric limits (e.g. ``{"weight_bits": (2, 8), "act_bits": (2, 8)}``),
    reported in the coverage table and enforced by ``check`` through :mod:`fxquant.legality`.
    ``option_defaults``: the build options the target takes, with their defaults.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    ran: ClassVar[str]
    ops: ClassVar[frozenset[str]]
    limits: ClassVar[dict[str, Any]] = {}
    option_defaults: ClassVar[dict[str, Any]] = {}

    def unavailable(self) -> str | None:
        """Why this machine cannot build *and run* the target (missing toolchain), or ``None``."""
        return None

    def options(self, **given: Any) -> dict[str, Any]:
        """``option_defaults`` updated with the given options (unknown names are refused)."""
        from fxquant.errors import UsageError

        unknown = sorted(set(given) - set(self.option_defaults))
        if unknown:
            raise UsageError(f"target {self.name!r} takes no option {', '.join(unknown)}",
                             f"its options: {', '.join(self.option_defaults) or 'none'}")
        return {**self.option_defaults, **{k: v for k, v in given.items() if v is not None}}

    def check(self, graph: IntegerGraph, **options: Any) -> list[Problem]:
        """Every reason this target cannot build ``graph`` (see module docstring)."""
        problems = [Problem(op.name, op.kind, f"op kind {op.kind!r} is not supported by target {self.name!r}")
                    for op in graph.ops if op.kind not in self.ops]
        if "lut" in self.ops:  # the table rule holds for every target that builds tables
            from fxquant.legality import lut_problems

            problems += lut_problems(graph)
        if self.ops & {"embedding", "softmax", "layernorm", "slice"}:  # their bounds, for every target with one
            from fxquant.legality import transformer_problems

            problems += transformer_problems(graph)
        return problems + self.check_graph(graph, **self.options(**options))

    def check_graph(self, graph: IntegerGraph, **options: Any) -> list[Problem]:
        """Target-specific rules beyond the op set (widths, bounds, shapes); override."""
        return []

    @abstractmethod
    def build(self, graph: IntegerGraph, out_dir: Path, **options: Any) -> dict[str, Any]:
        """Write the artifact into ``out_dir``; return JSON-able build facts."""

    @abstractmethod
    def run(self, out_dir: Path, int_inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Output integers of the artifact in ``out_dir`` on ``int_inputs``."""


# --------------------------------------------------------------------------------------- comparison
def compare(expected: dict[str, np.ndarray], got: Sequence[np.ndarray], outputs: Sequence[str],
            ran: str) -> dict[str, Any]:
    """The comparison record of the report schema: ``got[i]`` against ``expected[outputs[i]]``.

    ``n`` is the batch size, ``mismatches`` the samples with any differing output integer,
    ``mismatched_elements`` the differing integers; a shape difference counts every element.
    """
    if len(got) != len(outputs):
        raise ExportError(f"{ran} returned {len(got)} outputs, the graph has {len(outputs)}",
                          "report this as a backend bug")
    n = int(np.asarray(expected[outputs[0]]).shape[0]) if outputs else 0
    bad_samples = np.zeros(n, dtype=bool)
    elements, first = 0, None
    for name, out in zip(outputs, got):
        want = np.asarray(expected[name], dtype=np.int64)
        out = np.asarray(out)
        if out.shape != want.shape:
            elements += want.size
            bad_samples[:] = True
            first = first or {"output": name, "sample": 0, "index": None,
                              "expected": f"shape {list(want.shape)}", "got": f"shape {list(out.shape)}"}
            continue
        wrong = out != want  # no cast: an off-grid (non-integral) value must stay a mismatch
        if wrong.any():
            elements += int(wrong.sum())
            bad_samples |= wrong.reshape(n, -1).any(axis=1)
            if first is None:
                idx = tuple(int(i) for i in np.argwhere(wrong)[0])
                first = {"output": name, "sample": idx[0], "index": list(idx[1:]),
                         "expected": int(want[idx]), "got": out[idx].item()}
    return {"ran": ran, "n": n, "mismatches": int(bad_samples.sum()), "mismatched_elements": elements,
            "first_mismatch": first, "bit_exact": elements == 0}


def graph_fingerprint(graph: IntegerGraph) -> str:
    """SHA-256 (16 hex digits) of everything that defines the graph's integers: a stale-artifact check."""
    h = hashlib.sha256()
    for v in graph.inputs:
        h.update(f"in {v.name} {v.shape} {v.fmt}".encode())
    for op in graph.ops:
        h.update(f"op {op.name} {op.kind} {op.inputs} {op.output} {op.out_fmt} {op.weight_fmt} "
                 f"{sorted(op.attrs.items(), key=lambda kv: kv[0])!r}".encode())
        for arr in (op.weight, op.bias):
            if arr is not None:
                h.update(np.ascontiguousarray(arr, dtype=np.int64).tobytes())
    h.update(f"out {graph.outputs}".encode())
    return h.hexdigest()[:16]


def fake_quant_outputs(model: Any, graph: IntegerGraph, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The trained fake-quant model run in float64 on ``inputs``, outputs as integers ``y * 2^FL``.

    A value not on its fixed-point grid is returned as a float array, which then differs from any
    integer and is reported as a mismatch (never rounded into agreement).
    """
    import torch

    model.eval()
    try:
        with torch.no_grad():
            y = model.double()(*[torch.from_numpy(np.asarray(x)).double()
                                 if np.issubdtype(np.asarray(x).dtype, np.floating)
                                 else torch.from_numpy(np.asarray(x)) for x in inputs])
    finally:
        model.float()
    ys = list(y) if isinstance(y, (tuple, list)) else [y]
    outs = []
    for name, t in zip(graph.outputs, ys):
        k = np.ldexp(t.numpy(), graph.values[name].fmt.frac_bits)
        outs.append(k.astype(np.int64) if np.array_equal(k, np.rint(k)) else k)
    return outs


def top1_accuracy(outputs: Sequence[np.ndarray], labels: np.ndarray | None) -> dict[str, Any] | None:
    """``{"top1": %, "n": N}`` of the first output's argmax over its last axis against ``labels``
    (a classifier's ``(N, C)`` logits, as integers or floats: the argmax is the same), or ``None``
    without labels or with an output that is not ``(N, C)``."""
    if labels is None or not outputs:
        return None
    y = np.asarray(outputs[0])
    labels = np.asarray(labels).reshape(-1)
    if y.ndim != 2 or y.shape[0] != labels.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        return None
    return {"top1": round(100.0 * float((y.argmax(axis=1) == labels).mean()), 4), "n": int(labels.shape[0])}


def check_reference(model: Any, graph: IntegerGraph, inputs: Sequence[np.ndarray],
                    labels: np.ndarray | None = None) -> dict[str, Any]:
    """Comparison record: :meth:`IntegerGraph.run` against the trained fake-quant ``model`` (with
    ``labels``: also the fake-quant model's own top-1 accuracy, ``accuracy``)."""
    ref = graph.run(*graph.quantize_inputs(*inputs))
    fake = fake_quant_outputs(model, graph, inputs)
    record = compare(ref, fake, graph.outputs, "trained fake-quant model (torch, float64) vs IntegerGraph.run")
    accuracy = top1_accuracy(fake, labels)
    return {**record, "accuracy": accuracy} if accuracy is not None else record


def verify(target: Target, out_dir: Path, graph: IntegerGraph, int_inputs: Sequence[np.ndarray],
           labels: np.ndarray | None = None) -> dict[str, Any]:
    """Comparison record: the built artifact in ``out_dir`` against :meth:`IntegerGraph.run` (with
    ``labels``: also the top-1 accuracy of the artifact's own outputs, ``accuracy``)."""
    ref = graph.run(*int_inputs)
    got = target.run(out_dir, int_inputs)
    record = compare(ref, got, graph.outputs, target.ran)
    accuracy = top1_accuracy(got, labels)
    return {**record, "accuracy": accuracy} if accuracy is not None else record


def _mismatch_error(what: str, record: dict[str, Any], hint: str) -> ExportError:
    first = record["first_mismatch"]
    where = (f"first at output {first['output']!r} sample {first['sample']} index {first['index']}: "
             f"expected {first['expected']}, got {first['got']}") if first else ""
    return ExportError(f"{what}: {record['mismatches']} of {record['n']} samples differ "
                       f"({record['mismatched_elements']} integers; {where})", hint)


def refuse(target: Target, problems: list[Problem]) -> UnsupportedOpError:
    """The error for a failed check: every problem, one per line after the first."""
    listed = "; ".join(str(p) for p in problems)
    return UnsupportedOpError(f"target {target.name!r} cannot build this graph ({len(problems)} problem"
                              f"{'s' if len(problems) != 1 else ''}): {listed}",
                              f"see {COVERAGE_DOC} for what each target supports")


# ------------------------------------------------------------------------------------------ export
def export(target: Target, graph: IntegerGraph, out_dir: Path, inputs: Sequence[np.ndarray], *,
           model: Any = None, labels: np.ndarray | None = None, **options: Any) -> dict[str, Any]:
    """Check, build, verify and place ``graph``'s artifact for ``target`` at ``out_dir``.

    ``inputs`` are model inputs (float, or integer ids), one array per graph input, batch first;
    they are quantized with :meth:`IntegerGraph.quantize_inputs` for the target. With ``model``
    (the deployed fake-quant ``GraphModule``), the reference is first checked against it. Returns
    the report (also written as ``out_dir/report.json``). With ``labels`` (a classifier's), the
    records carry the top-1 accuracy of the artifact's outputs and of the fake-quant model on the
    same samples: the deployed accuracy, measured on the artifact. Raises :class:`UnsupportedOpError` for
    a failed check and :class:`ExportError` for any mismatch; then ``out_dir`` is left as it was.
    """
    opts = target.options(**options)
    problems = target.check(graph, **opts)
    if problems:
        raise refuse(target, problems)
    reference = None
    if model is not None:
        reference = check_reference(model, graph, inputs, labels)
        if not reference["bit_exact"]:
            raise _mismatch_error("the integer graph does not compute what the trained model computes",
                                  reference, "an op was lowered with the wrong semantics: report this as a "
                                  "bug with the model file (nothing was exported)")
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.building-"))
    except OSError as exc:
        raise RunDirError(f"cannot write {out_dir}: {exc.strerror}", "choose a writable directory") from exc
    try:
        start = time.perf_counter()
        artifact = target.build(graph, tmp, **opts)
        artifact = {**artifact, "build_seconds": round(time.perf_counter() - start, 3)}
        verification = verify(target, tmp, graph, graph.quantize_inputs(*inputs), labels)
        if not verification["bit_exact"]:
            raise _mismatch_error(f"target {target.name!r} output differs from the integer reference",
                                  verification, "report this as a backend bug with the run directory")
        report = {"schema": REPORT_SCHEMA, "schema_version": REPORT_SCHEMA_VERSION, "target": target.name,
                  "options": opts, "graph_fingerprint": graph_fingerprint(graph), "artifact": artifact,
                  "reference_check": reference, "verification": verification,
                  "bit_exact": verification["bit_exact"] and (reference is None or reference["bit_exact"])}
        atomic_write_json(tmp / REPORT_FILE, report)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _replace_dir(new: Path, dest: Path) -> None:
    """Move directory ``new`` to ``dest``; an existing ``dest`` is swapped out, then removed."""
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.old-"))
        os.replace(dest, old / dest.name)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old / dest.name, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_report(out_dir: Path) -> dict[str, Any] | None:
    """The report of an exported artifact, or ``None`` where there is none (or it is unreadable)."""
    path = Path(out_dir) / REPORT_FILE
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return report if isinstance(report, dict) and report.get("schema") == REPORT_SCHEMA else None


def verified_artifact(target: Target, graph: IntegerGraph, out_dir: Path) -> dict[str, Any]:
    """The report of ``out_dir`` if it holds a bit-exact artifact of exactly ``graph``; else raise.

    What ``bench`` calls before timing anything: an artifact that was never verified, failed
    verification, or was built from another graph is refused with :class:`ExportError`.
    """
    report = read_report(out_dir)
    if report is None or report.get("target") != target.name:
        raise ExportError(f"{out_dir} holds no verified {target.name} export",
                          f"run `fxquant export --target {target.name}` first")
    if not report.get("bit_exact"):
        raise ExportError(f"the {target.name} export in {out_dir} is not verified bit-exact", "export it again")
    if report.get("graph_fingerprint") != graph_fingerprint(graph):
        raise ExportError(f"the {target.name} export in {out_dir} was built from another integer graph "
                          "(the run changed since)", f"run `fxquant export --target {target.name}` again")
    return report


__all__ = ["Problem", "Target", "check_reference", "compare", "export", "fake_quant_outputs", "graph_fingerprint",
           "read_report", "refuse", "verified_artifact", "verify"]
