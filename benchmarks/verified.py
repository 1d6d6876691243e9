"""The one gate every latency benchmark passes before it times an artifact.

:func:`verified_export` exports ``graph`` for a target through the backend contract
(:func:`fxquant.backends.base.export`: check → build in a temporary directory → verify bit-exact
against ``IntegerGraph.run`` → move into place), then reads it back through
:func:`fxquant.backends.base.verified_artifact`, which refuses a directory that was never
verified, failed verification, or holds another graph's artifact. Only what passes is timed, and
each row of a table names the directory it timed and the verification that certified it
(:func:`artifact_label`). Float baselines (ORT on an FP32 model, torch eager) are not integer-exact:
their rows say ``float baseline, not verified``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

FLOAT_BASELINE = "float baseline, not verified (not integer-exact)"


def verified_export(target_name: str, graph: Any, out_dir: Path, inputs: Sequence[np.ndarray],
                    **options: Any) -> tuple[Path, dict[str, Any]]:
    """Export ``graph`` for ``target_name`` into ``out_dir`` and return it with its certified report."""
    from fxquant.backends.base import export, verified_artifact
    from fxquant.backends.registry import get_target

    target = get_target(target_name)
    export(target, graph, Path(out_dir), inputs, **options)
    return Path(out_dir), verified_artifact(target, graph, Path(out_dir))


def artifact_label(out_dir: Path, report: dict[str, Any]) -> str:
    """``<target> artifact <dir>, verified bit-exact on N samples`` (what a benchmark row timed)."""
    v = report["verification"]
    return (f"{report['target']} artifact {out_dir}, verified bit-exact vs IntegerGraph.run on {v['n']} samples "
            f"({v['mismatches']} mismatches)")


__all__ = ["FLOAT_BASELINE", "artifact_label", "verified_export"]
