"""How the CPU target stores each value of an IntegerGraph (no TVM import: ``check`` reads it).

* activations of 2..8 bits: int8 tensors (the kernels' only activation type);
* token ids (a graph input an ``embedding`` reads as its ids): int32, fed as integers and never
  quantized (any ``<BW,0>`` width: vocabularies beyond 127 rows);
* a 9-bit ``softmax`` output (in ``[0, 2^8 - 1]``: never negative) and any ``slice`` of it: uint8.
"""

from __future__ import annotations

from fxquant.integer_graph import IntegerGraph

ACT_DTYPE = "int8"
IDS_DTYPE = "int32"
"""Storage of token ids (a graph input an ``embedding`` reads): fed as integers, never quantized."""
UNSIGNED_SOFTMAX_BITS = 9
"""A softmax output of 9 bits lies in ``[0, 255]`` (never negative): stored as uint8."""


def id_inputs(graph: IntegerGraph) -> frozenset[str]:
    """The graph inputs that are token ids: read by an ``embedding`` as its ids."""
    names = {v.name for v in graph.inputs}
    return frozenset(op.inputs[0] for op in graph.ops if op.kind == "embedding" and op.inputs[0] in names)


def unsigned_values(graph: IntegerGraph) -> frozenset[str]:
    """Values stored as uint8: the 9-bit outputs of ``softmax`` (``[0, 2^8 - 1]``) and slices of them."""
    out: set[str] = set()
    for op in graph.ops:  # topological order: a slice of a slice follows its source
        if (op.kind == "softmax" and op.out_fmt.bits == UNSIGNED_SOFTMAX_BITS) or (
                op.kind == "slice" and op.inputs[0] in out):
            out.add(op.output)
    return frozenset(out)


def storage_dtype(graph: IntegerGraph, name: str) -> str:
    """The tensor dtype of value ``name`` in the built module."""
    if name in id_inputs(graph):
        return IDS_DTYPE
    return "uint8" if name in unsigned_values(graph) else ACT_DTYPE


__all__ = ["ACT_DTYPE", "IDS_DTYPE", "UNSIGNED_SOFTMAX_BITS", "id_inputs", "storage_dtype", "unsigned_values"]
