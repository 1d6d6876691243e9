"""The integer graph: the backend-neutral, deployable form of a quantized model.

Data flows one way: a deployed (BN-folded) quantized ``GraphModule`` is lowered by
:func:`fxquant.passes.lower_to_integer_graph` into an :class:`IntegerGraph` of plain dataclasses and
int64 numpy arrays; every exporter and backend (ONNX, TVM, HLS C++) reads this graph, and
:meth:`IntegerGraph.run` is the **integer reference simulator** all of them are checked against,
bit for bit. Nothing here depends on torch.

Semantics of each op kind (``docs/number_format.md`` states them in full). Values are integer
tensors with a fixed-point format; a compute op's result is requantized to ``op.out_fmt`` with
round-half-even and saturation (:func:`fxquant.fixed_point.requantize`), then ``relu`` if
``op.attrs["relu"]``:

* ``conv2d``/``linear``: ``acc = sum(a*w) + b`` at ``FL_acc = FL_in + FL_w``; ``linear`` acts on
  the last dimension (``a @ W^T``), whatever the rank of ``a`` (backends check ranks they support).
* ``matmul``: ``acc = a @ b`` at ``FL_a + FL_b``.
* ``add``: both inputs left-shifted to ``max(FL_a, FL_b)`` and added.
* ``cat``: every input requantized to ``out_fmt``, concatenated on ``attrs["dim"]``.
* ``avgpool2d``: window sums at ``FL_in + log2(window)`` (power-of-two windows only).
* ``maxpool2d``, ``relu``, ``flatten``: act on the integers, ``out_fmt`` = input format.
  ``flatten`` gives ``(N, -1)`` (everything after the batch dimension in one).
* ``reshape``: ``x.reshape(N, *attrs["shape"])``; ``attrs["shape"]`` is the target shape without
  the batch dimension, fully resolved (no -1); ``out_fmt`` = input format. The batch dimension is
  never touched (the lowering refuses reshapes that would).
* ``mul_pow2``: multiplication by ``2^attrs["exponent"]``, exact: the integers pass unchanged and
  ``out_fmt = <BW_in, FL_in - exponent>`` (from ``torch.add(a, b, alpha=2^e)``).
* ``requantize``: change of format of one value.
* ``clamp``: requantize to ``out_fmt``, then clip to ``[attrs["lo"], attrs["hi"]]`` (integers on the
  output grid, ``None`` = unbounded): ReLU6, Hardtanh, ``clamp``. Exact at any width, because
  rounding is monotone: ``q(clamp(x, lo, hi)) = clamp(q(x), q(lo), q(hi))``.
* ``lut``: element-wise table, ``out = attrs["table"][x - qmin_in]`` (``2^BW_in`` int64 entries,
  :func:`fxquant.fixed_point.lut_table` of :data:`fxquant.elementwise.FUNCTIONS`
  ``[attrs["function"]]`` with ``attrs["params"]``); inputs of at most
  :data:`~fxquant.fixed_point.MAX_LUT_BITS` bits.
* ``mul``: element-wise product of two activations with numpy broadcasting (``(C,H,W) * (C,1,1)``
  for a squeeze-excitation gate), ``acc = a * b`` at ``FL_a + FL_b``.
* ``avgpool2d`` with a window of ``d = kh*kw`` cells that is not a power of two: the window sum
  times ``M`` at ``FL_in + s``, ``(M, s) = fixed_point.reciprocal(d)`` (a rounded fixed-point
  reciprocal; a power of two is ``M = 1, s = p``, exact). ``attrs["ceil_mode"]``: windows as torch
  counts them, partial windows at the bottom/right edge divide by their in-bounds cell count.
* ``maxpool2d``: ``attrs["dilation"]`` (default ``(1, 1)``) and ``attrs["ceil_mode"]`` (torch's
  output size; a last window must start inside the input or its left/top padding).
* ``transpose``: ``x.transpose(0, *(p + 1 for p in attrs["perm"]))``, ``perm`` over the non-batch
  dimensions (channel shuffle, permute, ``transpose``).
* ``upsample_nearest``: every pixel repeated ``attrs["scale"] = (sh, sw)`` times (integer factors).
* ``conv_transpose2d``: weight ``(C_in, C_out/groups, kh, kw)``; ``stride``, ``padding``,
  ``output_padding``, ``dilation``, ``groups`` as ``torch.nn.ConvTranspose2d``; ``acc`` at
  ``FL_in + FL_w`` (+ bias) like ``conv2d``.
* ``embedding``, ``softmax``, ``layernorm``, ``slice`` (transformers): run by
  :mod:`fxquant.integer_ops_transformer`, whose docstring states them (token ids at ``<BW,0>``,
  masks, ``eps``, slice attributes); the row arithmetic is :func:`fxquant.fixed_point.softmax_rows`
  and :func:`fxquant.fixed_point.layernorm_rows`.
* ``matmul`` takes operands of any rank with numpy broadcasting of the leading (batch and head)
  dims, ``(H, S, d) @ (H, d, S)`` or ``(H, S, d) @ (1, d, S)``; its bound is per output entry.
* ``constant``: a quantized parameter tensor used as an activation (a ViT class token or positional
  embedding, BERT's position rows): ``op.weight`` = the integers, of the value's non-batch shape ``S``,
  at ``op.weight_fmt == op.out_fmt``; the one input is any value of the graph, read only for its
  batch size ``N``; ``out = broadcast_to(weight, (N, *S))``. Exact (the integers are stored).

Shapes exclude the batch dimension; arrays carry it (NCHW for images, NC for vectors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fxquant.errors import UnsupportedOpError
from fxquant.fixed_point import (LAYERNORM_FRAC_BITS, SOFTMAX_EXP_BITS, FixedPoint, accumulator_bits,
                                 reciprocal, requantize, shift_round_half_even)
from fxquant.integer_ops_transformer import EXECUTORS as _TRANSFORMER_EXECUTORS

COMPUTE_KINDS = ("conv2d", "linear", "matmul", "conv_transpose2d")
REQUANTIZING_KINDS = COMPUTE_KINDS + ("add", "mul", "cat", "avgpool2d", "requantize", "clamp", "lut", "embedding",
                                      "softmax", "layernorm")
TRANSPARENT_KINDS = ("relu", "maxpool2d", "flatten", "reshape", "transpose", "upsample_nearest", "slice")
RELABEL_KINDS = ("mul_pow2",)
"""Ops that keep the integers and change the format (no rounding)."""
SOURCE_KINDS = ("constant",)
"""Ops whose integers are stored in the graph (the input gives only the batch size)."""
OP_KINDS = REQUANTIZING_KINDS + TRANSPARENT_KINDS + RELABEL_KINDS + SOURCE_KINDS
_FLOAT64_EXACT_BITS = 53


@dataclass(frozen=True)
class Value:
    """A tensor of integers ``k`` standing for ``k * 2^-fmt.frac_bits``."""

    name: str
    shape: tuple[int, ...]
    fmt: FixedPoint


@dataclass
class Op:
    """One integer op. ``name`` is the precision-map layer name for layers that have one."""

    name: str
    kind: str
    inputs: tuple[str, ...]
    output: str
    out_fmt: FixedPoint
    weight: np.ndarray | None = None
    weight_fmt: FixedPoint | None = None
    bias: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in OP_KINDS:
            raise UnsupportedOpError(f"op {self.name!r}: kind {self.kind!r} is not an integer op",
                                     f"supported: {', '.join(OP_KINDS)}")


@dataclass
class IntegerGraph:
    """A topologically ordered list of integer ops between quantized inputs and outputs."""

    inputs: list[Value]
    ops: list[Op]
    outputs: list[str]
    values: dict[str, Value]
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    """The precision map's ``layers`` section this graph was lowered with (for backends' metadata)."""

    def value(self, name: str) -> Value:
        return self.values[name]

    def quantize_inputs(self, *xs: np.ndarray) -> list[np.ndarray]:
        """Real model inputs to integer inputs: ``clamp(round_half_even(x * 2^FL))``; token ids (an
        input an ``embedding`` reads) must be integers in ``[0, V)`` already: never rounded or clipped
        (:class:`~fxquant.errors.InputRangeError` naming the op otherwise)."""
        from fxquant.errors import InputRangeError
        from fxquant.fixed_point import quantize_int

        vocab = {op.inputs[0]: op for op in self.ops if op.kind == "embedding" and op.weight is not None}
        out = []
        for v, x in zip(self.inputs, xs, strict=True):
            op = vocab.get(v.name)
            if op is not None:
                ids = np.asarray(x)
                n_rows = op.weight.shape[0]
                bad = (ids != np.floor(ids)) | (ids < 0) | (ids >= n_rows) if ids.size else np.zeros(0, bool)
                if bad.any():
                    raise InputRangeError(f"op {op.name!r} (embedding): input {v.name!r} holds "
                                          f"{ids[bad].reshape(-1)[0]!r}, not a token id in [0, {n_rows})",
                                          "feed integer ids of this vocabulary; ids are never rounded or clipped")
            out.append(quantize_int(x, v.fmt))
        return out

    def run(self, *int_inputs: np.ndarray, keep_all: bool = False) -> dict[str, np.ndarray]:
        """Integer reference execution. Returns the output integers (every value with ``keep_all``)."""
        env: dict[str, np.ndarray] = {v.name: np.asarray(x, dtype=np.int64)
                                      for v, x in zip(self.inputs, int_inputs, strict=True)}
        for op in self.ops:
            env[op.output] = _EXECUTORS[op.kind](op, [env[i] for i in op.inputs],
                                                 [self.values[i] for i in op.inputs])
        if keep_all:
            return env
        return {name: env[name] for name in self.outputs}

    def accumulator_bound(self, op: Op) -> int:
        """Worst-case ``|acc|`` of ``op`` before requantization, in units of its accumulator LSB.

        conv/linear: ``max_o(sum|w_o| * 2^(BW_in-1) + |b_o|)``; matmul: ``2^(BW_a-1) 2^(BW_b-1) K``;
        add: inputs' ``2^(BW-1)`` shifted to the common FL and summed; avgpool: window size times
        ``2^(BW_in-1)``; embedding, constant: ``max|table|`` (a gather, no sum); softmax: the row sum
        ``L 2^E`` (``E`` = ``exp_bits``); layernorm: ``max_i |gamma_i| h_max + |beta_i|`` with
        ``h_max = isqrt((n-1) 4^FL_h) + 1`` plus the normalization's relative error (``2^-18``) and
        one rounding; other ops: the largest input magnitude.
        """
        vs = [self.values[i] for i in op.inputs]
        top = [1 << (v.fmt.bits - 1) for v in vs]  # max |k| of each input
        if op.kind in ("conv2d", "linear", "conv_transpose2d") and op.weight is not None:
            if op.kind == "conv_transpose2d":  # an output sums at most every tap of its group's channels
                g = op.attrs.get("groups", 1)
                wa = np.abs(op.weight.astype(np.int64))
                w = wa.reshape(g, wa.shape[0] // g, *wa.shape[1:]).sum(axis=(1, 3, 4)).reshape(-1)
                b = np.zeros_like(w) if op.bias is None else np.abs(op.bias.astype(np.int64))
                return int((w * top[0] + b).max())
            w = np.abs(op.weight.astype(np.int64)).reshape(op.weight.shape[0], -1).sum(axis=1)
            b = np.zeros_like(w) if op.bias is None else np.abs(op.bias.astype(np.int64))
            return int((w * top[0] + b).max())
        if op.kind == "matmul":
            return top[0] * top[1] * vs[0].shape[-1]
        if op.kind == "add":
            fls = [int(v.fmt.frac_bits or 0) for v in vs]
            return sum(t << (max(fls) - fl) for t, fl in zip(top, fls))
        if op.kind == "avgpool2d":  # every window: a ceil-mode edge window's M can exceed the full one's
            return top[0] * max(d * m for d, m, _ in avg_terms(op, *vs[0].shape[1:]))
        if op.kind == "mul":
            return top[0] * top[1]
        if op.kind in ("embedding", "constant") and op.weight is not None:
            return int(np.abs(op.weight.astype(np.int64)).max(initial=0))
        if op.kind == "softmax":
            return vs[0].shape[-1] << int(op.attrs.get("exp_bits", SOFTMAX_EXP_BITS))
        if op.kind == "layernorm" and op.weight is not None:
            h = layernorm_h_bound(vs[0].shape[-1])
            b = np.zeros(op.weight.shape, np.int64) if op.bias is None else np.abs(op.bias.astype(np.int64))
            return int((np.abs(op.weight.astype(np.int64)) * h + b).max(initial=0))
        return max(top)

    def param_bits(self) -> int:
        """Σ params · bits: weights at their width, biases at int32."""
        total = 0
        for op in self.ops:
            if op.weight is not None and op.weight_fmt is not None:
                total += op.weight.size * op.weight_fmt.bits
            if op.bias is not None:
                total += op.bias.size * 32
        return total


def layernorm_h_bound(n: int) -> int:
    """Worst ``|h|`` of :func:`fxquant.fixed_point.layernorm_rows` on rows of ``n``: ``|x_hat| <=
    sqrt(n - 1)``, at ``FL_h`` bits, times ``1 + 2^-18`` (the normalization's relative error), plus one."""
    top = math.isqrt((n - 1) << (2 * LAYERNORM_FRAC_BITS)) + 1
    return top + (top >> 18) + 2


def _finish(op: Op, acc: np.ndarray, acc_frac_bits: int) -> np.ndarray:
    out = requantize(acc, acc_frac_bits, op.out_fmt)
    return np.maximum(out, 0) if op.attrs.get("relu") else out


def _exact_matmul(a: np.ndarray, b: np.ndarray, bound_bits: int) -> np.ndarray:
    """Integer ``a @ b`` through float64 BLAS: exact while every partial sum is below 2^53."""
    if bound_bits > _FLOAT64_EXACT_BITS:
        return a.astype(np.int64) @ b.astype(np.int64)
    return np.rint(a.astype(np.float64) @ b.astype(np.float64)).astype(np.int64)


def _conv2d(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    (x,), (v,) = xs, vs
    w = op.weight
    assert w is not None and op.weight_fmt is not None and op.weight_fmt.frac_bits is not None
    sh, sw = op.attrs.get("stride", (1, 1))
    ph, pw = op.attrs.get("padding", (0, 0))
    dh, dw = op.attrs.get("dilation", (1, 1))
    groups = op.attrs.get("groups", 1)
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    eff_h, eff_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eff_h, eff_w), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # n, c, oh, ow, kh, kw
    oh, ow = win.shape[2], win.shape[3]
    bound = accumulator_bits(v.fmt.bits, op.weight_fmt.bits, cg * kh * kw, 32)
    outs = []
    og = o // groups
    for g in range(groups):
        cols = win[:, g * cg:(g + 1) * cg].transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, cg * kh * kw)
        wg = w[g * og:(g + 1) * og].reshape(og, cg * kh * kw)
        outs.append(_exact_matmul(cols, wg.T, bound).reshape(n, oh, ow, og))
    acc = np.concatenate(outs, axis=3).transpose(0, 3, 1, 2)
    if op.bias is not None:
        acc = acc + op.bias.reshape(1, -1, 1, 1)
    return _finish(op, acc, v.fmt.frac_bits + op.weight_fmt.frac_bits)


def _linear(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    (x,), (v,) = xs, vs
    w = op.weight
    assert w is not None and op.weight_fmt is not None and op.weight_fmt.frac_bits is not None
    acc = _exact_matmul(x, w.T, accumulator_bits(v.fmt.bits, op.weight_fmt.bits, w.shape[1], 32))
    if op.bias is not None:
        acc = acc + op.bias
    return _finish(op, acc, v.fmt.frac_bits + op.weight_fmt.frac_bits)


def _matmul(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    (a, b), (va, vb) = xs, vs
    bound = accumulator_bits(va.fmt.bits, vb.fmt.bits, a.shape[-1])
    if bound > _FLOAT64_EXACT_BITS:
        acc = np.matmul(a, b)
    else:
        acc = np.rint(np.matmul(a.astype(np.float64), b.astype(np.float64))).astype(np.int64)
    return _finish(op, acc, va.fmt.frac_bits + vb.fmt.frac_bits)


def _add(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    fl = max(v.fmt.frac_bits for v in vs)
    acc = sum(shift_round_half_even(x, fl - v.fmt.frac_bits) for x, v in zip(xs, vs))
    return _finish(op, acc, fl)


def _cat(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    parts = [requantize(x, v.fmt.frac_bits, op.out_fmt) for x, v in zip(xs, vs)]
    out = np.concatenate(parts, axis=op.attrs.get("dim", 1))
    return np.maximum(out, 0) if op.attrs.get("relu") else out


def pool_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int = 1, ceil_mode: bool = False) -> int:
    """torch's pooled size: with ``ceil_mode`` a last window must start inside the input or the left pad."""
    span = dilation * (kernel - 1) + 1
    num = size + 2 * pad - span
    out = (-(-num // stride) if ceil_mode else num // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _windows(x: np.ndarray, op: Op, pad_value: int) -> np.ndarray:
    """``(n, c, oh, ow, kh, kw)`` windows (padding and ceil-mode overhang filled with ``pad_value``)."""
    kh, kw = op.attrs["kernel"]
    sh, sw = op.attrs.get("stride", (kh, kw))
    ph, pw = op.attrs.get("padding", (0, 0))
    dh, dw = op.attrs.get("dilation", (1, 1))
    ceil = bool(op.attrs.get("ceil_mode", False))
    h, w = x.shape[2:]
    oh = pool_output_size(h, kh, sh, ph, dh, ceil)
    ow = pool_output_size(w, kw, sw, pw, dw, ceil)
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    extra_h = max(0, (oh - 1) * sh + eh - (h + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + ew - (w + 2 * pw))
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph + extra_h), (pw, pw + extra_w)), constant_values=pad_value)
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))
    return win[:, :, ::sh, ::sw][:, :, :oh, :ow, ::dh, ::dw]


def avg_divisors(op: Op, h: int, w: int) -> np.ndarray:
    """The ``(oh, ow)`` divisor of every average window, as torch's ``avg_pool2d`` with
    ``count_include_pad``: a window ``[i*s - p, min(i*s - p + k, n + p))`` per axis counts its
    padded cells; only a ceil-mode window hanging beyond the padding counts fewer."""
    def axis(n: int, k: int, s: int, p: int) -> np.ndarray:
        starts = np.arange(pool_output_size(n, k, s, p, 1, bool(op.attrs.get("ceil_mode")))) * s - p
        return np.minimum(starts + k, n + p) - starts

    (kh, kw), (ph, pw) = op.attrs["kernel"], op.attrs.get("padding", (0, 0))
    sh, sw = op.attrs.get("stride", (kh, kw))
    return np.outer(axis(h, kh, sh, ph), axis(w, kw, sw, pw))


def avg_terms(op: Op, h: int, w: int) -> list[tuple[int, int, int]]:
    """``(d, M, s)`` for every distinct window divisor ``d`` of an average pool on ``h x w``,
    ``(M, s) = fixed_point.reciprocal(d)``."""
    return [(int(d), *reciprocal(int(d))) for d in np.unique(avg_divisors(op, h, w))]


def _avgpool2d(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    (x,), (v,) = xs, vs
    sums = _windows(x, op, 0).sum(axis=(-1, -2))
    divisors = avg_divisors(op, *x.shape[2:])
    out = np.empty_like(sums)
    for d in np.unique(divisors):
        m, s = reciprocal(int(d))
        sel = divisors == d
        out[:, :, sel] = _finish(op, sums[:, :, sel] * m, v.fmt.frac_bits + s)
    return out


def _maxpool2d(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    (x,) = xs
    return _windows(x, op, np.iinfo(np.int64).min).max(axis=(-1, -2))


def _relu(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    return np.maximum(xs[0], 0)


def _flatten(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    return xs[0].reshape(xs[0].shape[0], -1)


def _reshape(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    return xs[0].reshape(xs[0].shape[0], *op.attrs["shape"])


def _mul_pow2(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    return xs[0].copy()


def _requantize(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    return _finish(op, xs[0], vs[0].fmt.frac_bits)


def _clamp(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    out = requantize(xs[0], vs[0].fmt.frac_bits, op.out_fmt)
    lo, hi = op.attrs.get("lo"), op.attrs.get("hi")
    return out if lo is None and hi is None else np.clip(out, lo, hi)


def _lut(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    table = np.asarray(op.attrs["table"], dtype=np.int64)
    if table.size != 1 << vs[0].fmt.bits:
        raise UnsupportedOpError(f"op {op.name!r}: table of {table.size} entries for a {vs[0].fmt.bits}-bit input")
    return table[xs[0] - vs[0].fmt.qmin]


def _mul(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    (a, b), (va, vb) = xs, vs
    return _finish(op, a * b, va.fmt.frac_bits + vb.fmt.frac_bits)


def _constant(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    w = np.asarray(op.weight, dtype=np.int64)
    return np.broadcast_to(w, (xs[0].shape[0], *w.shape)).copy()


def _transpose(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    return np.ascontiguousarray(xs[0].transpose(0, *(int(p) + 1 for p in op.attrs["perm"])))


def _upsample_nearest(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    sh, sw = op.attrs["scale"]
    return xs[0].repeat(sh, axis=2).repeat(sw, axis=3)


def _conv_transpose2d(op: Op, xs: list[np.ndarray], vs: list[Value]) -> np.ndarray:
    """Scatter form: every input pixel adds ``x * w`` into a ``(kh, kw)`` patch of the output."""
    (x,), (v,) = xs, vs
    w = op.weight.astype(np.int64)
    assert op.weight_fmt is not None and op.weight_fmt.frac_bits is not None
    sh, sw = op.attrs.get("stride", (1, 1))
    ph, pw = op.attrs.get("padding", (0, 0))
    oph, opw = op.attrs.get("output_padding", (0, 0))
    dh, dw = op.attrs.get("dilation", (1, 1))
    g = op.attrs.get("groups", 1)
    n, c, h, wd = x.shape
    cin, cog, kh, kw = w.shape
    co = cog * g
    full_h = (h - 1) * sh + dh * (kh - 1) + 1 + oph
    full_w = (wd - 1) * sw + dw * (kw - 1) + 1 + opw
    acc = np.zeros((n, co, full_h, full_w), dtype=np.int64)
    cg = c // g
    for gi in range(g):
        xg = x[:, gi * cg:(gi + 1) * cg]
        wg = w[gi * cg:(gi + 1) * cg]  # cg, cog, kh, kw
        for i in range(kh):
            for j in range(kw):
                contrib = np.einsum("nchw,co->nohw", xg, wg[:, :, i, j])
                acc[:, gi * cog:(gi + 1) * cog, i * dh:i * dh + (h - 1) * sh + 1:sh,
                    j * dw:j * dw + (wd - 1) * sw + 1:sw] += contrib
    out_h, out_w = full_h - 2 * ph, full_w - 2 * pw
    acc = acc[:, :, ph:ph + out_h, pw:pw + out_w]
    if op.bias is not None:
        acc = acc + op.bias.reshape(1, -1, 1, 1)
    return _finish(op, acc, v.fmt.frac_bits + op.weight_fmt.frac_bits)


_EXECUTORS = {
    "conv2d": _conv2d, "linear": _linear, "matmul": _matmul, "add": _add, "cat": _cat,
    "avgpool2d": _avgpool2d, "maxpool2d": _maxpool2d, "relu": _relu, "flatten": _flatten,
    "reshape": _reshape, "mul_pow2": _mul_pow2, "requantize": _requantize, "clamp": _clamp, "lut": _lut,
    "mul": _mul, "transpose": _transpose, "upsample_nearest": _upsample_nearest,
    "conv_transpose2d": _conv_transpose2d, "constant": _constant, **_TRANSFORMER_EXECUTORS,
}
