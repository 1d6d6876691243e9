"""Capture an ``nn.Module`` as a ``torch.fx.GraphModule`` (first step of every pipeline).

``torch.fx.symbolic_trace`` first: it keeps the module hierarchy (``call_module`` nodes) and
works without example inputs. Models it cannot trace (Python control flow on tensor shapes or
values, for instance) fall back to ``torch.export`` with the example inputs, which specializes
shape-dependent branches (BatchNorm/dropout then keep the train/eval behaviour they had at
capture). If both fail, :class:`~fxquant.errors.CaptureError` names the offending
line of the user's code.
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
from torch import fx, nn

from fxquant.errors import CaptureError

CAPTURED_BY = "fxquant_captured_by"


def _user_frame(exc: BaseException) -> str | None:
    """``file:line: code`` of the innermost traceback frame outside torch and fxquant."""
    best = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or "/fxquant/" in path or path.startswith("<"):
            continue
        best = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return best


def capture(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, or with ``torch.export`` if fx fails (needs example inputs)."""
    try:
        gm = fx.symbolic_trace(model)
        gm.meta[CAPTURED_BY] = "torch.fx"
        return gm
    except Exception as fx_error:  # noqa: BLE001 - any tracing failure triggers the fallback
        fx_where = _user_frame(fx_error)
        if example_inputs is None:
            raise CaptureError(f"torch.fx cannot trace {type(model).__name__} at {fx_where}: "
                               f"{str(fx_error).splitlines()[0]}",
                               "define example_inputs() in model.py so torch.export can capture it") from fx_error
        was_training = model.training
        try:
            exported = torch.export.export(model, tuple(example_inputs), strict=False)
        except Exception as export_error:  # noqa: BLE001
            where = _user_frame(export_error) or fx_where or "an unknown line"
            raise CaptureError(f"cannot capture {type(model).__name__}: torch.fx and torch.export both "
                               f"failed at {where}: {str(export_error).splitlines()[0][:200]}",
                               "avoid Python control flow on tensor values (use torch.where / torch.cond)"
                               ) from export_error
        unlifted = exported.module()
        for node in list(unlifted.graph.nodes):  # export's input guard is not part of the model
            if node.op == "call_module" and str(node.target) == "_guards_fn":
                unlifted.graph.erase_node(node)
        unlifted.graph.eliminate_dead_code()
        # a plain GraphModule (export's own refuses .train()/.eval()); BN/dropout keep the
        # train/eval behaviour they had at capture time
        gm = fx.GraphModule(unlifted, unlifted.graph)
        gm.train(was_training)
        gm.meta[CAPTURED_BY] = "torch.export"
        return gm
