"""A trained run as what it deploys: the fake-quant model, its integer graph and held-out inputs.

``load_deployment(run_dir)`` rebuilds the quantized graph from the recorded model.py (SHA-256
checked by :class:`~fxquant.run_dir.RunDir`), loads the checkpoint, folds BatchNorm, applies the
deployed precision map (eval mode) and lowers it with
:func:`~fxquant.passes.lower_to_integer_graph`. Exports verify the integer graph against
``Deployment.model`` (the trained fake-quant graph) and each artifact against the integer graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from fxquant.errors import CheckpointError
from fxquant.integer_graph import IntegerGraph
from fxquant.model_file import ModelFile
from fxquant.run_dir import PRECISION_MAP, RunDir


def deployed_model(run: RunDir, model: Path | None = None) -> tuple[fx.GraphModule, ModelFile]:
    """The trained graph with BN folded and the deployed precision map applied (eval mode)."""
    from fxquant.passes import FoldBatchNorm
    from fxquant.precision_map import PrecisionMap
    from fxquant.quantized_graph import build_quantized_graph

    mf = run.model_file(model)
    gm = build_quantized_graph(mf)
    state = run.load_checkpoint()
    try:
        gm.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint in {run.path} does not fit {mf.path}: {str(exc).splitlines()[0]}",
                              "export with the model.py the run was trained with") from exc
    gm.eval()
    FoldBatchNorm()(gm)
    PrecisionMap.load(run.file(PRECISION_MAP)).apply(gm)
    return gm, mf


def held_out(mf: ModelFile, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` validation inputs and labels from model.py's ``data()``, in order (float inputs
    as float32, integer inputs such as token ids in their own dtype)."""
    _, val = mf.data(batch_size=256)
    xs, ys, count = [], [], 0
    for x, y in val:
        xs.append(x.numpy())
        ys.append(y.numpy())
        count += len(x)
        if count >= n:
            break
    x = np.concatenate(xs)[:n]
    return (x.astype(np.float32) if x.dtype.kind == "f" else x), np.concatenate(ys)[:n]  # token ids stay integers


@dataclass
class Deployment:
    """What a run deploys; ``model`` is the reference's reference (the trained fake-quant graph)."""

    run: RunDir
    model_file: ModelFile
    model: fx.GraphModule
    graph: IntegerGraph
    example_inputs: tuple[Any, ...]

    def held_out(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return held_out(self.model_file, n)


def load_deployment(run_dir: Path | RunDir, model: Path | None = None) -> Deployment:
    """Rebuild the run's deployed model and lower it to its integer graph."""
    from fxquant.passes import lower_to_integer_graph

    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    gm, mf = deployed_model(run, model)
    example = mf.example_inputs()
    if example is None:
        x, _ = held_out(mf, 1)
        example = (torch.from_numpy(x),)
    return Deployment(run, mf, gm, lower_to_integer_graph(gm, *example), tuple(example))


def load_integer_graph(run_dir: Path | RunDir, model: Path | None = None) -> IntegerGraph:
    """Shortcut: the run's :class:`~fxquant.integer_graph.IntegerGraph`."""
    return load_deployment(run_dir, model).graph


__all__ = ["Deployment", "deployed_model", "held_out", "load_deployment", "load_integer_graph"]
