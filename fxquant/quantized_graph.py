"""model.py → the captured graph with (initially off) quantizers: the one pipeline training starts from.

:func:`build_quantized_graph` runs :func:`~fxquant.passes.capture`, :class:`~fxquant.passes.InsertQuantizers`
and :class:`~fxquant.passes.FuseReluIntoQuantizers`. The trainer, the precision range test
(:mod:`fxquant.policies.prt`) and :mod:`fxquant.deployment` all build their graph here, so none of
them imports another for it (no import cycle trainer ↔ policies ↔ deployment).
"""

from __future__ import annotations

from torch import fx

from fxquant.model_file import ModelFile


def build_quantized_graph(mf: ModelFile) -> fx.GraphModule:
    """model.py → captured graph with (initially off) quantizers, ReLUs fused into them."""
    from fxquant.passes import FuseReluIntoQuantizers, InsertQuantizers, capture

    gm = capture(mf.model(), mf.example_inputs())
    InsertQuantizers()(gm)
    FuseReluIntoQuantizers()(gm)
    return gm


__all__ = ["build_quantized_graph"]
