"""Remove every quantizer from a graph (the inverse of :class:`InsertQuantizers`).

Each quantizer node is replaced by its input (by ``relu(input)`` where a ReLU was fused into it), quantizer modules are deleted;
fxquant's fake-quant ops go back to their float form (an element-wise table to its function, the
reciprocal average pooling to torch's, the integer softmax / layer norm to torch's, masks kept); Conv/Linear stay in
their functional ``aten`` form on the original parameters, so the result computes the float model.
Idempotent (``modified=False`` when there is nothing to strip).
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxquant.ops.fake_quant import (ElementwiseTable, FixedPointAvgPool2d, FixedPointLayerNorm, FixedPointSoftmax,
                                   float_avg_pool2d, float_elementwise, float_softmax)
from fxquant.passes.insert_quantizers import QUANT_ROOT
from fxquant.quantizers import BiasQuantizer, FixedPointQuantizer


class StripQuantizers(PassBase):
    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                       (FixedPointQuantizer, BiasQuantizer)):
                replacement = node.args[0]
                if getattr(gm.get_submodule(str(node.target)), "relu", False):  # undo FuseReluIntoQuantizers
                    with gm.graph.inserting_before(node):
                        replacement = gm.graph.call_function(torch.relu, (node.args[0],))
                node.replace_all_uses_with(replacement)
                gm.graph.erase_node(node)
                modified = True
            elif node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)),
                                                         (ElementwiseTable, FixedPointAvgPool2d, FixedPointSoftmax,
                                                          FixedPointLayerNorm)):
                module = gm.get_submodule(str(node.target))
                with gm.graph.inserting_before(node):
                    if isinstance(module, FixedPointSoftmax):  # masked entries 0, as the integer op
                        replacement = gm.graph.call_function(float_softmax, (node.args[0], module.dim, *node.args[5:]))
                    elif isinstance(module, FixedPointLayerNorm):
                        replacement = gm.graph.call_function(torch.nn.functional.layer_norm, (
                            node.args[0], list(module.normalized_shape), *node.args[7:9], module.eps))
                    elif isinstance(module, ElementwiseTable):
                        replacement = gm.graph.call_function(float_elementwise, (
                            node.args[0], module.function, dict(module.params), *node.args[5:]))
                    else:
                        replacement = gm.graph.call_function(float_avg_pool2d, (node.args[0], module.config()))
                replacement.meta.update(node.meta)
                node.replace_all_uses_with(replacement)
                gm.graph.erase_node(node)
                modified = True
        for node in list(gm.graph.nodes):  # the bias quantizers' reads of FL/bits buffers
            if node.op == "get_attr" and str(node.target).startswith(f"{QUANT_ROOT}.") and not node.users:
                gm.graph.erase_node(node)
        if hasattr(gm, QUANT_ROOT):
            delattr(gm, QUANT_ROOT)
            modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)
