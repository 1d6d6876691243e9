"""op_kinds: one keyword form for modules, functions, methods and aten overloads; shape values."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.passes import capture
from fxquant.passes.op_kinds import call_arguments, is_shape_value, node_kind, readable_op


class Pools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pool(x)
        b = F.max_pool2d(x, 3, stride=1, padding=1)
        c = torch.add(a, b, alpha=0.5)
        return c.view(c.size(0), c.shape[1], -1) + x.add(x).flatten(2)


def _pool_args(gm, node) -> dict:
    a = call_arguments(gm, node)
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in a.items()
            if k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}


def test_module_function_and_aten_read_alike():
    fx_gm = capture(Pools())
    export_gm = torch.export.export(Pools(), (torch.randn(2, 2, 4, 4),)).module()
    for gm in (fx_gm, export_gm):
        pools = [n for n in gm.graph.nodes if node_kind(gm, n) == "maxpool2d"]
        assert len(pools) == 2
        for p in pools:
            got = _pool_args(gm, p)
            k, s, pad = (got[key] if isinstance(got[key], list) else [got[key]] * 2
                         for key in ("kernel_size", "stride", "padding"))
            assert (k, s, pad) == ([3, 3], [1, 1], [1, 1])
        add = next(n for n in gm.graph.nodes if node_kind(gm, n) == "add" and call_arguments(gm, n)["alpha"] != 1)
        assert call_arguments(gm, add)["alpha"] == 0.5


def test_shape_arithmetic_and_reshape_kinds():
    gm = capture(Pools())
    nodes = {n.name: n for n in gm.graph.nodes}
    assert is_shape_value(nodes["size"]) and is_shape_value(nodes["getitem"])
    assert node_kind(gm, nodes["view"]) == "reshape" and node_kind(gm, nodes["flatten"]) == "flatten"
    assert call_arguments(gm, nodes["view"])["shape"] == [nodes["size"], nodes["getitem"], -1]
    assert node_kind(gm, nodes["add_1"]) == "add"  # x.add(x), a method


def test_readable_op_names_never_show_an_object_repr():
    gm = capture(Pools())
    names = [readable_op(gm, n) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert "pool: torch.nn.MaxPool2d" in names and "torch.nn.functional.max_pool2d" in names
    assert "torch.add" in names and "torch.Tensor.view" in names
    assert not any(" at 0x" in n or "<" in n for n in names)
