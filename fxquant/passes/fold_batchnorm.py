"""Fold BatchNorm into the preceding convolution / linear layer (before deployment).

For a conv ``y = W*x + b`` followed by BN with running statistics ``(mu, var)``, affine
``(gamma, beta)`` and ``eps``::

    s  = gamma / sqrt(var + eps)
    W' = W * s[:, None, None, None]          b' = (b - mu) * s + beta

The BN node is removed and the conv's parameters are replaced in place. Works on float graphs
(``call_module`` conv) and on quantized graphs from :class:`InsertQuantizers` (``aten.conv2d``
whose weight is a quantizer output); in the latter case the folded weight keeps its bit width and
gets ``FL = fit(max|W'|)`` (:func:`fxquant.fixed_point.fit_frac_bits`), and a bias quantizer is
attached when folding creates a bias. Run in eval mode, after training. BN not preceded by a
single-user conv is left in place (integer exporters then reject it by name). Idempotent.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxquant.fixed_point import FixedPoint, fit_frac_bits
from fxquant.passes.insert_quantizers import attach_bias_quantizer, is_quantizer_node
from fxquant.passes.op_kinds import node_kind
from fxquant.quantizers import FixedPointQuantizer

_aten = torch.ops.aten


def _bn_parameters(gm: fx.GraphModule, bn: fx.Node) -> tuple[torch.Tensor, ...] | None:
    """``(gamma, beta, mean, var, eps)`` of a BN node in module or aten form; ``None`` if not constant."""
    if bn.op == "call_module":
        m = gm.get_submodule(str(bn.target))
        gamma = m.weight if m.affine else torch.ones_like(m.running_mean)
        beta = m.bias if m.affine else torch.zeros_like(m.running_mean)
        return gamma, beta, m.running_mean, m.running_var, m.eps
    # aten.batch_norm(input, weight, bias, mean, var, training, momentum, eps)
    # aten._native_batch_norm_legit_no_training(input, weight, bias, mean, var, momentum, eps)
    tensors = bn.args[1:5]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in tensors):
        return None
    eps = bn.args[7] if bn.target == _aten.batch_norm.default else bn.args[6]
    return (*(operator.attrgetter(str(a.target))(gm) for a in tensors), float(eps))


def _conv_params(gm: fx.GraphModule, conv: fx.Node) -> tuple[str, nn.Module | None]:
    """The owning path of the conv weight (``path.weight``) and the module if any."""
    if conv.op == "call_module":
        return str(conv.target), gm.get_submodule(str(conv.target))
    weight = conv.args[1]
    if is_quantizer_node(gm, weight):
        weight = weight.args[0]
    return str(weight.target).rsplit(".", 1)[0], None


class FoldBatchNorm(PassBase):
    """The pass (see module docstring)."""

    def call(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        for bn in list(gm.graph.nodes):
            if node_kind(gm, bn) != "batchnorm":
                continue
            conv = bn.args[0]
            if not isinstance(conv, fx.Node) or node_kind(gm, conv) not in ("conv2d", "linear") \
                    or len(conv.users) != 1:
                continue
            params = _bn_parameters(gm, bn)
            if params is None:
                continue
            gamma, beta, mean, var, eps = params
            self._fold(gm, conv, gamma, beta, mean, var, eps)
            # aten BN nodes in training IR return a tuple; the eval forms return the tensor
            bn.replace_all_uses_with(conv)
            gm.graph.erase_node(bn)
            modified = True
        if modified:
            gm.graph.eliminate_dead_code()
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified)

    @staticmethod
    def _fold(gm: fx.GraphModule, conv: fx.Node, gamma, beta, mean, var, eps) -> None:
        path, _ = _conv_params(gm, conv)
        owner = gm.get_submodule(path) if path else gm
        with torch.no_grad():
            scale = gamma / torch.sqrt(var + eps)
            weight = owner.weight
            weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))))
            bias = owner.bias if getattr(owner, "bias", None) is not None else torch.zeros_like(mean)
            new_bias = (bias - mean) * scale + beta
            if getattr(owner, "bias", None) is not None:
                owner.bias.copy_(new_bias)
            else:
                owner.bias = nn.Parameter(new_bias.detach().clone())
        if conv.op == "call_module":
            return
        wq_node = conv.args[1]
        if is_quantizer_node(gm, wq_node):
            wq: FixedPointQuantizer = gm.get_submodule(str(wq_node.target))
            if not wq.fmt.is_off:
                wq.set_format(FixedPoint(wq.fmt.bits, fit_frac_bits(float(weight.detach().abs().max()), wq.fmt.bits)))
        if len(conv.args) < 3 or conv.args[2] is None:
            with gm.graph.inserting_before(conv):
                bias_node = gm.graph.get_attr(f"{path}.bias")
            args = list(conv.args) + [None] * (3 - len(conv.args))
            args[2] = bias_node
            conv.args = tuple(args)
            if is_quantizer_node(gm, wq_node) and is_quantizer_node(gm, conv.args[0]):
                attach_bias_quantizer(gm, conv, wq.layer)


