"""Quantizer modules inserted into the graph by :class:`fxquant.passes.InsertQuantizers`.

A :class:`FixedPointQuantizer` holds its precision in **buffers** (``bits``, ``frac_bits``,
``grad_bits``, ``stochastic``, ``seed``) and records the magnitude it saw last (``amax``), so a
policy changes precision every step by writing buffers: no retrace, no ``torch.compile``
recompile, no reallocation, and the precision travels with ``state_dict``. The math is the fused
op :func:`torch.ops.fxquant.quantize` (formula in :mod:`fxquant.fixed_point`).

``max_bits`` caps the width a policy can set (:meth:`FixedPointQuantizer.set_format`): the input
quantizer of a lookup table (``lut``) gets ``fxquant.ops.fake_quant.DEFAULT_LUT_INPUT_BITS`` (8),
so its table has at most 256 entries whatever the policy's width.

``role`` is ``"weight"`` (a Conv/Linear weight) or ``"act"`` (a value entering quantized ops;
the output precision of its producer layer). In training an activation quantizer never saturates
a batch whose range outgrew the FL its policy set from earlier batches: it lowers ``frac_bits`` to
fit that batch first (and the policy's moving maximum then includes it). Without this, a range
that grows quickly (attention scores early in training) is clipped, and the straight-through
gradient of every clipped entry is zero: a ViT's scores saturated at step 3 and training diverged.
In evaluation the format is what the policy or precision map set, as deployed. The backward pass of either quantizes the gradient
flowing through it to ``grad_bits`` (32 = off) with a dynamic FL.

:class:`BiasQuantizer` puts a bias on the accumulator grid ``FL_w + FL_in`` as int32.
"""

from __future__ import annotations

import operator
from functools import partial
from typing import Any, Callable

import torch
from torch import fx, nn

import fxquant.ops  # noqa: F401  (registers torch.ops.fxquant.*)
from fxquant.fixed_point import BIAS_BITS, FRAC_BITS_LIMIT, OFF_BITS, FixedPoint, check_bits, check_frac_bits

WEIGHT, ACT = "weight", "act"


def kernel_bits(bits: torch.Tensor) -> torch.Tensor:
    """A spec width (``32`` = off) as the fused op's width (``0`` = off)."""
    return torch.where(bits >= OFF_BITS, torch.zeros_like(bits), bits)


def widen_frac_bits_(frac_bits: torch.Tensor, bits: torch.Tensor, x: torch.Tensor) -> None:
    """Lower ``frac_bits`` in place (no host sync) so that ``max|x|`` fits ``<bits, frac_bits>``:
    ``min(FL, fit_frac_bits(max|x|, BW))`` (:func:`fxquant.fixed_point.fit_frac_bits`); unchanged for
    an off format, an empty or all-zero ``x`` or a non-finite range. Training only (module docstring):
    quantizers call it on their input, the integer fake-quant ops (softmax, LayerNorm, tables, which
    compute at their output quantizer's format) on their float output."""
    if x.numel() == 0:
        return
    with torch.no_grad():
        amax = x.detach().abs().amax().float()
        _, exponent = torch.frexp(amax)  # amax = m 2^e, 0.5 <= m < 1: fit = BW - 2 - (e - 1)
        fit = (bits - 1 - exponent).clamp(-FRAC_BITS_LIMIT, FRAC_BITS_LIMIT).to(frac_bits.dtype)
        use = (amax > 0) & torch.isfinite(amax) & (bits < OFF_BITS)
        frac_bits.copy_(torch.where(use, torch.minimum(frac_bits, fit), frac_bits))


class FixedPointQuantizer(nn.Module):
    """``y = q_<bits,frac_bits>(x)`` with STE gradient; see module docstring."""

    def __init__(self, layer: str, role: str, fmt: FixedPoint = FixedPoint(OFF_BITS, 0),
                 grad_bits: int = OFF_BITS, stochastic: bool = False, kind: str = "") -> None:
        super().__init__()
        self.layer = layer
        self.role = role
        self.kind = kind  # op kind of the layer (conv2d, linear, add, input, …), for maps and reports
        self.relu = False  # a ReLU fused in by FuseReluIntoQuantizers: y = q(relu(x))
        self.max_bits: int | None = None  # width cap (a lookup table's input: 2^bits entries)
        self.register_buffer("bits", torch.tensor(fmt.bits, dtype=torch.int32))
        self.register_buffer("frac_bits", torch.tensor(fmt.frac_bits or 0, dtype=torch.int32))
        self.register_buffer("grad_bits", torch.tensor(check_bits(grad_bits, "grad_bits"), dtype=torch.int32))
        self.register_buffer("stochastic", torch.tensor(bool(stochastic)))
        self.register_buffer("seed", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("amax", torch.tensor(0.0))

    @property
    def fmt(self) -> FixedPoint:
        return FixedPoint(int(self.bits), int(self.frac_bits))

    def set_format(self, fmt: FixedPoint) -> None:
        """Write ``<bits, frac_bits>`` in place (policies call this every step).

        A quantizer with ``max_bits`` (the input of a lookup table) keeps at most that width: a
        policy asking for more gets ``max_bits`` (an off quantizer stays off).
        """
        bits = check_bits(fmt.bits)
        if self.max_bits is not None and bits != OFF_BITS:
            bits = min(bits, self.max_bits)
        self.bits.fill_(bits)
        self.frac_bits.fill_(check_frac_bits(fmt.frac_bits) or 0)

    def set_grad_bits(self, bits: int) -> None:
        self.grad_bits.fill_(check_bits(bits, "grad_bits"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # a fresh stochastic-rounding stream per step (before the op saves it)
            with torch.no_grad():
                self.seed.add_(1)
                if self.role == ACT:
                    self._widen_to(x)
            stochastic = self.stochastic
        else:  # evaluation and deployment always round to nearest
            stochastic = torch.zeros_like(self.stochastic)
        y, amax = torch.ops.fxquant.quantize(x, kernel_bits(self.bits), self.frac_bits,
                                             kernel_bits(self.grad_bits), stochastic, self.seed, self.relu)
        with torch.no_grad():
            self.amax.copy_(amax)
        return y

    def _widen_to(self, x: torch.Tensor) -> None:
        widen_frac_bits_(self.frac_bits, self.bits, x.clamp_min(0) if self.relu else x)

    def extra_repr(self) -> str:
        relu = ", relu" if self.relu else ""
        cap = f", max_bits={self.max_bits}" if self.max_bits is not None else ""
        return f"layer={self.layer!r}, role={self.role}, fmt={self.fmt}, grad_bits={int(self.grad_bits)}{relu}{cap}"


class BiasQuantizer(nn.Module):
    """``b_q = clamp(round(b * 2^(FL_w+FL_in)), int32) * 2^-(FL_w+FL_in)``; identity if either is off.

    The FLs arrive as graph inputs (the weight and input quantizers' ``frac_bits`` buffers), so a
    policy's change of either reaches the bias without retracing. The straight-through gradient
    passes unchanged (int32 saturation is never reached by a trained bias).
    """

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("bits", torch.tensor(BIAS_BITS, dtype=torch.int32))
        self.register_buffer("grad_bits", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("stochastic", torch.tensor(False))
        self.register_buffer("seed", torch.tensor(0, dtype=torch.int64))

    def forward(self, bias: torch.Tensor, weight_frac_bits: torch.Tensor, in_frac_bits: torch.Tensor,
                weight_bits: torch.Tensor, in_bits: torch.Tensor) -> torch.Tensor:
        off = (weight_bits >= OFF_BITS) | (in_bits >= OFF_BITS)
        bits = torch.where(off, torch.zeros_like(self.bits), self.bits)
        y, _ = torch.ops.fxquant.quantize(bias, bits, weight_frac_bits + in_frac_bits, self.grad_bits,
                                          self.stochastic, self.seed)
        return y


def weight_inputs(model: nn.Module) -> dict[str, tuple[str, Callable[[], torch.Tensor]]]:
    """Per layer with a weight quantizer: the parameter it reads and a function giving the tensor the
    quantizer sees now. In a graph the weight can be parameter arithmetic (``aten.t(W)`` of a
    Hugging Face ``Conv1D``, ``scaled_parameter(W, s)`` of a folded attention scale, a packed
    ``in_proj_weight``): the parameter is the ``get_attr`` it starts from, the function evaluates the
    arithmetic on its current value. Outside a graph: ``{layer}.weight`` itself."""
    params = dict(model.named_parameters())
    out: dict[str, tuple[str, Callable[[], torch.Tensor]]] = {}
    graph = getattr(model, "graph", None)
    if isinstance(graph, fx.Graph):
        for node in graph.nodes:
            q = model.get_submodule(str(node.target)) if node.op == "call_module" else None
            if isinstance(q, FixedPointQuantizer) and q.role == WEIGHT and isinstance(node.args[0], fx.Node):
                src = node.args[0]
                start = src
                while start.op != "get_attr" and start.args and isinstance(start.args[0], fx.Node):
                    start = start.args[0]
                if start.op == "get_attr" and str(start.target) in params:
                    out.setdefault(q.layer, (str(start.target), partial(_evaluate, model, src)))
    for (layer, role) in quantizers(model):
        if role == WEIGHT and layer not in out and f"{layer}.weight" in params:
            out[layer] = (f"{layer}.weight", partial(params.__getitem__, f"{layer}.weight"))
    return out


def _evaluate(model: nn.Module, node: Any) -> Any:
    """A graph expression on parameters and buffers only (the weight of :func:`weight_inputs`)."""
    if not isinstance(node, fx.Node):
        return fx.node.map_arg(node, partial(_evaluate, model)) if isinstance(node, (list, tuple)) else node
    if node.op == "get_attr":
        return operator.attrgetter(str(node.target))(model)
    args = [_evaluate(model, a) for a in node.args]
    kwargs = {k: _evaluate(model, v) for k, v in node.kwargs.items()}
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return model.get_submodule(str(node.target))(*args, **kwargs)


def quantizers(model: nn.Module) -> dict[tuple[str, str], FixedPointQuantizer]:
    """All fixed-point quantizers of ``model`` keyed by ``(layer, role)``."""
    return {(m.layer, m.role): m for m in model.modules() if isinstance(m, FixedPointQuantizer)}
