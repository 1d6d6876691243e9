"""The census of compute left in float, against MACs and parameter counts worked out by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fxquant.census import census_lines, mean_bits_line, take_census
from fxquant.passes import FuseReluIntoQuantizers, InsertQuantizers, capture
from fxquant.quantizers import quantizers


class Seq(nn.Module):
    """Embedding(10, 16) -> MultiheadAttention(16, 2 heads) -> LSTM(16 -> 8) -> Linear(8 -> 3), 5 tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.lstm = nn.LSTM(16, 8, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = self.emb(t)
        a, _ = self.attn(x, x, x)
        h, _ = self.lstm(a)
        return self.fc(h[:, -1])


def _quantized(model: nn.Module, example: tuple) -> torch.fx.GraphModule:
    gm = capture(model, example)
    InsertQuantizers()(gm)
    FuseReluIntoQuantizers()(gm)
    return gm


TOKENS = (torch.tensor([[1, 2, 3, 4, 5], [5, 4, 3, 2, 1]]),)

# by hand, per sample (5 tokens, d = 16, 2 heads of 8):
#   attn: in-projection 5*16*48 = 3840, Q K^T 2*5*5*8 = 400, A V 400, out-projection 5*16*16 = 1280 -> 5920
#   lstm: 5 steps * 4 gates * 8 * (16 + 8) = 3840;  fc: 8*3 = 24;  emb: a lookup, 0
#   params: emb 160, attn 3*16*16 + 48 + 16*16 + 16 = 1088, lstm 4*8*24 + 2*4*8 = 832, fc 27
ATTN_MACS, LSTM_MACS, FC_MACS = 5920, 3840, 24
TOTAL_MACS = ATTN_MACS + LSTM_MACS + FC_MACS
TOTAL_PARAMS = 160 + 1088 + 832 + 27


def test_float_ops_are_listed_with_params_and_macs() -> None:
    census = take_census(_quantized(Seq(), TOKENS), TOKENS)
    # capture makes the attention explicit: in-projection (a linear on in_proj_weight), Q K^T and
    # A V matmuls (on views of the in-projection's quantized output), the integer softmax, the
    # out-projection: all quantized; the embedding's table is quantized (a lookup: 0 MACs); the LSTM stays float
    assert [(op.name, op.params, op.macs) for op in census.float_ops] == [("lstm: nn.LSTM", 832, LSTM_MACS)]
    assert [(op.name, op.params, op.macs) for op in census.quantized] == [
        ("emb", 160, 0), ("attn", 3 * 16 * 16 + 48, 3840), ("attn.matmul", 0, 400), ("attn.softmax", 0, 0),
        ("attn.matmul:1", 0, 400), ("attn.out_proj", 16 * 16 + 16, 1280), ("fc", 27, FC_MACS)]
    assert (census.total_params, census.total_macs) == (TOTAL_PARAMS, TOTAL_MACS)
    d = census.to_dict()
    assert d["quantized_layers"] == 7 and d["quantized_macs"] == ATTN_MACS + FC_MACS
    lstm = d["float"][0]
    assert lstm["macs_share"] == LSTM_MACS / 9784 and lstm["params_share"] == 832 / 2107


def test_lines_name_each_float_op_and_mean_bits_says_what_it_covers() -> None:
    d = take_census(_quantized(Seq(), TOKENS), TOKENS).to_dict()
    lines = census_lines(d)
    assert lines[0] == "census: 7 quantized layers (60.8 % of MACs); left in float (no quantizer):"  # 5944 / 9784
    assert lines[1] == ("  float lstm: nn.LSTM: 832 params (39.5 % of 2.1 k), "
                        "3.8 k MACs/sample (39.2 % of 9.8 k)")
    assert len(lines) == 2
    assert mean_bits_line(8, 8, d) == ("mean bits W8.00/A8.00 over 7 quantized layers (60.8 % of MACs); float: "
                                       "lstm: nn.LSTM (39.2 % of MACs)")


class Functional(nn.Module):
    """Linear(16 -> 16), then attention and a bmm as plain function calls on activations."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.proj(x)
        a = F.scaled_dot_product_attention(q, q, q)
        return torch.bmm(a, a.transpose(1, 2))


def test_functional_attention_is_decomposed_and_bmm_is_float() -> None:
    x = (torch.randn(2, 5, 16),)
    census = take_census(_quantized(Functional(), x), x)
    # proj 5*16*16 = 1280; sdpa, decomposed: Q K^T 5*5*16 = 400 and A V 5*5*16 = 400 (matmuls, quantized),
    # the integer softmax between them (0 MACs); bmm (5x16)(16x5) = 400 stays float
    assert [(op.name, op.params, op.macs) for op in census.quantized] == [
        ("proj", 272, 1280), ("matmul", 0, 400), ("softmax", 0, 0), ("matmul:1", 0, 400)]
    assert [(op.name, op.params, op.macs) for op in census.float_ops] == [("torch.bmm", 0, 400)]


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def test_all_quantized_model_says_so_and_buffers_are_untouched() -> None:
    x = (torch.randn(4, 1, 4, 4),)
    gm = _quantized(Convs(), x)
    gm.train()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    census = take_census(gm, x)
    assert census.float_ops == [] and [(op.name, op.macs) for op in census.quantized] == [("conv", 576), ("fc", 192)]
    assert census_lines(census.to_dict()) == ["census: all compute is quantized (2 quantized layers, 768 MACs/sample)"]
    assert gm.training
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(float(q.amax) == 0.0 for q in quantizers(gm).values())


def test_unquantized_parametrized_module_is_listed() -> None:
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 6, 2))
    x = (torch.randn(1, 2, 8),)
    census = take_census(_quantized(model, x), x)
    # conv1d: 6 outputs * 3 channels * (2 * 3) = 108 MACs, 3*2*3 + 3 = 21 params
    assert [(op.name, op.params, op.macs) for op in census.float_ops] == [("0: nn.Conv1d", 21, 108)]
    assert [(op.name, op.macs) for op in census.quantized] == [("2", 36)]


def test_a_failing_forward_names_the_node() -> None:
    import pytest

    from fxquant.errors import ModelFileError

    x = (torch.randn(1, 1, 4, 4),)
    gm = _quantized(Convs(), x)
    with pytest.raises(ModelFileError, match=r"at node 'conv2d_default'.*RuntimeError") as err:
        take_census(gm, (torch.randn(1, 2, 4, 4),))  # 2 channels into a 1-channel conv
    assert "example_inputs()" in err.value.hint


class ClassToken(nn.Module):
    """A ViT's token handling: projection (8 -> 8), a class token (1, 1, 8) expanded over the batch and
    concatenated, a positional embedding (1, 5, 8) added, the class token's row into a head (8 -> 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.class_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos_embedding = nn.Parameter(torch.zeros(1, 5, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.class_token.expand(x.shape[0], -1, -1), self.proj(x)], dim=1)
        return self.head((h + self.pos_embedding)[:, 0])


def test_parameters_used_as_activations_behind_quantizers_count_as_quantized() -> None:
    gm = _quantized(ClassToken(), (torch.randn(2, 4, 8),))
    census = take_census(gm, (torch.randn(2, 4, 8),))
    assert census.float_ops == []  # class token and positional embedding deploy as stored constants
    params = {op.name: op.params for op in census.quantized}
    assert sum(params.values()) == census.total_params == 72 + 8 + 40 + 18
    assert 8 in params.values() and 40 in params.values()  # each constant under its quantizer's layer
