"""Transformers end to end on the fx path: quantizer placement, training under fxquant's policies,
lowering to the ``embedding``/``softmax``/``layernorm``/``slice``/``matmul`` kinds, and the trained
fake-quant model equal to :meth:`IntegerGraph.run` of its lowering, bit for bit (the export's
``reference_check``). Oracles: the eager float model (capture and folding change nothing before
quantization), float softmax / layer norm within the documented error bounds, and the reference.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fxquant.backends.base import check_reference
from fxquant.errors import UnsupportedOpError
from fxquant.fixed_point import (LAYERNORM_FRAC_BITS, SOFTMAX_EXP_BITS, SOFTMAX_GUARD_BITS, FixedPoint,
                                 fit_frac_bits, quantize_int)
from fxquant.ops.fake_quant import FixedPointLayerNorm, FixedPointSoftmax
from fxquant.passes import InsertQuantizers, capture, lower_to_integer_graph
from fxquant.passes.op_kinds import scaled_parameter
from fxquant.policies import make_policy
from fxquant.precision_map import PrecisionMap
from fxquant.quantizers import ACT, WEIGHT, quantizers

VOCAB, SEQ, DIM, CLASSES = 20, 6, 8, 3


class Attention(nn.Module):
    """Multi-head self-attention written with plain torch ops (what fx traces today)."""

    def __init__(self, d: int, heads: int, mask_style: str = "masked_fill", causal: str | None = None,
                 qkv: str = "separate") -> None:
        super().__init__()
        self.h, self.dh, self.mask_style, self.causal, self.qkv_style = heads, d // heads, mask_style, causal, qkv
        if qkv == "separate":
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        else:
            self.qkv = nn.Linear(d, 3 * d)
        self.o = nn.Linear(d, d)
        self.register_buffer("tril", torch.tril(torch.ones(SEQ, SEQ)))

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.h, self.dh).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        if self.qkv_style == "separate":
            q, k, v = self.q(x), self.k(x), self.v(x)
        elif self.qkv_style == "split":
            q, k, v = self.qkv(x).split(self.h * self.dh, dim=-1)
        else:
            q, k, v = self.qkv(x).chunk(3, dim=2)
        q, k, v = self.heads(q), self.heads(k), self.heads(v)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.dh)
        if self.causal == "buffer":
            scores = scores.masked_fill(self.tril == 0, float("-inf"))
        elif self.causal == "computed":
            scores = scores.masked_fill(~torch.ones((s, s), dtype=torch.bool).tril(), float("-inf"))
        if mask is not None:
            m = mask[:, None, None, :]
            if self.mask_style == "masked_fill":
                scores = scores.masked_fill(m == 0, float("-inf"))
            elif self.mask_style == "additive":  # Hugging Face's extended attention mask
                scores = scores + (1.0 - m.float()) * -1e9
            else:
                scores = torch.where(m.bool(), scores, float("-inf"))
        p = F.softmax(scores, dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, s, d))


class Encoder(nn.Module):
    """embedding -> LN -> attention (padding mask: token id 0) -> add -> LN -> MLP(GELU) -> add ->
    CLS token -> linear."""

    def __init__(self, heads: int = 2, mask_style: str = "masked_fill", causal: str | None = None,
                 qkv: str = "separate", mask_input: bool = False) -> None:
        super().__init__()
        self.mask_input = mask_input
        self.emb = nn.Embedding(VOCAB, DIM)
        self.ln0 = nn.LayerNorm(DIM)
        self.attn = Attention(DIM, heads, mask_style, causal, qkv)
        self.ln1 = nn.LayerNorm(DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.mask_input:
            mask = ids != 0  # pad id 0
        h = self.ln0(self.emb(ids))
        h = h + self.attn(h, mask)
        h = h + self.fc2(F.gelu(self.fc1(self.ln1(h))))
        return self.head(h[:, 0])


def _data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    lengths = torch.randint(2, SEQ + 1, (n,), generator=g)
    ids[torch.arange(SEQ)[None, :] >= lengths[:, None]] = 0  # right padding
    return ids, ids[:, 1] % CLASSES


def _train(gm: nn.Module, policy_name: str, options: dict, steps: int = 6) -> nn.Module:
    """The documented user loop (docs/policies.md) for ``steps`` steps on token batches."""
    batches = [_data(16, seed) for seed in range(steps)]
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    policy = make_policy(policy_name, **options)
    policy.plan(steps)
    gm.train()
    policy.on_train_begin(gm, batches[0][0])
    for step, (ids, y) in enumerate(batches):
        assert ids.dtype == torch.int64  # token ids stay integer through training
        policy.on_batch_begin(step, gm)
        loss = F.cross_entropy(gm(ids), y)
        extra = policy.loss_terms(gm)
        opt.zero_grad()
        (loss if extra is None else loss + extra).backward()
        policy.before_step(gm)
        opt.step()
        policy.on_batch_end(step, loss.item(), gm)
    assert torch.isfinite(loss)
    gm.eval()
    policy.on_train_end(gm)
    return gm


def _quantized(model: nn.Module) -> torch.fx.GraphModule:
    gm = capture(model)
    InsertQuantizers()(gm)
    return gm


def _calibrate_8bit(gm: torch.fx.GraphModule, x: torch.Tensor) -> None:
    """One training-mode forward to record ranges, every quantizer at 8 bits fitted to them, eval."""
    gm.train()
    gm(x)
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(8, fit_frac_bits(float(q.amax), 8)))
    gm.eval()


def _assert_reference_exact(gm, *inputs: torch.Tensor):
    graph = lower_to_integer_graph(gm, *(x[:1] for x in inputs))
    record = check_reference(gm, graph, [x.numpy() for x in inputs])
    assert record["bit_exact"], record["first_mismatch"]
    return graph


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("policy,options", [("static", {"bits": 8}), ("adapt", {"lb_min": 2, "lb_max": 4}),
                                            ("cpt", {"bits_min": 4, "bits_max": 8, "cycles": 2})])
@pytest.mark.parametrize("variant", [
    {"heads": 2},                                      # multi-head, 1/sqrt(4) = mul_pow2
    {"heads": 1},                                      # single head, 1/sqrt(8) folded into q's weights
    {"heads": 2, "causal": "buffer"},                  # GPT-style tril buffer + padding
])
def test_trained_encoder_equals_its_integer_graph(policy, options, variant):
    torch.manual_seed(0)
    gm = _train(_quantized(Encoder(**variant)), policy, options)
    ids, _ = _data(32, seed=99)
    graph = _assert_reference_exact(gm, ids)
    kinds = [op.kind for op in graph.ops]
    assert kinds.count("embedding") == 1 and kinds.count("layernorm") == 2 and kinds.count("softmax") == 1
    assert kinds.count("matmul") == 2 and kinds.count("lut") == 1 and "slice" in kinds
    softmax = next(op for op in graph.ops if op.kind == "softmax")
    assert softmax.attrs["causal"] == ("causal" in variant)
    assert len(softmax.inputs) == 2  # scores and the padding mask (the ids themselves: nonzero = keep)
    ids_value = graph.values["ids"]
    assert ids_value.fmt == FixedPoint(6, 0)  # V - 1 = 19 <= 2^5 - 1
    assert [v.name for v in graph.inputs] == ["ids"]


@pytest.mark.parametrize("variant", [
    {"mask_style": "additive"}, {"mask_style": "where"}, {"causal": "computed"},
    {"qkv": "split"}, {"qkv": "chunk"}, {"mask_input": True}, {"mask_input": True, "causal": "buffer"},
    {"qkv": "split", "heads": 1},  # packed qkv: 1/sqrt(8) folded into q's rows of the qkv weight
])
def test_mask_and_slice_forms_lower_bit_exact(variant):
    torch.manual_seed(1)
    gm = _quantized(Encoder(**variant))
    ids, _ = _data(32, seed=3)
    inputs = (ids, (ids != 0).long()) if variant.get("mask_input") else (ids,)
    gm.train()
    gm(*inputs)  # ranges
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(8, fit_frac_bits(float(q.amax), 8)))
    gm.eval()
    graph = _assert_reference_exact(gm, *inputs)
    softmax = next(op for op in graph.ops if op.kind == "softmax")
    assert softmax.attrs["causal"] == ("causal" in variant)
    if variant.get("mask_input"):
        assert graph.values["mask"].fmt == FixedPoint(2, 0)
        mask_reader = next(op for op in graph.ops if op.output == softmax.inputs[1])
        assert mask_reader.kind == "reshape" and mask_reader.attrs["shape"] == (1, 1, SEQ)


@pytest.mark.parametrize("qkv", ["separate", "split"])
def test_capture_and_scale_folding_keep_the_float_model(qkv):
    torch.manual_seed(2)
    model = Encoder(heads=1, qkv=qkv)
    name = "attn.q" if qkv == "separate" else "attn.qkv"
    weight = model.get_parameter(f"{name}.weight").detach().clone()
    bias = model.get_parameter(f"{name}.bias").detach().clone()
    gm = _quantized(model)  # quantizers off: the float model
    ids, _ = _data(8)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids), rtol=1e-5, atol=1e-6)
    assert torch.equal(model.get_parameter(f"{name}.weight"), weight)  # the user's module is not changed
    # the parameters stay the user's (same training dynamics); the linear reads them scaled
    assert torch.equal(gm.get_parameter(f"{name}.weight"), weight) and torch.equal(gm.get_parameter(f"{name}.bias"), bias)
    scale = torch.ones(weight.shape[0], dtype=weight.dtype)
    scale[:DIM] = 1 / math.sqrt(8)  # q's rows only (all of them for a separate q)
    scaled = {str(n.args[0].target): n for n in gm.graph.nodes if n.target is scaled_parameter}
    assert set(scaled) == {f"{name}.weight", f"{name}.bias"}
    for key, expected in ((f"{name}.weight", weight * scale[:, None]), (f"{name}.bias", bias * scale)):
        s = gm.get_buffer(str(scaled[key].args[1].target))
        torch.testing.assert_close(scaled_parameter(gm.get_parameter(key), s), expected)
    assert not any(n.target is torch.ops.aten.mul.Tensor or n.target in ("mul", "div") for n in gm.graph.nodes)


@pytest.mark.parametrize("qkv", ["separate", "split"])
def test_folded_scale_trains_like_the_eager_model(qkv):
    """Folding 1/sqrt(d) into the parameter itself would multiply those rows' effective learning rate
    by d (a ViT with heads of 32 diverged under SGD): the captured, quantizer-free graph must take
    the eager model's optimizer steps."""
    import copy

    torch.manual_seed(3)
    model = Encoder(heads=1, qkv=qkv)
    gm = _quantized(copy.deepcopy(model))
    losses = []
    for m in (model, gm):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
        m.train()
        out = []
        for seed in range(5):
            ids, y = _data(16, seed)
            loss = F.cross_entropy(m(ids), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        losses.append(out)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)


def test_unfoldable_scale_is_named_with_its_source_line():
    gm = _quantized(Encoder(heads=1, qkv="chunk"))  # chunk(3, dim=2): no shapes to prove dim 2 is the features
    ids, _ = _data(8)
    gm(ids)
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(8, fit_frac_bits(float(q.amax), 8)))
    gm.eval()
    with pytest.raises(UnsupportedOpError, match=r"attn: operator.truediv.*test_transformer_lowering.py:\d+.*"
                                                 r"multiply by the constant"):
        lower_to_integer_graph(gm, ids[:1])


def test_precision_map_lists_the_transformer_layers():
    gm = _train(_quantized(Encoder()), "static", {"bits": 8}, steps=2)
    layers = PrecisionMap.from_model(gm).layers
    kinds = {name: entry.kind for name, entry in layers.items()}
    assert kinds["emb"] == "embedding" and layers["emb"].weight is not None  # the table's format
    assert kinds["ln0"] == "layernorm" and kinds["ln1"] == "layernorm" and layers["ln1"].weight is not None
    softmax_q = quantizers(gm)[("attn.softmax", ACT)]
    assert kinds["attn.softmax"] == "softmax"
    assert layers["attn.softmax"].act == FixedPoint(8, fit_frac_bits(float(softmax_q.amax), 8))  # in [0, 1]: FL 6 or 7
    assert {"matmul"} <= set(kinds.values())
    assert not any(k.startswith("input") for k in kinds)  # the token ids have no float quantizer


def test_adapt_sets_softmax_and_layernorm_formats_like_other_layers():
    """AdaPT adapts every weighted layer's weight format (LayerNorm gamma and the embedding table
    too) and gives every activation, softmax and LayerNorm outputs included, ``act_bits`` with an FL
    that follows its range."""
    torch.manual_seed(0)
    gm = _quantized(Encoder())
    policy_options = {"lb_min": 2, "lb_max": 4}
    _train(gm, "adapt", policy_options, steps=6)
    qs = quantizers(gm)
    for layer in ("ln0", "ln1", "emb"):
        assert qs[(layer, WEIGHT)].fmt != FixedPoint(8, 4), layer  # moved off AdaPT's initial <8,4>
    for layer in ("attn.softmax", "ln0", "ln1"):
        q = qs[(layer, ACT)]
        assert int(q.bits) == 8 and int(q.frac_bits) == fit_frac_bits(float(q.amax), 8), layer
    ids, _ = _data(16, seed=5)
    _assert_reference_exact(gm, ids)


def test_slices_split_chunk_narrow_lower_bit_exact():
    class Slicer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)                     # (N, 5, 8)
            a, b = h.chunk(2, dim=-1)          # two (N, 5, 4)
            c = h[..., 2:6]                    # a slice of the last axis
            tail = b[:, 1:4:2] + c.narrow(1, 0, 2)  # strided slice + narrow
            return self.out(tail + a[:, -2:, :]), h[:, 4]  # a negative start; a select

    torch.manual_seed(3)
    gm = _quantized(Slicer())
    x = torch.randn(16, 5, 8)
    gm(x)
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(8, fit_frac_bits(float(q.amax), 8)))
    gm.eval()
    graph = lower_to_integer_graph(gm, x[:1])
    record = check_reference(gm, graph, [x.numpy()])
    assert record["bit_exact"], record["first_mismatch"]
    slices = {tuple(sorted(op.attrs.items())) for op in graph.ops if op.kind == "slice"}
    assert slices == {(("dim", 2), ("start", 0), ("step", 1), ("stop", 4)), (("dim", 2), ("start", 4), ("step", 1), ("stop", 8)),
                      (("dim", 2), ("start", 2), ("step", 1), ("stop", 6)), (("dim", 1), ("start", 1), ("step", 2), ("stop", 4)),
                      (("dim", 1), ("start", 0), ("step", 1), ("stop", 2)), (("dim", 1), ("start", 3), ("step", 1), ("stop", 5)),
                      (("dim", 1), ("index", 4))}


def test_batch_slicing_is_refused_by_name():
    class BatchSlice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)[1:]

    gm = _quantized(BatchSlice())
    x = torch.randn(4, 4)
    gm(x)
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(8, 4))
    gm.eval()
    with pytest.raises(UnsupportedOpError, match="operator.getitem.*slicing the batch dimension"):
        lower_to_integer_graph(gm, x[:2])


def test_constant_mask_that_is_not_causal_is_refused():
    class Banded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("band", torch.triu(torch.ones(3, 3)))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return F.softmax((h @ h.transpose(-2, -1)).masked_fill(self.band == 0, float("-inf")), dim=-1)

    gm = _quantized(Banded())
    x = torch.randn(4, 3, 4)
    gm(x)
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(8, 4))
    gm.eval()
    with pytest.raises(UnsupportedOpError, match="constant mask that is not causal"):
        lower_to_integer_graph(gm, x[:1])


def test_insert_quantizers_is_idempotent_on_transformers():
    gm = _quantized(Encoder())
    assert not InsertQuantizers()(gm).modified


# ------------------------------------------------------------------------------------------ the ops alone
def _on_grid(x: torch.Tensor, fmt: FixedPoint) -> torch.Tensor:
    k = torch.clamp(torch.round(x * 2.0 ** fmt.frac_bits), fmt.qmin, fmt.qmax)
    return (k * 2.0 ** -fmt.frac_bits).double()


def _formats(fmt: FixedPoint) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(fmt.bits, dtype=torch.int32), torch.tensor(fmt.frac_bits, dtype=torch.int32)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), length=st.integers(1, 12), in_fl=st.integers(0, 6), out_fl=st.integers(5, 10),
       seed=st.integers(0, 2**16))
def test_softmax_forward_within_the_documented_bound_and_float_gradient(rows, length, in_fl, out_fl, seed):
    """Against float softmax: ``|y - p| <= 2^-FL_out + (L + 1) 2^-(E+1) + 2^-(FL_out+G+1)``
    (docs/number_format.md); masked entries exactly 0; all-masked rows 0; gradient = float softmax's."""
    g = torch.Generator().manual_seed(seed)
    in_fmt, out_fmt = FixedPoint(8, in_fl), FixedPoint(out_fl + 2, out_fl)
    x = _on_grid(torch.randn(rows, 2, length, generator=g) * 3, in_fmt).requires_grad_(True)
    keep = torch.rand(rows, 1, length, generator=g) > 0.3
    keep[0] = False  # one all-masked row group
    sm = FixedPointSoftmax("sm")
    y = sm(x, *_formats(in_fmt), *_formats(out_fmt), keep)
    xm = x.detach().masked_fill(~keep, -math.inf)
    p = torch.nan_to_num(torch.softmax(xm, -1), nan=0.0)
    bound = 2.0 ** -out_fl + (length + 1) * 2.0 ** -(SOFTMAX_EXP_BITS + 1) + 2.0 ** -(out_fl + SOFTMAX_GUARD_BITS + 1)
    assert float((y.detach() - p).abs().max()) <= bound
    assert torch.all(y.detach()[~keep.expand_as(y)] == 0)
    k = y.detach() * 2.0 ** out_fl
    assert torch.equal(k, torch.round(k))  # on the output grid
    w = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (gx,) = torch.autograd.grad((y * w).sum(), x)
    xf = x.detach().requires_grad_(True)
    pf = torch.softmax(xf.masked_fill(~keep, torch.finfo(torch.float64).min), -1) * keep
    (gf,) = torch.autograd.grad((pf * w).sum(), xf)
    torch.testing.assert_close(gx, gf)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 32), in_fl=st.integers(0, 6), seed=st.integers(0, 2**16))
def test_layernorm_forward_close_to_float_and_float_gradient(n, in_fl, seed):
    g = torch.Generator().manual_seed(seed)
    in_fmt, w_fmt, out_fmt = FixedPoint(8, in_fl), FixedPoint(8, 6), FixedPoint(12, 8)
    x = _on_grid(torch.randn(3, n, generator=g) * 2 + 0.5, in_fmt).requires_grad_(True)
    w = _on_grid(torch.rand(n, generator=g) + 0.5, w_fmt).requires_grad_(True)
    b = (torch.randn(n, generator=g) * 0.5).double().requires_grad_(True)
    ln = FixedPointLayerNorm("ln", [n], 1e-5)
    y = ln(x, *_formats(in_fmt), *_formats(w_fmt), *_formats(out_fmt), w, b)
    ref = F.layer_norm(x.detach(), [n], w.detach(), b.detach(), 1e-5)
    # output LSB + beta's rounding (2^-(FL_w+16)) + |gamma| * (x_hat error ~ 2^-16 + sqrt(n) |x_hat| 2^-29)
    xhat = F.layer_norm(x.detach(), [n], eps=1e-5).abs()
    tol = 2.0 ** -out_fmt.frac_bits + 2.0 ** -(w_fmt.frac_bits + LAYERNORM_FRAC_BITS) + \
        w.detach().abs() * (2.0 ** -LAYERNORM_FRAC_BITS + math.sqrt(n) * xhat * 2.0 ** -28)
    sat = ref.abs() >= out_fmt.qmax * 2.0 ** -out_fmt.frac_bits
    assert torch.all(((y.detach() - ref).abs() <= tol) | sat)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((y * gy).sum(), (x, w, b))
    xf, wf, bf = (t.detach().requires_grad_(True) for t in (x, w, b))
    expect = torch.autograd.grad((F.layer_norm(xf, [n], wf, bf, 1e-5) * gy).sum(), (xf, wf, bf))
    for got, want in zip(grads, expect):
        torch.testing.assert_close(got, want)


def test_off_quantizers_are_the_float_ops():
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    off = _formats(FixedPoint(32, 0))
    torch.testing.assert_close(FixedPointSoftmax("s")(x, *off, *off), torch.softmax(x, -1))
    ln = FixedPointLayerNorm("l", [5])
    torch.testing.assert_close(ln(x, *off, *off, *off, None, None), F.layer_norm(x, [5]))


class Positions(nn.Module):
    """Positions computed inside the model (``arange``, as BERT / GPT-2 do), a token tensor expanded
    over the batch and concatenated (a ViT's class token), and a positional parameter added."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.pos = nn.Embedding(SEQ + 1, DIM)
        self.class_token = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos_embedding = nn.Parameter(torch.randn(1, SEQ + 1, DIM) * 0.5)
        self.proj = nn.Linear(DIM, DIM)
        self.fc = nn.Linear(DIM, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = torch.cat([self.class_token.expand(x.shape[0], -1, -1), h], dim=1)
        if self.style == "arange":
            h = h + self.pos(torch.arange(h.shape[1]))
        else:
            h = h + self.pos_embedding
        return self.fc(h[:, 0])


@pytest.mark.parametrize("style", ["arange", "parameter"])
def test_class_token_and_positions_lower_to_constants_bit_exact(style):
    torch.manual_seed(0)
    gm = _quantized(Positions(style))
    x = torch.randn(8, SEQ, DIM)
    _calibrate_8bit(gm, x)
    graph = _assert_reference_exact(gm, x)
    consts = [op for op in graph.ops if op.kind == "constant"]
    assert [op.weight.shape for op in consts] == [(1, DIM), (SEQ + 1, DIM)]  # per sample, batch dropped
    assert all(op.inputs == ("x",) and op.weight_fmt == op.out_fmt for op in consts)
    tokens = torch.cat([gm.class_token.detach()] * 3)  # the class token's integers, in every sample
    k = graph.run(*graph.quantize_inputs(x[:3].numpy()), keep_all=True)[consts[0].output]
    assert k.shape == (3, 1, DIM) and np.array_equal(k, quantize_int(tokens.double().numpy(), consts[0].out_fmt))


def test_constant_with_a_leading_axis_that_is_not_the_batch_is_refused():
    class Tiled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(4, SEQ, DIM))
            self.fc = nn.Linear(DIM, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x + self.table[:1] + self.table.sum(0, keepdim=True))

    gm = _quantized(Tiled())
    x = torch.randn(4, SEQ, DIM)
    gm(x)
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(8, 4))
    gm.eval()
    graph = lower_to_integer_graph(gm, x[:1])  # (1, S, D) slices and sums of a parameter are constants
    assert [op.kind for op in graph.ops].count("constant") >= 1

    class Batched(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(4, DIM))
            self.fc = nn.Linear(DIM, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.cat([x, self.table], dim=0))

    gm = _quantized(Batched())
    x = torch.randn(4, DIM)
    gm(x)
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(8, 4))
    gm.eval()
    with pytest.raises(UnsupportedOpError, match="leading axis is neither 1 nor the batch"):
        lower_to_integer_graph(gm, x[:1])


def test_census_and_bitops_count_attention_layers():
    from fxquant.bitops import layer_costs
    from fxquant.census import take_census

    gm = _train(_quantized(Encoder(heads=2)), "static", {"bits": 8}, steps=1)
    ids, _ = _data(2)
    census = take_census(gm, (ids,))
    assert census.float_ops == []  # nothing left in float
    quantized = {op.name: (op.params, op.macs) for op in census.quantized}
    assert quantized["emb"] == (VOCAB * DIM, 0)
    assert quantized["ln0"] == (2 * DIM, quantized["ln0"][1]) and quantized["attn.softmax"][0] == 0
    # by hand, per sample: Q K^T 2 heads * 6 * 6 * 4 = 288 MACs, P V the same
    assert quantized["attn.matmul"] == (0, 288) and quantized["attn.matmul:1"] == (0, 288)
    costs = {c.layer: c for c in layer_costs(gm, ids)}
    assert costs["attn.matmul"].macs == 288 and costs["attn.matmul:1"].macs == 288
    assert costs["attn.matmul"].input_q.layer == "attn.q" and costs["attn.matmul"].weight_q.layer == "attn.k"
    assert costs["attn.matmul:1"].input_q.kind == "softmax"


class Untraceable(Encoder):
    """fx cannot trace Python control flow on a shape: capture falls back to torch.export (aten ops)."""

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.shape[1] > 100:
            ids = ids[:, :100]
        return super().forward(ids, mask)


@pytest.mark.parametrize("variant", [{"heads": 1}, {"heads": 2, "causal": "buffer", "mask_style": "additive"},
                                     {"qkv": "split", "mask_style": "where"}, {"qkv": "split", "heads": 1}])
def test_export_capture_lowers_bit_exact(variant):
    from fxquant.passes.capture import CAPTURED_BY

    torch.manual_seed(0)
    ids, _ = _data(16)
    gm = capture(Untraceable(**variant), (ids[:2],))
    assert gm.meta[CAPTURED_BY] == "torch.export"
    InsertQuantizers()(gm)
    _calibrate_8bit(gm, ids)
    graph = _assert_reference_exact(gm, ids)
    softmax = next(op for op in graph.ops if op.kind == "softmax")
    assert softmax.attrs["causal"] == ("causal" in variant) and len(softmax.inputs) == 2
    if variant.get("heads") == 1:  # 1/sqrt(8) folded away (export's split records its shapes)
        assert "mul_pow2" not in {op.kind for op in graph.ops}
    assert {op.kind for op in graph.ops} >= {"embedding", "layernorm", "matmul", "slice", "lut"}


def test_strip_quantizers_gives_the_float_encoder_back():
    from fxquant.passes import StripQuantizers

    torch.manual_seed(4)
    model = Encoder(heads=2, causal="buffer")
    gm = _quantized(model)
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(6, 3))
    ids, _ = _data(8)
    assert StripQuantizers()(gm).modified
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids), rtol=1e-5, atol=1e-6)


@st.composite
def _indices(draw):
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    entries: list = [slice(None)]  # the batch axis stays whole
    for size in shape:
        if draw(st.booleans()) and len(entries) > 1 and draw(st.booleans()):
            entries.append(draw(st.integers(-size, size - 1)))  # a select (negative: from the end)
            continue
        start = draw(st.none() | st.integers(-size, size - 1))
        stop = draw(st.none() | st.integers(-size, size))
        step = draw(st.none() | st.integers(1, 3))
        if len(range(size)[slice(start, stop, step)]) == 0:
            start, stop = None, None
        entries.append(slice(start, stop, step))
    if draw(st.booleans()):
        entries = entries[:draw(st.integers(1, len(entries)))]
    return shape, tuple(entries)


@settings(max_examples=30, deadline=None)
@given(case=_indices(), seed=st.integers(0, 2**16))
def test_any_int_and_slice_index_lowers_to_the_same_integers(case, seed):
    """Oracle: torch's own indexing of the quantized tensor."""
    shape, index = case

    class Index(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x + x)[index]

    gm = _quantized(Index())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *shape, generator=g)
    for q in quantizers(gm).values():
        q.set_format(FixedPoint(8, 4))
    gm.eval()
    graph = lower_to_integer_graph(gm, x[:1])
    out = graph.run(*graph.quantize_inputs(x.numpy()))[graph.outputs[0]]
    expect = torch.clamp(torch.round((2 * _on_grid(x, FixedPoint(8, 4))) * 16), -128, 127)[index]
    np.testing.assert_array_equal(out, expect.numpy().astype(np.int64))
