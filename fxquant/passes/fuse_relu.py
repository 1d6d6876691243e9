"""Fuse a ReLU into the activation quantizer it feeds (after :class:`InsertQuantizers`).

``q(relu(x)) = clamp(round(x * 2^FL), 0, 2^(BW-1)-1) * 2^-FL`` exactly, so a ReLU whose only user
is an activation quantizer is removed and the quantizer clamps at 0 (``quantizer.relu = True``)::

    bn ─ relu ─ q[conv1]      →      bn ─ q[conv1, relu]

Numerics are unchanged (forward bit for bit; the gradient is ReLU's mask times the quantizer's
straight-through mask, as before); training saves the ReLU's forward and backward passes.
:class:`StripQuantizers` puts the ReLU back. Idempotent.
"""

from __future__ import annotations

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxquant.passes.insert_quantizers import is_quantizer_node
from fxquant.passes.op_kinds import node_kind
from fxquant.quantizers import ACT


class FuseReluIntoQuantizers(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node_kind(gm, node) != "relu" or len(node.users) != 1:
                continue
            user = next(iter(node.users))
            if not is_quantizer_node(gm, user):
                continue
            q = gm.get_submodule(str(user.target))
            if q.role != ACT or q.relu:
                continue
            q.relu = True
            user.replace_input_with(node, node.args[0])
            gm.graph.erase_node(node)
            modified = True
        if modified:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
