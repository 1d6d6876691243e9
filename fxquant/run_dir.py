"""A run directory: what training writes and what export, bench and show read.

Layout::

    RUN_DIR/run.json            what was run (model file path + SHA-256, policy, options, status, results)
    RUN_DIR/checkpoint.pt       model/optimizer/policy/RNG state (loads with weights_only=True)
    RUN_DIR/precision_map.json  the deployed per-layer <BW,FL> map (BN folded), with per-epoch history
    RUN_DIR/metrics.jsonl       one JSON line per training step
    RUN_DIR/export/…            exporters' artifacts and reports

``RunDir`` is file I/O only; rebuilding the deployed model and its integer graph from a run is
:mod:`fxquant.deployment`. Nothing in a run directory is executed: the model is rebuilt from the recorded model.py (whose
SHA-256 must still match) and the checkpoint only holds tensors and plain data.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fxquant import __version__
from fxquant.errors import CheckpointError, RunDirError
from fxquant.io import atomic_write, atomic_write_json
from fxquant.model_file import ModelFile, file_sha256, load_model_file

RUN_FORMAT = "fxquant.run"
RUN_SCHEMA_VERSION = 1
RUN_JSON, CHECKPOINT, PRECISION_MAP, METRICS = "run.json", "checkpoint.pt", "precision_map.json", "metrics.jsonl"


@dataclass
class RunDir:
    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    # ------------------------------------------------------------------ files
    def file(self, name: str) -> Path:
        return self.path / name

    def create(self, force: bool) -> None:
        """Make a fresh run directory; an existing non-empty one needs ``force``."""
        if self.path.exists() and any(self.path.iterdir()):
            if not force:
                raise RunDirError(f"run directory {self.path} exists and is not empty",
                                  "pass --force to overwrite it, or --resume to continue it")
            if not self.file(RUN_JSON).exists():
                raise RunDirError(f"{self.path} is not an fxquant run directory; refusing to delete it",
                                  "choose another --out")
            shutil.rmtree(self.path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".fxquant-write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"cannot write run directory {self.path}: {exc.strerror}",
                              "choose a writable --out") from exc

    def read_info(self) -> dict[str, Any]:
        path = self.file(RUN_JSON)
        if not path.is_file():
            raise RunDirError(f"{self.path} is not an fxquant run directory (no {RUN_JSON})",
                              "pass the --out directory of `fxquant train`")
        try:
            info = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RunDirError(f"{path} is unreadable or not JSON: {exc}") from exc
        if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
            raise RunDirError(f"{path} is not an fxquant run record")
        if info.get("schema_version") != RUN_SCHEMA_VERSION:
            raise RunDirError(f"{path} has schema_version {info.get('schema_version')!r}; this fxquant "
                              f"{__version__} reads {RUN_SCHEMA_VERSION}", "retrain with this version")
        return info

    def write_info(self, info: dict[str, Any]) -> None:
        atomic_write_json(self.file(RUN_JSON), {"format": RUN_FORMAT, "schema_version": RUN_SCHEMA_VERSION,
                                                "fxquant_version": __version__, **info})

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.file(CHECKPOINT), lambda f: torch.save(state, f))

    def load_checkpoint(self) -> dict[str, Any]:
        path = self.file(CHECKPOINT)
        if not path.is_file():
            raise CheckpointError(f"no checkpoint in {self.path}", "train first, or pass the right run directory")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt file
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__})",
                                  "resume from an intact run or retrain") from exc

    # ------------------------------------------------------------------ model
    def model_file(self, override: Path | None = None) -> ModelFile:
        info = self.read_info()
        recorded = info["model_file"]
        path = Path(override or recorded["path"])
        mf = load_model_file(path)
        if override is None and file_sha256(path) != recorded["sha256"]:
            raise RunDirError(f"{path} changed since the run was trained (SHA-256 differs)",
                              "restore the file, or pass --model to use another copy deliberately")
        return mf


def export_dir(run_dir: Path) -> Path:
    path = Path(run_dir) / "export"
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise RunDirError(f"{path} is not writable")
    return path
