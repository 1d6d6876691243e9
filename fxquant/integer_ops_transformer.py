"""The transformer op kinds of the integer reference: ``embedding``, ``softmax``, ``layernorm``, ``slice``.

:meth:`fxquant.integer_graph.IntegerGraph.run` dispatches these kinds here (one reference, one
executor table); the row arithmetic is in :mod:`fxquant.fixed_point` (``softmax_rows``,
``layernorm_rows``), the bounds a target checks in :mod:`fxquant.legality`
(:func:`~fxquant.legality.transformer_problems`). ``docs/number_format.md`` states each algorithm
and its error against float. Axes (``attrs["dim"]``) count the batch: ``dim`` is an array axis
``>= 1`` (``x[:, 0]`` is ``dim=1``), resolved (no negatives), as ``cat``'s ``dim``.

* ``embedding``: input = token ids, a value of format ``<BW, 0>`` (signed storage: ids are its
  non-negative integers, so ``V - 1 <= 2^(BW-1) - 1``); ``op.weight`` = the table ``(V, D)`` at
  ``op.weight_fmt``. ``out = table[ids]`` (shape ``ids.shape + (D,)``), exact when ``out_fmt ==
  weight_fmt``, else requantized (round half even, saturate) from ``FL_w`` to ``out_fmt``. An id
  outside ``[0, V)`` at run time raises :class:`~fxquant.errors.InputRangeError` (a ``ValueError``)
  naming the op; ids are never clipped.
* ``softmax`` over the last axis (``attrs["dim"]`` must be it), ``attrs["causal"]`` (keep key ``j <=``
  query ``i``: the last two axes, torch's top-left ``is_causal``), ``attrs["exp_bits"]`` (``E``,
  default :data:`~fxquant.fixed_point.SOFTMAX_EXP_BITS`) and an optional second input, the mask: a
  value of format ``<BW, 0>`` of the scores' rank whose dims equal the scores' or are 1 (numpy
  broadcasting), **nonzero = keep** (Hugging Face ``attention_mask``, SDPA boolean masks).
  Masked entries contribute exactly 0 (an additive -inf); a row with no kept entry is all 0.
  Arithmetic: :func:`fxquant.fixed_point.softmax_rows`. ``out_fmt`` is any ``<BW, FL>``; the
  output is in ``[0, qmax]`` (``1.0`` saturates to ``qmax`` when ``FL > BW - 2``).
* ``layernorm`` over the last axis (``n`` entries): ``op.weight`` = gamma ``(n,)`` at
  ``weight_fmt``, ``op.bias`` = beta ``(n,)`` int32 on ``FL_w + LAYERNORM_FRAC_BITS`` (or None),
  ``attrs["eps"]`` = the integer ``eps_D`` (:func:`~fxquant.fixed_point.layernorm_eps`).
  ``acc = gamma * h + beta`` at ``FL_w + FL_h`` (``h`` = :func:`~fxquant.fixed_point.layernorm_rows`),
  requantized to ``out_fmt`` (``relu`` if ``attrs["relu"]``).
* ``slice``: ``attrs`` ``dim``, ``start``, ``stop``, ``step`` (``0 <= start < stop <= size``,
  ``step >= 1``): ``x[..., start:stop:step, ...]`` on that axis; or ``dim`` and ``index``
  (``0 <= index < size``): ``x.take(index, dim)``, the axis removed (``x[:, 0]``, the CLS token).
  Transparent (``out_fmt`` = input format). ``split`` / ``chunk`` lower to one ``slice`` per piece.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fxquant.errors import InputRangeError, UnsupportedOpError
from fxquant.fixed_point import (LAYERNORM_FRAC_BITS, SOFTMAX_EXP_BITS, layernorm_rows, requantize,
                                 softmax_rows)

if TYPE_CHECKING:
    from fxquant.integer_graph import Op, Value

TRANSFORMER_KINDS = ("embedding", "softmax", "layernorm", "slice")


def _bad(op: "Op", what: str, hint: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"op {op.name!r} ({op.kind}): {what}", hint)


def slice_shape(op: "Op", in_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape (batch excluded) of a ``slice`` op on ``in_shape``; raises on bad attrs."""
    a, in_shape = op.attrs, tuple(in_shape)
    dim = a.get("dim")
    if not isinstance(dim, int) or not 1 <= dim <= len(in_shape):
        raise _bad(op, f"dim {dim!r} is not a non-batch axis of a rank-{len(in_shape) + 1} value",
                   f"use an array axis 1..{len(in_shape)} (the batch is axis 0)")
    size = in_shape[dim - 1]
    if "index" in a:
        i = a["index"]
        if not isinstance(i, int) or not 0 <= i < size:
            raise _bad(op, f"index {i!r} outside [0, {size})", "resolve negative indices when lowering")
        return in_shape[:dim - 1] + in_shape[dim:]
    start, stop, step = a.get("start"), a.get("stop"), a.get("step", 1)
    if not all(isinstance(v, int) for v in (start, stop, step)) or not (0 <= start < stop <= size and step >= 1):
        raise _bad(op, f"slice {start!r}:{stop!r}:{step!r} of an axis of {size} is not resolved",
                   "use 0 <= start < stop <= size and step >= 1 (no negatives, no None, not empty)")
    return in_shape[:dim - 1] + (len(range(start, stop, step)),) + in_shape[dim:]


def _slice(op: "Op", xs: list[np.ndarray], vs: list["Value"]) -> np.ndarray:
    (x,), (v,) = xs, vs
    slice_shape(op, tuple(x.shape[1:]))
    dim = op.attrs["dim"]
    if "index" in op.attrs:
        return np.ascontiguousarray(np.take(x, op.attrs["index"], axis=dim))
    index = [slice(None)] * x.ndim
    index[dim] = slice(op.attrs["start"], op.attrs["stop"], op.attrs.get("step", 1))
    return np.ascontiguousarray(x[tuple(index)])


def _embedding(op: "Op", xs: list[np.ndarray], vs: list["Value"]) -> np.ndarray:
    (ids,), (v,) = xs, vs
    table = op.weight
    if table is None or op.weight_fmt is None or table.ndim != 2:
        raise _bad(op, "needs a (V, D) table in op.weight and its op.weight_fmt", "lower nn.Embedding's weight")
    if v.fmt.frac_bits != 0:
        raise _bad(op, f"token ids at {v.fmt}, not an integer format <BW,0>", "keep token ids integer")
    n_rows = table.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= n_rows):
        bad = ids[(ids < 0) | (ids >= n_rows)]
        raise InputRangeError(f"op {op.name!r} (embedding): token id {int(bad.reshape(-1)[0])} outside [0, {n_rows}) "
                              f"({bad.size} of {ids.size} ids)", "feed ids of this vocabulary; ids are never clipped")
    rows = np.asarray(table, dtype=np.int64)[ids]
    if op.out_fmt == op.weight_fmt:
        return rows
    return requantize(rows, op.weight_fmt.frac_bits, op.out_fmt)


def _last_axis(op: "Op", v: "Value") -> None:
    rank = len(v.shape)
    if rank < 1 or op.attrs.get("dim", rank) != rank:
        raise _bad(op, f"dim {op.attrs.get('dim')!r} is not the last axis ({rank}) of its input",
                   "normalize over the last axis (permute first)")


def softmax_keep(op: "Op", scores: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The boolean keep array of a ``softmax`` op (broadcastable to ``scores``): mask nonzero and,
    with ``causal``, key index ``<=`` query index."""
    keep = np.ones((1,) * scores.ndim, dtype=bool)
    if mask is not None:
        keep = np.asarray(mask) != 0
    if op.attrs.get("causal"):
        if scores.ndim < 3:
            raise _bad(op, "a causal mask needs (query, key) axes", "apply it to scores of rank >= 2")
        q, kk = scores.shape[-2:]
        keep = keep & np.tril(np.ones((q, kk), dtype=bool))
    return keep


def _softmax(op: "Op", xs: list[np.ndarray], vs: list["Value"]) -> np.ndarray:
    _last_axis(op, vs[0])
    scores, mask = xs[0], (xs[1] if len(xs) > 1 else None)
    if mask is not None:
        if vs[1].fmt.frac_bits != 0 or mask.ndim != scores.ndim or any(
                m not in (1, s) for m, s in zip(mask.shape[1:], scores.shape[1:])):
            raise _bad(op, f"mask {list(vs[1].shape)} at {vs[1].fmt} does not broadcast to scores "
                           f"{list(vs[0].shape)}", "use an integer <BW,0> mask of the scores' rank (dims equal or 1)")
    return softmax_rows(scores, softmax_keep(op, scores, mask), vs[0].fmt, op.out_fmt,
                        op.attrs.get("exp_bits", SOFTMAX_EXP_BITS))


def _layernorm(op: "Op", xs: list[np.ndarray], vs: list["Value"]) -> np.ndarray:
    (x,), (v,) = xs, vs
    _last_axis(op, v)
    n = v.shape[-1]
    gamma = op.weight
    if gamma is None or op.weight_fmt is None or gamma.shape != (n,):
        raise _bad(op, f"needs gamma of shape ({n},) in op.weight and its op.weight_fmt", "lower LayerNorm's weight")
    eps = op.attrs.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, np.integer)) or eps < 0:
        raise _bad(op, f"eps {eps!r} is not a non-negative integer on the variance grid",
                   "use fixed_point.layernorm_eps(eps, n, in_fmt)")
    from fxquant.fixed_point import LAYERNORM_NORM_BITS
    from fxquant.legality import LAYERNORM_MAX_ROW, layernorm_d_bound

    if n > LAYERNORM_MAX_ROW or layernorm_d_bound(n, v.fmt.bits, int(eps)) >= 1 << LAYERNORM_NORM_BITS:
        raise _bad(op, f"rows of {n} at {v.fmt.bits} bits overflow the int64 variance sum",
                   "normalize narrower inputs or shorter rows (legality.transformer_problems)")
    h = layernorm_rows(x, int(eps))
    acc = gamma.astype(np.int64) * h
    if op.bias is not None:
        acc = acc + op.bias.astype(np.int64)
    out = requantize(acc, op.weight_fmt.frac_bits + LAYERNORM_FRAC_BITS, op.out_fmt)
    return np.maximum(out, 0) if op.attrs.get("relu") else out


EXECUTORS = {"embedding": _embedding, "softmax": _softmax, "layernorm": _layernorm, "slice": _slice}

__all__ = ["EXECUTORS", "TRANSFORMER_KINDS", "slice_shape", "softmax_keep"]
