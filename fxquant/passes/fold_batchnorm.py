"""Fold BatchNorm into the preceding convolution / linear layer (before deployment).

For a conv ``y = W*x + b`` followed by BN with running statistics ``(mu, var)``, affine
``(gamma, beta)`` and ``eps``::

    s  = gamma / sqrt(var + eps)
    W' = W * s[:, None, None, None]          b' = (b - mu) * s + beta

The BN node is removed and the conv's parameters are replaced in place. Works on float graphs
(``call_module`` conv) and on quantized graphs from :class:`InsertQuantizers` (``aten.conv2d``
whose weight is a quantizer output); in the latter case the folded weight keeps its bit width and
gets ``FL = fit(max|W'|)`` (:func:`fxquant.fixed_point.fit_frac_bits`), and a bias quantizer is
attached when folding creates a bias. Run in eval mode, after training. Idempotent.

**Standalone BatchNorm2d** (not after a single-user conv: DenseNet's pre-activation BN, BN after
a cat or a pool) in a quantized graph becomes the per-channel affine it computes in eval mode, a
depthwise 1x1 conv: ``aten.conv2d(q_in(x), q_w(s), q_b(beta - mu s), groups=C)``, ``s`` of shape
``(C, 1, 1, 1)``, stored as the BN module's ``weight`` (and ``bias``), which the graph no longer
calls. Its input quantizer is the one :class:`InsertQuantizers` put before the BN
(training saw it), its weight quantizer the one it created for the BN's layer (a layer like any
conv in the precision map: role ``weight``, kind ``batchnorm``; FL refitted here to ``max|s|``), its
bias an int32 on ``FL_w + FL_in``. The lowering then emits exactly this conv. Other BN (float
graphs, BatchNorm1d) is left in place (integer exporters then reject it by name).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxquant.fixed_point import FixedPoint, fit_frac_bits
from fxquant.passes.insert_quantizers import QUANT_ROOT, attach_bias_quantizer, is_quantizer_node, module_key
from fxquant.passes.op_kinds import LAYER_META, call_arguments, node_kind
from fxquant.quantizers import WEIGHT, BiasQuantizer, FixedPointQuantizer



def _bn_parameters(gm: fx.GraphModule, bn: fx.Node) -> tuple[torch.Tensor, ...] | None:
    """``(gamma, beta, mean, var, eps)`` of a BN node in module or aten form; ``None`` if not constant."""
    if bn.op == "call_module":
        m = gm.get_submodule(str(bn.target))
        gamma = m.weight if m.affine else torch.ones_like(m.running_mean)
        beta = m.bias if m.affine else torch.zeros_like(m.running_mean)
        return gamma, beta, m.running_mean, m.running_var, m.eps
    a = call_arguments(gm, bn) or {}
    if a.get("training"):
        return None  # batch statistics: nothing constant to fold
    tensors = [a.get(k) for k in ("weight", "bias", "running_mean", "running_var")]
    if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in tensors):
        return None
    return (*(operator.attrgetter(str(t.target))(gm) for t in tensors), float(a["eps"]))


def _param_path(gm: fx.GraphModule, node: object) -> str | None:
    """The ``get_attr`` path behind a (weight or bias) quantizer or a plain parameter read."""
    if isinstance(node, fx.Node) and node.op == "call_module" and \
            isinstance(gm.get_submodule(str(node.target)), (FixedPointQuantizer, BiasQuantizer)):
        node = node.args[0]
    return str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _conv_params(gm: fx.GraphModule, conv: fx.Node) -> str | None:
    """The path of the conv's weight parameter, ``None`` unless it is a plain parameter.

    (``addmm``'s transposed weight is not: scaling its rows would scale the wrong axis.)
    """
    if conv.op == "call_module":
        return f"{conv.target}.weight"
    return _param_path(gm, conv.args[1])


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
                modified |= self._standalone(gm, bn)
                continue
            params = _bn_parameters(gm, bn)
            if params is None or _conv_params(gm, conv) is None:
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
    def _standalone(gm: fx.GraphModule, bn: fx.Node) -> bool:
        """A quantized standalone ``BatchNorm2d`` → ``conv2d(q_in(x), q_w(s), q_b(beta - mu s))``,
        a depthwise 1x1 conv (``groups = C``) with ``s = gamma / sqrt(var + eps)`` as its
        ``(C, 1, 1, 1)`` weight; the weight quantizer :class:`InsertQuantizers` made for the BN
        (layer = the BN's path) gets ``FL = fit(max|s|)`` at its width."""
        x = bn.args[0] if bn.args else None
        if bn.op != "call_module" or not isinstance(x, fx.Node) or not is_quantizer_node(gm, x):
            return False
        module = gm.get_submodule(str(bn.target))
        if not isinstance(module, nn.BatchNorm2d):
            return False
        layer = bn.meta.get(LAYER_META, str(bn.target))
        root = gm.get_submodule(QUANT_ROOT) if hasattr(gm, QUANT_ROOT) else {}
        key = module_key(layer, WEIGHT)
        if key not in root:
            return False
        wq: FixedPointQuantizer = root[key]
        gamma, beta, mean, var, eps = _bn_parameters(gm, bn)
        with torch.no_grad():
            scale = (gamma / torch.sqrt(var + eps)).detach()
            bias = (beta - mean * scale).detach()
        # the affine replaces the (now unused) module's weight and bias, so ``<layer>.weight`` is the
        # deployed weight for every reader of parameters by layer name (policies, bitops, census)
        module.weight = nn.Parameter(scale.reshape(-1, 1, 1, 1).clone())
        module.bias = nn.Parameter(bias.clone())
        if not wq.fmt.is_off:
            wq.set_format(FixedPoint(wq.fmt.bits, fit_frac_bits(float(scale.abs().max()), wq.fmt.bits)))
        path = str(bn.target)
        with gm.graph.inserting_before(bn):
            w = gm.graph.get_attr(f"{path}.weight")
            b = gm.graph.get_attr(f"{path}.bias")
            w_q = gm.graph.call_module(f"{QUANT_ROOT}.{key}", (w,))
            conv = gm.graph.call_function(torch.ops.aten.conv2d.default,
                                          (x, w_q, b, [1, 1], [0, 0], [1, 1], int(scale.numel())))
        conv.meta.update({k: v for k, v in bn.meta.items() if k in ("stack_trace",)})
        conv.meta["nn_module_stack"] = {path: (path, type(module))}
        conv.meta[LAYER_META] = layer
        bn.replace_all_uses_with(conv)
        gm.graph.erase_node(bn)
        attach_bias_quantizer(gm, conv, layer)
        return True

    @staticmethod
    def _fold(gm: fx.GraphModule, conv: fx.Node, gamma, beta, mean, var, eps) -> None:
        w_path = _conv_params(gm, conv)
        owner_path, _, _ = w_path.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        bias_arg = conv.args[2] if conv.op != "call_module" and len(conv.args) > 2 else None
        b_path = f"{conv.target}.bias" if conv.op == "call_module" else _param_path(gm, bias_arg)
        with torch.no_grad():
            scale = gamma / torch.sqrt(var + eps)
            weight = operator.attrgetter(w_path)(gm)
            weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))))
            old_bias = operator.attrgetter(b_path)(gm) if b_path else None
            bias = old_bias if old_bias is not None else torch.zeros_like(mean)
            new_bias = (bias - mean) * scale + beta
            if old_bias is not None:
                old_bias.copy_(new_bias)
            else:
                name = "bias" if getattr(owner, "bias", None) is None else f"{w_path.rpartition('.')[2]}_folded_bias"
                setattr(owner, name, nn.Parameter(new_bias.detach().clone()))
                b_path = f"{owner_path}.{name}" if owner_path else name
        if conv.op == "call_module":
            return
        wq_node = conv.args[1]
        if is_quantizer_node(gm, wq_node):
            wq: FixedPointQuantizer = gm.get_submodule(str(wq_node.target))
            if not wq.fmt.is_off:
                wq.set_format(FixedPoint(wq.fmt.bits, fit_frac_bits(float(weight.detach().abs().max()), wq.fmt.bits)))
        if bias_arg is None:
            with gm.graph.inserting_before(conv):
                bias_node = gm.graph.get_attr(b_path)
            args = list(conv.args) + [None] * (3 - len(conv.args))
            args[2] = bias_node
            conv.args = tuple(args)
            if is_quantizer_node(gm, wq_node) and is_quantizer_node(gm, conv.args[0]):
                attach_bias_quantizer(gm, conv, wq.layer)
