"""The per-layer fixed-point precision map: a versioned, self-describing JSON file.

Schema (``schema_version`` 1)::

    {
      "format": "fxquant.precision_map",
      "schema_version": 1,
      "model": {"name": "DigitsCNN", "fingerprint": "sha256:…"},
      "layers": {
        "conv1": {"kind": "conv2d",
                  "weight": {"bits": 8, "frac_bits": 6},      # null for layers without weights
                  "act":    {"bits": 8, "frac_bits": 4},      # the layer's output precision
                  "grad":   {"bits": 8, "frac_bits": null}},  # null FL = dynamic per tensor
        …
      },
      "history": [{"epoch": 0, "layers": {…}}, …]             # optional, per-epoch snapshots
    }

``bits`` is 2..16 or 32 (off); ``frac_bits`` an integer in [-64, 64] (``null`` only for ``grad``).
The fingerprint hashes the sorted ``(layer, roles, weight shape)`` list, so a map fits exactly the
models whose quantized layers match. :meth:`PrecisionMap.from_json` validates everything and
reports **all** problems in one :class:`~fxquant.errors.PrecisionMapError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fxquant.errors import FxquantError, PrecisionMapError
from fxquant.fixed_point import OFF_BITS, FixedPoint, check_bits, check_frac_bits
from fxquant.io import atomic_write_text
from fxquant.quantizers import ACT, WEIGHT, quantizers

FORMAT = "fxquant.precision_map"
SCHEMA_VERSION = 1
ROLES = (WEIGHT, ACT, "grad")


@dataclass
class LayerPrecision:
    kind: str
    weight: FixedPoint | None
    act: FixedPoint | None
    grad: FixedPoint

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind,
                "weight": self.weight.to_dict() if self.weight else None,
                "act": self.act.to_dict() if self.act else None,
                "grad": self.grad.to_dict()}


@dataclass
class PrecisionMap:
    layers: dict[str, LayerPrecision]
    model_name: str = ""
    fingerprint: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    # ----------------------------------------------------------------- model <-> map
    @classmethod
    def from_model(cls, model: nn.Module, name: str | None = None) -> "PrecisionMap":
        """Read every quantizer's current format from ``model``."""
        layers: dict[str, LayerPrecision] = {}
        for (layer, role), q in sorted(quantizers(model).items()):
            entry = layers.setdefault(layer, LayerPrecision(q.kind, None, None, FixedPoint(int(q.grad_bits), None)))
            if q.role == WEIGHT:  # a weighted layer's gradient precision is its weight gradient's
                entry.kind = q.kind
                entry.grad = FixedPoint(int(q.grad_bits), None)
            setattr(entry, role, q.fmt)
        return cls(layers, name or type(model).__name__, model_fingerprint(model))

    def apply(self, model: nn.Module) -> None:
        """Write this map into ``model``'s quantizer buffers; mismatches are all listed first."""
        qs = quantizers(model)
        self.check_matches(model)
        for (layer, role), q in qs.items():
            entry = self.layers[layer]
            q.set_format(getattr(entry, role))
            q.set_grad_bits(entry.grad.bits)

    def check_matches(self, model: nn.Module) -> None:
        qs = quantizers(model)
        problems = []
        model_layers = {layer for layer, _ in qs}
        for layer in sorted(set(self.layers) - model_layers):
            problems.append(f"unknown layer {layer!r}")
        for layer in sorted(model_layers - set(self.layers)):
            problems.append(f"layer {layer!r} of the model is missing from the map")
        for (layer, role) in sorted(qs):
            if layer in self.layers and getattr(self.layers[layer], role) is None:
                problems.append(f"layer {layer!r}: no {role} precision")
        if self.fingerprint and not problems and self.fingerprint != model_fingerprint(model):
            problems.append("model fingerprint differs (same layer names, other shapes)")
        if problems:
            raise PrecisionMapError(f"precision map does not match the model: {'; '.join(problems)}",
                                    "export with the model.py the run was trained with")

    # ----------------------------------------------------------------- JSON
    def to_json_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION,
                "model": {"name": self.model_name, "fingerprint": self.fingerprint},
                "layers": {name: lp.to_dict() for name, lp in self.layers.items()},
                "history": self.history}

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_json_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "PrecisionMap":
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PrecisionMapError(f"precision map {path} is not readable: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PrecisionMapError(f"precision map {path} is not valid JSON: {exc.msg} at line {exc.lineno}") from exc
        return cls.from_json_dict(data, source=str(path))

    @classmethod
    def from_json_dict(cls, data: Any, source: str = "precision map") -> "PrecisionMap":
        problems: list[str] = []
        if not isinstance(data, dict):
            raise PrecisionMapError(f"{source}: top level must be a JSON object")
        if data.get("format") != FORMAT:
            problems.append(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        version = data.get("schema_version")
        if isinstance(version, bool) or version != SCHEMA_VERSION:  # JSON true is not 1
            problems.append(f"schema_version is {data.get('schema_version')!r}, this fxquant reads {SCHEMA_VERSION}")
        model = data.get("model", {})
        if not isinstance(model, dict):
            problems.append("model must be an object")
            model = {}
        for key in ("name", "fingerprint"):
            if key in model and not isinstance(model[key], str):
                problems.append(f"model.{key} must be a string")
        layers_raw = data.get("layers")
        layers: dict[str, LayerPrecision] = {}
        if not isinstance(layers_raw, dict) or not layers_raw:
            problems.append("layers must be a non-empty object")
            layers_raw = {}
        for name, entry in layers_raw.items():
            lp = _parse_layer(name, entry, problems)
            if lp is not None:
                layers[name] = lp
        history = data.get("history", [])
        if not isinstance(history, list):
            problems.append("history must be a list")
            history = []
        if problems:
            raise PrecisionMapError(f"{source}: {len(problems)} problem(s): {'; '.join(problems)}",
                                    "fix the listed fields (docs/precision_map.md gives the schema)")
        return cls(layers, str(model.get("name", "")), str(model.get("fingerprint", "")), history)

    def snapshot(self, epoch: int) -> None:
        """Append the current layers to ``history`` (per-epoch record)."""
        self.history.append({"epoch": epoch, "layers": {n: lp.to_dict() for n, lp in self.layers.items()}})


def _parse_fmt(name: str, role: str, raw: Any, problems: list[str], allow_dynamic: bool) -> FixedPoint | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "bits" not in raw:
        problems.append(f"layer {name!r}: {role} must be {{bits, frac_bits}} or null")
        return None
    unknown = set(raw) - {"bits", "frac_bits"}
    if unknown:  # a misspelt field would otherwise be ignored
        problems.append(f"layer {name!r}: {role}: unknown field(s) {sorted(unknown)}")
    try:
        bits = check_bits(raw["bits"], f"{role}.bits")
        fl = check_frac_bits(raw.get("frac_bits"), f"{role}.frac_bits")
        if fl is None and not allow_dynamic and bits != OFF_BITS:
            raise PrecisionMapError(f"{role}.frac_bits is null", "only grad may have a dynamic FL")
        return FixedPoint(bits, fl if fl is not None or allow_dynamic else 0)
    except FxquantError as exc:
        problems.append(f"layer {name!r}: {exc.message}")
        return None


def _parse_layer(name: str, entry: Any, problems: list[str]) -> LayerPrecision | None:
    if not isinstance(entry, dict):
        problems.append(f"layer {name!r} must be an object")
        return None
    before = len(problems)
    unknown = set(entry) - {"kind", *ROLES}
    if unknown:
        problems.append(f"layer {name!r}: unknown field(s) {sorted(unknown)}")
    if "kind" in entry and not isinstance(entry["kind"], str):
        problems.append(f"layer {name!r}: kind must be a string")
    weight = _parse_fmt(name, WEIGHT, entry.get(WEIGHT), problems, allow_dynamic=False)
    act = _parse_fmt(name, ACT, entry.get(ACT), problems, allow_dynamic=False)
    grad = _parse_fmt(name, "grad", entry.get("grad", {"bits": OFF_BITS, "frac_bits": None}), problems, True)
    if weight is None and act is None and len(problems) == before:
        problems.append(f"layer {name!r}: neither weight nor act precision")
    if len(problems) > before:
        return None
    return LayerPrecision(str(entry.get("kind", "")), weight, act, grad or FixedPoint(OFF_BITS, None))


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over sorted ``(layer, role, weight shape)`` of the model's quantizers."""
    items = []
    params = dict(model.named_parameters())
    for (layer, role), _ in sorted(quantizers(model).items()):
        shape = tuple(params[f"{layer}.weight"].shape) if role == WEIGHT and f"{layer}.weight" in params else ()
        items.append(f"{layer}|{role}|{shape}")
    return "sha256:" + hashlib.sha256("\n".join(items).encode()).hexdigest()


__all__ = ["PrecisionMap", "LayerPrecision", "model_fingerprint"]
