"""Element-wise functions with an exact integer form: the one float64 definition of each.

An element-wise function of one quantized activation (``sigmoid``, ``silu``, ``hardswish``...) is
deployed as a lookup table (:func:`fxquant.fixed_point.lut_table`): the function below is
evaluated in float64 on every input integer of the input format and quantized to the output
format. The table is stored in the :class:`~fxquant.integer_graph.IntegerGraph` (op kind ``lut``),
so the reference, ONNX (``Gather``), TVM, CUDA and HLS (a ROM) all give the same integers, and
the fake-quant training op reads the same table (forward) and the derivative (backward).

``FUNCTIONS[name](x, **params)``: ``params`` are the op's constants (LeakyReLU's slope, ELU's
alpha), stored in ``op.attrs["params"]``.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "silu": lambda x: x * _sigmoid(x),
    "hardsigmoid": lambda x: np.clip(x / 6.0 + 0.5, 0.0, 1.0),
    "hardswish": lambda x: x * np.clip(x + 3.0, 0.0, 6.0) / 6.0,
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
    "mish": lambda x: x * np.tanh(_softplus(x)),
    "softplus": _softplus,
    "elu": lambda x, alpha=1.0: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0.0))),
    "leaky_relu": lambda x, negative_slope=0.01: np.where(x >= 0, x, negative_slope * x),
    "exp": np.exp,
    "relu6": lambda x: np.clip(x, 0.0, 6.0),
    "hardtanh": lambda x, min_val=-1.0, max_val=1.0: np.clip(x, min_val, max_val),
}
"""float64 definitions (``torch.nn.functional``'s formulas)."""


def evaluate(name: str, x: np.ndarray, params: dict | None = None) -> np.ndarray:
    """``FUNCTIONS[name](x, **params)`` in float64."""
    return FUNCTIONS[name](np.asarray(x, dtype=np.float64), **(params or {}))


def table(name: str, in_fmt, out_fmt, params: dict | None = None) -> np.ndarray:
    """The ``lut`` op's table of function ``name`` from ``in_fmt`` to ``out_fmt``
    (:func:`fxquant.fixed_point.lut_table`)."""
    from fxquant.fixed_point import lut_table

    if name not in FUNCTIONS:
        from fxquant.errors import UnsupportedOpError

        raise UnsupportedOpError(f"no element-wise table for {name!r}", f"known: {', '.join(sorted(FUNCTIONS))}")
    return lut_table(lambda x: evaluate(name, x, params), in_fmt, out_fmt)


def lut_attrs(name: str, in_fmt, out_fmt, params: dict | None = None) -> dict:
    """``attrs`` of a ``lut`` op: ``function``, ``params`` and the ``table`` (int64, ``2^BW_in`` entries)."""
    return {"function": name, "params": dict(params or {}), "table": table(name, in_fmt, out_fmt, params)}


__all__ = ["FUNCTIONS", "evaluate", "lut_attrs", "table"]
