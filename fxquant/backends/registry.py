"""The registry of deployment targets: the only way the CLI, ``bench`` and tests reach a backend.

Each entry maps a target name to ``module:Class`` of a :class:`~fxquant.backends.base.Target`
implementation, imported on first use (TVM, onnxruntime and the HLS tooling stay lazy, so
``import fxquant`` and ``fxquant --help`` are fast). Adding a backend = one implementation and one
line here; the conformance suite (``tests/conformance``) and the coverage table
(``docs/coverage.md``, ``python -m fxquant.backends.coverage``) pick it up from this table.
"""

from __future__ import annotations

import importlib

from fxquant.backends.base import Target
from fxquant.errors import UsageError

TARGETS: dict[str, str] = {
    "onnx-qdq": "fxquant.export.targets:OnnxQdqTarget",
    "qonnx": "fxquant.export.targets:QonnxTarget",
    "cpu": "fxquant.backends.cpu.target:CpuTarget",
    "cuda": "fxquant.backends.cuda.target:CudaTarget",
    "fpga": "fxquant.backends.fpga.target:FpgaTarget",
}
ALIASES = {"onnx": "onnx-qdq"}
"""Older CLI spellings (``--target onnx`` is the QDQ export)."""

_cache: dict[str, Target] = {}


def target_names() -> list[str]:
    return list(TARGETS)


def get_target(name: str) -> Target:
    """The target called ``name`` (or an alias of it); :class:`UsageError` for an unknown name."""
    name = ALIASES.get(name, name)
    if name not in TARGETS:
        raise UsageError(f"unknown target {name!r}", f"choose one of {', '.join(TARGETS)}")
    if name not in _cache:
        module, cls = TARGETS[name].split(":")
        _cache[name] = getattr(importlib.import_module(module), cls)()
    return _cache[name]


__all__ = ["ALIASES", "TARGETS", "get_target", "target_names"]
