"""capture for transformers: the captured, quantizer-free graph computes what the eager model computes,
at the example batch and at other batch sizes, with attention as explicit ops and shapes folded.

Oracle: the eager model (eval mode) on the same inputs, float tolerance 1e-5.
"""

from __future__ import annotations

import importlib.util
import math
import operator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.errors import CaptureError
from fxquant.passes import capture
from fxquant.passes.capture import CAPTURED_BY
from fxquant.passes.op_kinds import is_shape_value, node_kind

MODELS = Path(__file__).with_name("models_transformers")
_aten = torch.ops.aten
ATOL = 1e-5


def model_file(name: str):
    from fxquant.model_file import load_model_file

    return load_model_file(MODELS / f"{name}.py")


def _targets(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _count(gm: fx.GraphModule, *targets) -> int:
    return sum(1 for t in _targets(gm) if t in targets)


def _modules(gm: fx.GraphModule, cls: type) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), cls)]


def assert_same_as_eager(model: nn.Module, gm: fx.GraphModule, *inputs: torch.Tensor) -> None:
    model.eval()
    gm.eval()
    with torch.no_grad():
        want, got = model(*inputs), gm(*inputs)
    want = getattr(want, "logits", want)
    got = getattr(got, "logits", got)
    if isinstance(want, tuple):
        want, got = want[0], got[0]
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=ATOL, rtol=0), (got - want).abs().max()


def assert_attention_explicit(gm: fx.GraphModule, layers: int) -> None:
    """No attention module or fused call is left; each layer has Q·Kᵀ and P·V matmuls and a softmax."""
    assert not _modules(gm, nn.MultiheadAttention)
    assert _count(gm, F.scaled_dot_product_attention, _aten.scaled_dot_product_attention.default) == 0
    softmaxes = _count(gm, _aten.softmax.int, torch.softmax, F.softmax, _aten._softmax.default)
    assert softmaxes == layers
    assert sum(1 for n in gm.graph.nodes if node_kind(gm, n) == "matmul") == 2 * layers


def assert_shapes_folded(gm: fx.GraphModule, dynamic: set[int]) -> None:
    """No ``getattr``/``size``/``dim``/``_assert`` left; every remaining shape query is
    ``sym_size.int`` of a dynamic dimension (batch 0; sequence 1 for token inputs)."""
    for n in gm.graph.nodes:
        assert not (n.op == "call_function" and n.target is getattr), n.format_node()
        assert not (n.op == "call_method" and n.target in ("size", "dim")), n.format_node()
        assert n.target not in (torch._assert, _aten._assert_scalar.default), n.format_node()
        if n.op == "call_function" and n.target is _aten.sym_size.int:
            src, d = n.args
            val = src.meta.get("val")
            meta = src.meta.get("tensor_meta")
            ndim = val.dim() if isinstance(val, torch.Tensor) else len(meta.shape) if meta is not None else None
            assert (d if d >= 0 or ndim is None else d + ndim) in dynamic, n.format_node()


# ----------------------------------------------------------------------------------------- ViT
@pytest.fixture(scope="module")
def vit():
    mf = model_file("vit_small")
    return mf.model().eval(), mf.example_inputs()


def test_vit_small_captures_with_explicit_attention_at_any_batch(vit):
    model, example = vit
    gm = capture(model, example)
    assert gm.meta[CAPTURED_BY] == "torch.fx"
    assert_attention_explicit(gm, layers=2)
    # the q/k/v projection reads the module's packed parameter (a weight quantizer attaches to it)
    in_proj = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is F.linear]
    assert [str(n.args[1].target) for n in in_proj] == [
        f"encoder.layers.encoder_layer_{i}.self_attention.in_proj_weight" for i in range(2)]
    assert len(_modules(gm, nn.Linear)) == 2 * 3 + 1  # out_proj + 2 MLP linears per layer, head
    assert_shapes_folded(gm, {0})
    torch.manual_seed(1)
    for batch in (1, 3, 5):
        assert_same_as_eager(model, gm, torch.randn(batch, 3, 32, 32))


# ----------------------------------------------------------------------------------------- BERT
@pytest.fixture(scope="module")
def bert():
    mf = model_file("bert_tiny")
    return mf.model().eval(), mf.example_inputs()


def test_bert_tiny_captures_by_export_with_dynamic_batch_and_padding_mask(bert):
    model, example = bert
    gm = capture(model, example)
    assert gm.meta[CAPTURED_BY] == "torch.export"
    assert_attention_explicit(gm, layers=2)
    assert_shapes_folded(gm, {0, 1})
    g = torch.Generator().manual_seed(0)
    for batch in (1, 2, 7):
        ids = torch.randint(1, 18, (batch, 64), generator=g)
        ids[-1, 40:] = 0  # padding: the mask must be kept
        assert_same_as_eager(model, gm, ids)
    assert_same_as_eager(model, gm, torch.randint(1, 18, (3, 20), generator=g))  # another sequence length


# ----------------------------------------------------------------------------------------- GPT-2
@pytest.fixture(scope="module", params=["gpt2_tiny", "gpt2_cls_tiny"])
def gpt2(request):
    mf = model_file(request.param)
    return mf.model().eval(), mf.example_inputs()


def test_gpt2_tiny_captures_conv1d_as_linear_and_causal_attention(gpt2):
    model, example = gpt2
    gm = capture(model, example)
    assert gm.meta[CAPTURED_BY] == "torch.export"
    assert _count(gm, _aten.addmm.default, torch.addmm) == 0
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _aten.linear.default]
    conv1d = [n for n in linears if n.args[1].op == "call_function" and n.args[1].target is _aten.t.default]
    assert len(conv1d) == 2 * 4  # c_attn, c_proj, mlp.c_fc, mlp.c_proj per layer, each on the stored (in, out) W
    assert all(n.args[1].args[0].op == "get_attr" and n.args[2].op == "get_attr" for n in conv1d)
    assert all(n.args[0].op != "call_function" or n.args[0].target is not _aten.view.default for n in conv1d)
    assert_attention_explicit(gm, layers=2)
    assert_shapes_folded(gm, {0, 1})
    g = torch.Generator().manual_seed(0)
    for batch in (1, 2, 5):
        assert_same_as_eager(model, gm, torch.randint(0, 17, (batch, 64), generator=g))


# ----------------------------------------------------------------------------------------- nn.MultiheadAttention
class PaddedAttention(nn.Module):
    """Token ids → embedding → nn.MultiheadAttention with a key padding mask (id 0 = padding)."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(10, 16)
        self.attn = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=batch_first)
        self.fc = nn.Linear(16, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        x = self.emb(t)
        if not self.batch_first:
            x = x.transpose(0, 1)
        a, _ = self.attn(x, x, x, key_padding_mask=t == 0)
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.fc(a.mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_with_padding_mask_is_explicit_and_exact(batch_first):
    torch.manual_seed(0)
    model = PaddedAttention(batch_first).eval()
    example = (torch.randint(1, 10, (2, 6)),)
    gm = capture(model, example)
    assert_attention_explicit(gm, layers=1)
    assert _count(gm, _aten.masked_fill.Scalar, torch.masked_fill) + \
        sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "masked_fill") == 1
    assert [str(n.target) for n in gm.graph.nodes if n.op == "call_module"
            and isinstance(gm.get_submodule(str(n.target)), nn.Dropout)]  # attention dropout: a module
    g = torch.Generator().manual_seed(1)
    for batch in (1, 2, 4):
        t = torch.randint(1, 10, (batch, 6), generator=g)
        t[0, 3:] = 0
        assert_same_as_eager(model, gm, t)
    gm.train()
    with torch.no_grad():  # the dropout follows the mode: training output differs from eval
        t = torch.randint(1, 10, (4, 6), generator=g)
        assert not torch.allclose(gm(t), model(t))


# ----------------------------------------------------------------------------------------- SDPA
class CausalSelfAttention(nn.Module):
    def __init__(self, embed: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(embed, 3 * embed)
        self.proj = nn.Linear(embed, embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, e = x.shape
        q, k, v = self.qkv(x).split(e, dim=2)
        q, k, v = (t.view(b, s, self.heads, e // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, s, e))


class ExportOnlyCausal(CausalSelfAttention):
    """The same, with a loop on a size (fx cannot trace it: the torch.export route)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.shape[-1]) // 16):
            x = super().forward(x)
        return x


@pytest.mark.parametrize("cls,route", [(CausalSelfAttention, "torch.fx"), (ExportOnlyCausal, "torch.export")])
def test_sdpa_causal_is_decomposed_with_an_explicit_mask(cls, route):
    torch.manual_seed(0)
    model = cls().eval()
    gm = capture(model, (torch.randn(2, 8, 16),))
    assert gm.meta[CAPTURED_BY] == route
    assert_attention_explicit(gm, layers=1)
    fills = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _aten.masked_fill.Scalar]
    assert len(fills) == 1 and fills[0].args[2] == -math.inf
    mul = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _aten.mul.Tensor]
    assert [n.args[1] for n in mul] == [pytest.approx(1 / math.sqrt(8))]  # the scale: its own multiply
    assert_shapes_folded(gm, {0})
    torch.manual_seed(2)
    for batch in (1, 3):
        assert_same_as_eager(model, gm, torch.randn(batch, 8, 16))


def test_sdpa_float_and_bool_masks_follow_torch():
    class Masked(nn.Module):
        def forward(self, q, k, v, m):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 4)
    for mask in (torch.rand(2, 1, 5, 7) > 0.3, torch.randn(2, 1, 5, 7)):  # every input has the batch first
        mask[..., 0] = True if mask.dtype == torch.bool else mask[..., 0]
        gm = capture(Masked(), (q, k, v, mask))
        assert_attention_explicit(gm, layers=1)
        with torch.no_grad():
            assert torch.allclose(gm(q, k, v, mask), Masked()(q, k, v, mask), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------- what cannot be made right
class FixedBatchView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.view(4, 16))  # a constant batch size


class FixedBatchExport(FixedBatchView):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.shape[1]) // 16):  # fx cannot trace this: the export route
            x = self.fc(x.reshape(4, 16))
        return x


@pytest.mark.parametrize("cls", [FixedBatchView, FixedBatchExport])
def test_a_fixed_batch_size_is_a_capture_error_naming_the_line(cls):
    with pytest.raises(CaptureError) as err:
        capture(cls(), (torch.randn(4, 16),))
    message = err.value.message
    assert "test_capture_transformers.py" in message and ("x.view(4, 16)" in message or "x.reshape(4, 16)" in message)
    assert "batch" in message and "x.size(0)" in err.value.hint


# ----------------------------------------------------------------------------------------- property: SDPA semantics
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _Sdpa(nn.Module):
    def __init__(self, is_causal: bool, scale: float | None) -> None:
        super().__init__()
        self.is_causal, self.scale = is_causal, scale

    def forward(self, q, k, v, m=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=self.is_causal, scale=self.scale)


@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 3), tgt=st.integers(1, 6), src=st.integers(1, 6),
       dim=st.integers(1, 8), causal=st.booleans(), mask=st.sampled_from([None, "bool", "float"]),
       scale=st.sampled_from([None, 0.5, 0.1]), seed=st.integers(0, 2**16))
def test_decomposed_sdpa_equals_torch(batch, heads, tgt, src, dim, causal, mask, scale, seed):
    """For any shapes, mask kind, causal flag and scale, the explicit ops compute torch's SDPA
    (rows that every mask position removes excepted: both give NaN there)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g) for n in (tgt, src, src))
    m = None
    if mask == "bool":
        m = torch.rand(batch, 1, tgt, src, generator=g) > 0.3
        m[..., 0] = True  # every row keeps a position (causal keeps j = 0 as well)
    elif mask == "float":
        m = torch.randn(batch, 1, tgt, src, generator=g)
    model = _Sdpa(causal, scale)
    inputs = (q, k, v) if m is None else (q, k, v, m)
    gm = capture(model, inputs)
    assert _count(gm, F.scaled_dot_product_attention) == 0
    with torch.no_grad():
        want, got = model(*inputs), gm(*inputs)
    assert torch.allclose(got, want, atol=ATOL, rtol=0, equal_nan=True)
