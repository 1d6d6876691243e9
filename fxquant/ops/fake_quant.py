"""Fake-quant training ops that compute exactly what their integer op computes.

:class:`InsertQuantizers` puts these modules in place of the float ops whose integer form is not
"the float op, then a quantizer":

* :class:`ElementwiseTable` (op kind ``lut``): an element-wise function (sigmoid, SiLU, GELU, ...)
  of a quantized input. **Forward**: the input integer ``k = x * 2^FL_in`` indexes the same table
  the integer graph stores (:func:`fxquant.elementwise.table`, one per (input format, function,
  output format), cached), ``y = table[k - qmin_in] * 2^-FL_out``: exact, a gather. **Backward**:
  the float derivative of the function at ``x`` (autograd of the torch function); the quantizers
  around it are straight-through as everywhere. With either quantizer off (or an input wider than
  :data:`~fxquant.fixed_point.MAX_LUT_BITS`) it is the float function.
* :class:`FixedPointAvgPool2d` (op kind ``avgpool2d``): the window *sum* times ``M * 2^-s`` with
  ``(M, s) = fixed_point.reciprocal(d)`` for each window's divisor ``d``
  (:func:`fxquant.integer_graph.avg_divisors`: padding counted, ceil-mode overhang not), so the
  output quantizer rounds ``sum * M`` at ``FL_in + s`` like the integer op. A power-of-two window
  is ``M = 1``: the exact average. In float64 every step is exact (sums and products of integers
  below ``2^53``); float32 training may round ``sum * M``. Adaptive pooling becomes a uniform
  window where the input divides by the output size; what has no exact window form
  (:func:`avgpool_window` says why) runs torch's own pooling and the lowering refuses it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fxquant.fixed_point import MAX_LUT_BITS, OFF_BITS, FixedPoint, reciprocal
from fxquant.quantizers import widen_frac_bits_

TORCH_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": lambda x: torch.sigmoid(x),
    "tanh": lambda x: torch.tanh(x),
    "silu": lambda x: F.silu(x),
    "hardsigmoid": lambda x: F.hardsigmoid(x),
    "hardswish": lambda x: F.hardswish(x),
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "mish": lambda x: F.mish(x),
    "softplus": lambda x: F.softplus(x),
    "elu": lambda x, alpha=1.0: F.elu(x, alpha),
    "leaky_relu": lambda x, negative_slope=0.01: F.leaky_relu(x, negative_slope),
    "exp": lambda x: torch.exp(x),
}
"""The torch form of each :data:`fxquant.elementwise.FUNCTIONS` entry (for the backward)."""

DEFAULT_LUT_INPUT_BITS = 8
"""Width cap of a table's input quantizer (``2^8`` entries); at most ``MAX_LUT_BITS``."""


class _TableLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, in_frac_bits: int, qmin: int, out_frac_bits: int, fn, *weights):
        ctx.fn = fn
        ctx.save_for_backward(x, *weights)
        k = torch.round(torch.ldexp(x.detach().double(), torch.tensor(in_frac_bits, dtype=torch.float64)))
        idx = (k.long() - qmin).clamp(0, table.numel() - 1)
        y = torch.ldexp(table.to(torch.float64)[idx], torch.tensor(-out_frac_bits, dtype=torch.float64))
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, *weights = ctx.saved_tensors
        with torch.enable_grad():
            xs = x.detach().requires_grad_(True)
            ws = [w.detach().requires_grad_(True) for w in weights]
            y = ctx.fn(xs, *ws)
            grads = torch.autograd.grad(y, [xs, *ws], grad)
        return (grads[0], None, None, None, None, None, *grads[1:])


class ElementwiseTable(nn.Module):
    """``lut`` in training: see module docstring. ``forward(x, in_bits, in_frac_bits, out_bits,
    out_frac_bits[, prelu_weight])``, the formats being the two quantizers' buffers."""

    fxq_kind = "lut"

    def __init__(self, layer: str, function: str, params: dict[str, float] | None = None) -> None:
        super().__init__()
        if function != "prelu" and function not in TORCH_FUNCTIONS:
            raise ValueError(f"no element-wise table for {function!r}")
        self.layer = layer
        self.function = function
        self.params = dict(params or {})
        self._tables: dict[tuple, torch.Tensor] = {}

    def config(self) -> dict[str, Any]:
        return {"function": self.function, "params": dict(self.params)}

    def table_function(self, weight: torch.Tensor | None = None) -> tuple[str, dict[str, float]]:
        """``(FUNCTIONS name, params)``; a one-parameter PReLU is ``leaky_relu`` at its slope."""
        if self.function == "prelu":
            if weight is None or weight.numel() != 1:
                n = None if weight is None else weight.numel()
                raise ValueError(f"layer {self.layer!r}: PReLU with {n} parameters has no table form "
                                 "(one table per channel)")
            return "leaky_relu", {"negative_slope": float(weight.detach().reshape(()))}
        return self.function, self.params

    def _torch_fn(self, x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return float_elementwise(x, self.function, self.params, *weights)

    def forward(self, x: torch.Tensor, in_bits: torch.Tensor, in_frac_bits: torch.Tensor,
                out_bits: torch.Tensor, out_frac_bits: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        bi, bo = int(in_bits), int(out_bits)
        per_channel = self.function == "prelu" and weights[0].numel() != 1
        if bi >= OFF_BITS or bo >= OFF_BITS or bi > MAX_LUT_BITS or per_channel:
            return self._torch_fn(x, *weights)
        name, params = self.table_function(weights[0] if weights else None)
        if self.training:  # the output format fits this batch's function values (fxquant.quantizers)
            widen_frac_bits_(out_frac_bits, out_bits, self._torch_fn(x.detach(), *weights))
        fi, fo = int(in_frac_bits), int(out_frac_bits)
        key = (bi, fi, bo, fo, tuple(sorted(params.items())))
        table = self._tables.get(key)
        if table is None:
            from fxquant.elementwise import table as make_table

            table = torch.from_numpy(make_table(name, FixedPoint(bi, fi), FixedPoint(bo, fo), params))
            if len(self._tables) > 64:
                self._tables.clear()
            self._tables[key] = table
        return _TableLookup.apply(x, table, fi, -(1 << (bi - 1)), fo, self._torch_fn, *weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, function={self.function}, params={self.params}"


def float_elementwise(x: torch.Tensor, function: str, params: dict[str, float], *weights: torch.Tensor) -> torch.Tensor:
    """The float function of an :class:`ElementwiseTable` (what :class:`StripQuantizers` restores)."""
    if function == "prelu":
        return F.prelu(x, weights[0])
    return TORCH_FUNCTIONS[function](x, **params)


def float_avg_pool2d(x: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """torch's average pooling with ``config`` (what :class:`StripQuantizers` restores)."""
    if config.get("output_size") is not None:
        return F.adaptive_avg_pool2d(x, config["output_size"])
    return F.avg_pool2d(x, config["kernel_size"], config.get("stride"), config.get("padding", 0),
                        config.get("ceil_mode", False), config.get("count_include_pad", True),
                        config.get("divisor_override"))


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def avgpool_window(config: dict[str, Any], h: int, w: int) -> dict[str, Any] | str:
    """The integer ``avgpool2d`` attrs (``kernel``, ``stride``, ``padding``, ``ceil_mode``) of an
    average pooling over an ``h x w`` input, or the reason it has no exact integer form.

    ``config``: ``output_size`` (adaptive) or ``kernel_size``/``stride``/``padding``/``ceil_mode``/
    ``count_include_pad``/``divisor_override`` (``F.avg_pool2d``'s arguments).
    """
    if config.get("output_size") is not None:
        out = config["output_size"]
        out = tuple(out) if isinstance(out, (list, tuple)) else (out, out)
        oh, ow = (h if out[0] is None else int(out[0])), (w if out[-1] is None else int(out[-1]))
        if h % oh or w % ow:
            return (f"adaptive average pooling {h}x{w} -> {oh}x{ow} has windows of unequal size "
                    "(the input must be divisible by the output size)")
        k = (h // oh, w // ow)
        return {"kernel": k, "stride": k, "padding": (0, 0), "ceil_mode": False}
    k = _pair(config["kernel_size"])
    stride = config.get("stride")
    s = _pair(stride) if stride not in (None, [], ()) else k
    p = _pair(config.get("padding", 0))
    ceil = bool(config.get("ceil_mode", False))
    if config.get("divisor_override") not in (None, k[0] * k[1]):
        return f"average pooling with divisor_override={config['divisor_override']}"
    if not config.get("count_include_pad", True) and p != (0, 0):
        return "average pooling with count_include_pad=False and padding (divisors vary with position)"
    return {"kernel": k, "stride": s, "padding": p, "ceil_mode": ceil}


def window_factors(attrs: dict[str, Any], h: int, w: int) -> tuple[torch.Tensor, bool]:
    """``(M * 2^-s per output window, all windows a power of two)`` (float64, exact)."""
    from fxquant.integer_graph import avg_divisors

    divisors = avg_divisors(SimpleNamespace(attrs=attrs), h, w)
    factors = torch.empty(divisors.shape, dtype=torch.float64)
    pow2 = True
    for d in set(int(v) for v in divisors.reshape(-1)):
        m, s = reciprocal(d)
        pow2 = pow2 and m == 1
        factors[torch.from_numpy(divisors == d)] = math.ldexp(float(m), -s)
    return factors, pow2


class FixedPointAvgPool2d(nn.Module):
    """``avgpool2d`` in training: window sums times ``M * 2^-s`` (module docstring)."""

    fxq_kind = "avgpool2d"

    def __init__(self, layer: str, config: dict[str, Any]) -> None:
        super().__init__()
        self.layer = layer
        self.pool_config = dict(config)
        self._factors: dict[tuple, torch.Tensor] = {}

    def config(self) -> dict[str, Any]:
        return dict(self.pool_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        attrs = avgpool_window(self.pool_config, h, w) if x.dim() == 4 else "not an NCHW tensor"
        if isinstance(attrs, str):  # no exact integer form: torch's pooling (the lowering refuses it)
            return float_avg_pool2d(x, self.pool_config)
        key = (h, w)
        if key not in self._factors:
            self._factors[key] = window_factors(attrs, h, w)[0]
        sums = F.avg_pool2d(x, attrs["kernel"], attrs["stride"], attrs["padding"], attrs["ceil_mode"],
                            True, 1)
        return sums * self._factors[key].to(dtype=x.dtype, device=x.device)

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, {self.pool_config}"


class _ExactForward(torch.autograd.Function):
    """Returns ``y`` (computed elsewhere, exactly); the backward is that of ``fn(*inputs)``."""

    @staticmethod
    def forward(ctx, y, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*[t if isinstance(t, torch.Tensor) else torch.empty(0) for t in inputs])
        ctx.present = [isinstance(t, torch.Tensor) for t in inputs]
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        xs = [s.detach().requires_grad_(need) if p else None
              for s, p, need in zip(saved, ctx.present, ctx.needs_input_grad[2:])]
        wanted = [x for x, need in zip(xs, ctx.needs_input_grad[2:]) if x is not None and need]
        if not wanted:
            return (None, None, *[None] * len(xs))
        with torch.enable_grad():
            out = ctx.fn(*xs)
            grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        return (None, None, *[next(grads) if x is not None and need else None
                              for x, need in zip(xs, ctx.needs_input_grad[2:])])


def _integers(x: torch.Tensor, frac_bits: int) -> np.ndarray:
    """``x 2^FL`` as int64 (exact for a quantizer's output)."""
    return np.rint(np.ldexp(x.detach().to("cpu", torch.float64).numpy(), frac_bits)).astype(np.int64)


def _reals(k: np.ndarray, frac_bits: int, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ldexp(k.astype(np.float64), -frac_bits)).to(dtype=like.dtype, device=like.device)


def _keep(terms: tuple[torch.Tensor, ...], like: torch.Tensor) -> torch.Tensor | None:
    keep = None
    for t in terms:
        t = t != 0
        keep = t if keep is None else keep & t
    return None if keep is None else torch.broadcast_to(keep, like.shape)


def float_softmax(x: torch.Tensor, dim: int, *keep_terms: torch.Tensor) -> torch.Tensor:
    """Softmax of ``x`` with the keep terms applied (masked: 0; a row with nothing kept: 0)."""
    keep = _keep(keep_terms, x)
    if keep is None:
        return torch.softmax(x, dim)
    return torch.softmax(x.masked_fill(~keep, torch.finfo(x.dtype).min), dim) * keep


class FixedPointSoftmax(nn.Module):
    """``softmax`` in training (module docstring). ``forward(x, in_bits, in_frac_bits, out_bits,
    out_frac_bits, *keep_terms)``: the formats are the input and output quantizers' buffers."""

    fxq_kind = "softmax"

    def __init__(self, layer: str, dim: int = -1, exp_bits: int | None = None) -> None:
        super().__init__()
        from fxquant.fixed_point import SOFTMAX_EXP_BITS

        self.layer = layer
        self.dim = int(dim)
        self.exp_bits = int(SOFTMAX_EXP_BITS if exp_bits is None else exp_bits)

    def config(self) -> dict[str, Any]:
        return {"dim": self.dim, "exp_bits": self.exp_bits}

    def forward(self, x: torch.Tensor, in_bits: torch.Tensor, in_frac_bits: torch.Tensor, out_bits: torch.Tensor,
                out_frac_bits: torch.Tensor, *keep_terms: torch.Tensor) -> torch.Tensor:
        def fn(x: torch.Tensor) -> torch.Tensor:
            return float_softmax(x, self.dim, *keep_terms)

        bi, bo = int(in_bits), int(out_bits)
        if bi >= OFF_BITS or bo >= OFF_BITS or x.dim() < 2 or self.dim % x.dim() != x.dim() - 1:
            return fn(x)
        from fxquant.integer_graph import Op, Value
        from fxquant.integer_ops_transformer import EXECUTORS

        if self.training:  # the output format fits this batch's probabilities (fxquant.quantizers)
            widen_frac_bits_(out_frac_bits, out_bits, fn(x.detach()))
        fi, fo = int(in_frac_bits), int(out_frac_bits)
        k = _integers(x, fi)
        in_fmt, out_fmt = FixedPoint(bi, fi), FixedPoint(bo, fo)
        rank = x.dim() - 1
        op = Op(self.layer, "softmax", ("x",), "y", out_fmt, attrs={"dim": rank, "exp_bits": self.exp_bits})
        xs, vs = [k], [Value("x", tuple(k.shape[1:]), in_fmt)]
        keep = _keep(keep_terms, x)
        if keep is not None:
            xs.append(keep.to("cpu").numpy().astype(np.int64))
            vs.append(Value("mask", tuple(k.shape[1:]), FixedPoint(2, 0)))
        y = _reals(EXECUTORS["softmax"](op, xs, vs), fo, x)
        return _ExactForward.apply(y, fn, x)

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, dim={self.dim}, exp_bits={self.exp_bits}"


class FixedPointLayerNorm(nn.Module):
    """``layernorm`` in training (module docstring). ``forward(x, in_bits, in_frac_bits, w_bits,
    w_frac_bits, out_bits, out_frac_bits, weight=None, bias=None)``; ``weight`` is the quantized gamma."""

    fxq_kind = "layernorm"

    def __init__(self, layer: str, normalized_shape: Any, eps: float = 1e-5) -> None:
        super().__init__()
        self.layer = layer
        shape = normalized_shape if isinstance(normalized_shape, (list, tuple)) else (normalized_shape,)
        self.normalized_shape = tuple(int(s) for s in shape)
        self.eps = float(eps)

    def config(self) -> dict[str, Any]:
        return {"normalized_shape": self.normalized_shape, "eps": self.eps}

    def forward(self, x: torch.Tensor, in_bits: torch.Tensor, in_frac_bits: torch.Tensor, w_bits: torch.Tensor,
                w_frac_bits: torch.Tensor, out_bits: torch.Tensor, out_frac_bits: torch.Tensor,
                weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        def fn(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)

        bi, bo, bw = int(in_bits), int(out_bits), int(w_bits)
        if bi >= OFF_BITS or bo >= OFF_BITS or (weight is not None and bw >= OFF_BITS) or \
                len(self.normalized_shape) != 1:
            return fn(x, weight, bias)
        from fxquant.fixed_point import LAYERNORM_FRAC_BITS, layernorm_eps, quantize_bias
        from fxquant.integer_graph import Op, Value
        from fxquant.integer_ops_transformer import EXECUTORS

        if self.training:  # the output format fits this batch's normalized values (fxquant.quantizers)
            widen_frac_bits_(out_frac_bits, out_bits, fn(x.detach(), weight, bias))
        fi, fo, fw = int(in_frac_bits), int(out_frac_bits), int(w_frac_bits)
        n = x.shape[-1]
        in_fmt, out_fmt = FixedPoint(bi, fi), FixedPoint(bo, fo)
        if weight is None:
            gamma, w_fmt = np.ones(n, dtype=np.int64), FixedPoint(2, 0)
        else:
            gamma, w_fmt = _integers(weight, fw), FixedPoint(bw, fw)
        beta = None if bias is None else quantize_bias(bias.detach().to("cpu", torch.float64).numpy(),
                                                       w_fmt.frac_bits + LAYERNORM_FRAC_BITS)
        k = _integers(x, fi)
        op = Op(self.layer, "layernorm", ("x",), "y", out_fmt, weight=gamma, weight_fmt=w_fmt, bias=beta,
                attrs={"dim": x.dim() - 1, "eps": layernorm_eps(self.eps, n, in_fmt)})
        y = _reals(EXECUTORS["layernorm"](op, [k], [Value("x", tuple(k.shape[1:]), in_fmt)]), fo, x)
        return _ExactForward.apply(y, fn, x, weight, bias)

    def extra_repr(self) -> str:
        return f"layer={self.layer!r}, normalized_shape={self.normalized_shape}, eps={self.eps}"


__all__ = ["DEFAULT_LUT_INPUT_BITS", "FixedPointLayerNorm", "FixedPointSoftmax", "float_softmax",
           "ElementwiseTable", "FixedPointAvgPool2d", "TORCH_FUNCTIONS",
           "avgpool_window", "float_avg_pool2d", "float_elementwise", "window_factors"]
