"""op_kinds for the transformer ops: the same kinds from modules, functions, methods and aten
overloads (fx and torch.export graphs); what is *not* a slice; the mask forms a softmax peels."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.passes import capture
from fxquant.passes.op_kinds import masked_scores, node_kind


class Forms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.ln = nn.LayerNorm(4)
        self.sm = nn.Softmax(dim=-1)
        self.lstm = nn.LSTM(4, 4, batch_first=True)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.ln(self.emb(ids))                                  # (N, 3, 4)
        g = F.layer_norm(h, (4,), self.ln.weight, self.ln.bias)
        a, b = h.split(2, dim=-1)
        c, d = torch.chunk(g, 2, dim=2)
        s = self.sm(a @ b.transpose(-2, -1)) + F.softmax(c @ d.transpose(1, 2), -1) + (a @ d.mT).softmax(dim=-1)
        out, _ = self.lstm(h)
        return s[:, 0], h[:, 1:, :2], h.select(1, 2), h.narrow(2, 1, 2), out, h.shape[1]


def _kinds(gm) -> list[str]:
    return [k for k in (node_kind(gm, n) for n in gm.graph.nodes) if k is not None]


def test_fx_and_export_kinds():
    ids = torch.randint(0, 10, (2, 3))
    fx_gm = capture(Forms())
    export_gm = torch.export.export(Forms(), (ids,)).module()
    for gm in (fx_gm, export_gm):
        kinds = _kinds(gm)
        assert kinds.count("embedding") == 1 and kinds.count("layernorm") == 2, kinds
        assert kinds.count("softmax") == 3 and kinds.count("matmul") >= 3, kinds
        assert kinds.count("split") == 2 and kinds.count("slice") >= 4 + 3, kinds


def test_getitem_of_a_tuple_or_a_shape_is_not_a_slice():
    gm = capture(Forms())
    getitems = [n for n in gm.graph.nodes if n.target is operator.getitem]
    of_lstm = [n for n in getitems if n.args[0].name == "lstm"]
    of_shape = [n for n in getitems if n.args[0].target is getattr]
    assert of_lstm and all(node_kind(gm, n) is None for n in of_lstm)  # out, _ = lstm(h): a tuple
    assert of_shape and all(node_kind(gm, n) is None for n in of_shape)  # h.shape[1]: shape arithmetic


class Masks(nn.Module):
    def forward(self, s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[:, None, :]
        s = s.masked_fill(m == 0, float("-inf"))
        s = s + (1.0 - m.float()) * -10000.0
        s = torch.where(m.bool(), s, -1e9)
        s = s.masked_fill(m == 0, -1.0)  # not a mask: a fill above -1e4 stays an op
        return F.softmax(s, dim=-1)


def test_masked_scores_peels_mask_forms_and_stops_at_other_fills():
    gm = capture(Masks())
    softmax = next(n for n in gm.graph.nodes if node_kind(gm, n) == "softmax")
    scores, terms, nodes = masked_scores(gm, softmax.args[0])
    assert terms == []  # the last masked_fill (fill -1) is a value change, not a mask
    fill = softmax.args[0]
    scores, terms, nodes = masked_scores(gm, fill.args[0])
    assert [how for how, _ in terms] == ["keep", "nonzero", "not"]
    assert scores.op == "placeholder" and scores.name == "s"
    assert len(nodes) == 5  # where, add, (1 - m) * C, 1 - m, masked_fill
