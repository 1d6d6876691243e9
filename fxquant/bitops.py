"""BitOPs accounting of quantized training (CPT's cost measure, Fu et al. 2021, Tab. 2).

For every Conv/Linear layer ``l`` with ``M_l`` multiply-accumulates per sample (from one shape
propagation), weight bits ``w_l``, input activation bits ``a_l`` (the quantizer feeding the
layer) and error bits ``g_l`` (the width of ``dL/dy_l``, the gradient at the layer's output that
both backward GEMMs read), one training sample costs::

    forward            M_l * w_l * a_l
    backward, errors   M_l * w_l * g_l      (dL/dx = W^T dL/dy)
    backward, grads    M_l * a_l * g_l      (dL/dW = dL/dy x^T)

and a step costs ``batch * sum_l M_l (w_l a_l + w_l g_l + a_l g_l)``.

``g_l`` is what the graph really delivers: a quantizer's backward puts the gradient flowing through
it on a ``grad_bits`` grid, so ``g_l`` is the ``grad_bits`` of the activation quantizer that
``y_l`` reaches through ops whose backward keeps that grid (ReLU's mask, flatten/view/reshape,
identity, a non-overlapping max pool's routing). Anything else in between (BatchNorm during
training, dropout's rescale, several users whose gradients add up, no quantizer at all) leaves
``dL/dy_l`` in float and it counts as **32 bits**. The weight quantizer's ``grad_bits`` rounds
``dL/dW``, the *result* of the weight-gradient GEMM, and is not an operand width. A width of 32
(quantizer off) counts as 32 bits, so FP32 training costs ``batch * sum_l 3 * 32^2 * M_l``. This reproduces
the paper's ratios (e.g. FW6/BW6 vs FW8/BW8: ``3*36 / 3*64 = 0.5625``, Tab. 2 ResNet-74). The first
layer's error GEMM is counted too (as the paper's per-layer figures do); element-wise ops,
BatchNorm and the weight update are not counted. A **matmul of two quantized activations**
(attention's ``Q K^T`` and ``P V``) counts like a layer, its second operand in the weight's role;
softmax, LayerNorm and embedding lookups are element-wise or gathers (no GEMM): not counted.

The **static counterpart** ("vs static B") costs the same with ``w_l = a_l = B`` and the run's own
error widths; ``B`` is the policy's :attr:`~fxquant.policies.base.Policy.reference_bits`
(CPT: ``B_max``; AdaPT: its initial width), or each layer's starting widths when ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from fxquant.fixed_point import OFF_BITS
from fxquant.passes.insert_quantizers import grid_quantizer, is_quantizer_node
from fxquant.passes.op_kinds import LAYER_META, WEIGHTED_KINDS, node_kind, tensor_inputs
from fxquant.quantizers import WEIGHT, FixedPointQuantizer

FP32_BITS = OFF_BITS


@dataclass(frozen=True)
class LayerCost:
    layer: str
    macs: int  # per sample
    weight_q: FixedPointQuantizer
    input_q: FixedPointQuantizer | None  # None: the input is not quantized (counts as 32 bits)
    error_q: FixedPointQuantizer | None = None  # its backward yields dL/dy; None: float error (32 bits)


_GRID_KEEPING_BACKWARD = frozenset({"relu", "flatten"})


def _keeps_grid_backward(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node``'s backward passes a gradient on and keeps it on its fixed-point grid."""
    kind = node_kind(gm, node)
    if kind in _GRID_KEEPING_BACKWARD:
        return True
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, torch.nn.Identity):
            return True
        if isinstance(module, torch.nn.MaxPool2d):  # each input receives at most one output's gradient
            k, st = module.kernel_size, module.stride or module.kernel_size
            k, st = (k, k) if isinstance(k, int) else tuple(k), (st, st) if isinstance(st, int) else tuple(st)
            return module.dilation == 1 and all(s >= kk for s, kk in zip(st, k))
        return False
    return kind == "identity" and node.target in (torch.ops.aten.clone.default, "contiguous")


def error_quantizer(gm: fx.GraphModule, node: fx.Node) -> FixedPointQuantizer | None:
    """The activation quantizer whose backward produces ``dL/d node`` (module docstring), or ``None``."""
    while True:
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if is_quantizer_node(gm, user):
            return gm.get_submodule(str(user.target))
        if not _keeps_grid_backward(gm, user) or tensor_inputs(user)[:1] != [node]:
            return None
        node = user


@torch.no_grad()
def layer_costs(gm: fx.GraphModule, example: torch.Tensor) -> list[LayerCost]:
    """MACs per sample of every quantized Conv/Linear of ``gm`` (one eval-mode shape propagation).

    Quantizer buffers touched by the forward (``amax``) are restored afterwards.
    """
    qs = [m for m in gm.modules() if isinstance(m, FixedPointQuantizer)]
    saved = [(q.amax.clone(), q.seed.clone()) for q in qs]
    was_training = gm.training
    gm.eval()
    ShapeProp(gm).propagate(example[:1])
    gm.train(was_training)
    for q, (amax, seed) in zip(qs, saved):
        q.amax.copy_(amax)
        q.seed.copy_(seed)
    costs = []
    for node in gm.graph.nodes:
        cost = _activation_matmul_cost(gm, node)
        if cost is not None:
            costs.append(cost)
            continue
        if node_kind(gm, node) not in WEIGHTED_KINDS or len(node.args) < 2 or not isinstance(node.args[1], fx.Node) \
                or not is_quantizer_node(gm, node.args[1]):
            continue
        wq = gm.get_submodule(str(node.args[1].target))
        src = node.args[0]
        src = (grid_quantizer(gm, src) or src) if isinstance(src, fx.Node) else src
        iq = gm.get_submodule(str(src.target)) if isinstance(src, fx.Node) and is_quantizer_node(gm, src) else None
        out_shape = node.meta["tensor_meta"].shape
        weight_shape = node.args[1].meta["tensor_meta"].shape
        per_output = 1
        for d in weight_shape[1:]:
            per_output *= int(d)
        outputs = 1
        for d in out_shape[1:]:
            outputs *= int(d)
        costs.append(LayerCost(wq.layer, outputs * per_output, wq, iq, error_quantizer(gm, node)))
    return costs


def _activation_matmul_cost(gm: fx.GraphModule, node: fx.Node) -> LayerCost | None:
    """``a @ b`` of two quantized activations (attention's ``Q K^T``, ``P V``): ``M = prod(out) * K``
    per sample, ``b``'s quantizer in the weight's role and ``a``'s as the input (the backward GEMMs
    read ``dL/dy`` with ``b`` and with ``a``, as a linear layer's do with ``W`` and ``x``)."""
    if node_kind(gm, node) != "matmul" or len(node.args) < 2 or LAYER_META not in node.meta:
        return None
    qs = []
    for arg in node.args[:2]:
        q = grid_quantizer(gm, arg) if isinstance(arg, fx.Node) else None
        if q is None or gm.get_submodule(str(q.target)).role == WEIGHT:
            return None
        qs.append(gm.get_submodule(str(q.target)))
    a_shape, out_shape = node.args[0].meta["tensor_meta"].shape, node.meta["tensor_meta"].shape
    macs = int(a_shape[-1])
    for d in out_shape[1:]:
        macs *= int(d)
    return LayerCost(node.meta[LAYER_META], macs, qs[1], qs[0], error_quantizer(gm, node))


def _bits(q: FixedPointQuantizer | None, which: str = "bits") -> int:
    return FP32_BITS if q is None else min(int(getattr(q, which)), FP32_BITS)


def step_bitops(costs: list[LayerCost], batch: int, fw_bits: dict[str, tuple[int, int]] | int | None = None,
                bw_bits: int | None = None) -> int:
    """BitOPs of one training step (module docstring) at the model's current widths.

    ``fw_bits`` overrides the (weight, input) widths: one width for all, or ``{layer: (w, a)}``;
    ``bw_bits`` overrides the error widths ``g_l``.
    """
    total = 0
    for c in costs:
        if fw_bits is None:
            w, a = _bits(c.weight_q), _bits(c.input_q)
        elif isinstance(fw_bits, dict):
            w, a = fw_bits[c.layer]
        else:
            w = a = fw_bits
        g = bw_bits if bw_bits is not None else _bits(c.error_q, "grad_bits")
        total += c.macs * (w * a + w * g + a * g)
    return batch * total


class BitOpsMeter:
    """Cumulative BitOPs of a run, with its FP32 and static-counterpart equivalents."""

    def __init__(self, costs: list[LayerCost], reference_bits: int | None) -> None:
        self.costs = costs
        self.reference: dict[str, tuple[int, int]] | int = (
            reference_bits if reference_bits is not None
            else {c.layer: (_bits(c.weight_q), _bits(c.input_q)) for c in costs})
        self.total = self.total_fp32 = self.total_ref = 0

    def step(self, batch: int) -> dict[str, float]:
        """Account one step of ``batch`` samples at the model's current widths."""
        now = step_bitops(self.costs, batch)
        self.total += now
        self.total_fp32 += step_bitops(self.costs, batch, FP32_BITS, FP32_BITS)
        self.total_ref += step_bitops(self.costs, batch, self.reference)
        return {"bitops": now, "bitops_cum": self.total,
                "bitops_vs_fp32": self.total / self.total_fp32 if self.total_fp32 else 1.0,
                "bitops_vs_static": self.total / self.total_ref if self.total_ref else 1.0}

    def state_dict(self) -> dict[str, object]:
        return {"total": self.total, "total_fp32": self.total_fp32, "total_ref": self.total_ref,
                "reference": self.reference}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.total, self.total_fp32, self.total_ref = state["total"], state["total_fp32"], state["total_ref"]
        ref = state["reference"]
        self.reference = {k: (int(v[0]), int(v[1])) for k, v in ref.items()} if isinstance(ref, dict) else int(ref)
