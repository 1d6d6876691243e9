"""Attention as explicit ops: ``nn.MultiheadAttention`` and ``F.scaled_dot_product_attention``.

Runs inside :func:`~fxquant.passes.capture` (both the torch.fx and the torch.export route), before
any other pass. Every attention becomes the ops the rest of fxquant quantizes one by one::

    q, k, v = linear(x, W_in, b_in) split in three         (MHA: one linear on the packed
    q, k, v → view(B, L, H, D).transpose(1, 2)              in_proj_weight, so one weight quantizer)
    s = matmul(q, k.transpose(-2, -1))                      (B, H, L, S)
    s = s * scale                                           a separate multiply by the constant 1/sqrt(D)
    s = masked_fill(s, masked, -inf)  /  s = s + mask       padding / causal / float masks, explicit
    p = softmax(s, dim=-1)
    p = dropout(p)                                          an nn.Dropout module: identity in eval
    o = matmul(p, v).transpose(1, 2).reshape(B, L, E)
    y = out_proj(o)                                         MHA: its own nn.Linear

**Scale.** The scale stays a separate multiply of the scores ``Q·Kᵀ`` (not folded into the q
projection): it is the reading of HF's eager attention and of the SDPA documentation
(``softmax(Q Kᵀ · scale + bias) V``), and it keeps the q projection's weight the parameter the
user trained (a weight quantizer attaches to it unchanged). ``1/sqrt(D)`` is a power of two only
for ``D`` a power of four; a later pass may fold it into the softmax's input format.

**Masks** (the semantics of ``F.scaled_dot_product_attention``): a boolean ``attn_mask`` keeps the
positions where it is ``True`` (``masked_fill(s, ~mask, -inf)``), a float mask is added;
``is_causal`` masks ``j > i`` with a constant ``(L, S)`` boolean buffer (``triu(ones, 1)``), or
with ``ones``/``triu`` ops on the symbolic sizes when the sequence length is dynamic.
``nn.MultiheadAttention`` follows its own convention: a boolean ``attn_mask`` or
``key_padding_mask`` marks the positions to *ignore* (``True`` = masked), float masks are added;
``is_causal`` is only a hint there (torch requires the mask itself), so the mask is applied.
A fully masked row gives NaN in the softmax, as in torch.

**Dropout** on the attention probabilities (SDPA's ``dropout_p`` as exported in training mode,
MHA's ``dropout``) becomes an ``nn.Dropout`` call so ``gm.eval()`` removes it, as elsewhere in
capture. Not decomposed (a :class:`~fxquant.errors.CaptureError` naming the module or call):
MHA's ``add_bias_kv``/``add_zero_attn``, unbatched MHA input, SDPA's ``enable_gqa``.
"""

from __future__ import annotations

import contextlib
import math
import operator
import types
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.errors import CaptureError

_aten = torch.ops.aten
SHAPES_RECORDED = "fxq_shapes_recorded"
"""``gm.meta`` key: ShapeProp ran on the example inputs, so a node without ``tensor_meta`` is no tensor."""
SDPA_TARGETS = frozenset({F.scaled_dot_product_attention, _aten.scaled_dot_product_attention.default})
"""Call targets :func:`decompose_sdpa` rewrites (the functional form and its aten overload)."""


# ------------------------------------------------------------------------------ nn.MultiheadAttention
def explicit_multihead_attention(self: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                                 need_weights: bool = True, attn_mask: torch.Tensor | None = None,
                                 average_attn_weights: bool = True, is_causal: bool = False
                                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``nn.MultiheadAttention.forward`` written with explicit ops (module docstring); traced by
    torch.fx or torch.export in place of the module's forward during capture."""
    where = f"nn.MultiheadAttention {getattr(self, '_fxq_path', '') or type(self).__name__}"
    hints = _next_hints(self)
    if self.bias_k is not None or self.add_zero_attn:
        raise CaptureError(f"{where}: add_bias_kv / add_zero_attn are not decomposed",
                           "build the attention without add_bias_kv and add_zero_attn")
    query_info = _info(hints, "query", query)
    if query_info is not None and query_info[0] != 3:
        raise CaptureError(f"{where}: unbatched (2-d) input is not decomposed", "feed (batch, seq, embed) inputs")
    masks = {}
    for name, mask in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
        if mask is not None:
            masks[name] = _info(hints, name, mask)
            if masks[name] is None:
                raise CaptureError(f"{where}: the {name}'s dtype is unknown (no example inputs)",
                                   "define example_inputs() in model.py")
    if not self.batch_first:  # (L, B, E) → (B, L, E), once per distinct input
        moved: dict[int, torch.Tensor] = {}
        for t in (query, key, value):
            moved.setdefault(id(t), t.transpose(0, 1))
        query, key, value = moved[id(query)], moved[id(key)], moved[id(value)]
    heads, embed = self.num_heads, self.embed_dim
    head_dim = embed // heads
    batch, tgt_len, src_len = query.size(0), query.size(1), key.size(1)
    if self._qkv_same_embed_dim:
        # one linear per distinct input on the packed weight, split in three (the same sums)
        projected: dict[int, torch.Tensor] = {}

        def packed(x: torch.Tensor, i: int) -> torch.Tensor:
            if id(x) not in projected:
                projected[id(x)] = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            return projected[id(x)][i]

        q, k, v = packed(query, 0), packed(key, 1), packed(value, 2)
    else:
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, self.q_proj_weight) + (biases[0] if biases[0] is not None else 0)
        k = F.linear(key, self.k_proj_weight) + (biases[1] if biases[1] is not None else 0)
        v = F.linear(value, self.v_proj_weight) + (biases[2] if biases[2] is not None else 0)
    q = q.view(batch, tgt_len, heads, head_dim).transpose(1, 2)
    k = k.view(batch, src_len, heads, head_dim).transpose(1, 2)
    v = v.view(batch, src_len, heads, head_dim).transpose(1, 2)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(head_dim))
    if attn_mask is not None:
        ndim, dtype = masks["attn_mask"]
        if ndim == 3:  # (B*H, L, S) → (B, H, L, S)
            attn_mask = attn_mask.view(batch, heads, tgt_len, src_len)
        scores = scores.masked_fill(attn_mask, float("-inf")) if dtype == torch.bool else scores + attn_mask
    if key_padding_mask is not None:  # (B, S) → (B, 1, 1, S)
        kpm = key_padding_mask.unsqueeze(1).unsqueeze(2)
        dtype = masks["key_padding_mask"][1]
        scores = scores.masked_fill(kpm, float("-inf")) if dtype == torch.bool else scores + kpm
    probs = torch.softmax(scores, dim=-1)
    if self.dropout > 0.0:
        probs = F.dropout(probs, p=self.dropout, training=True)  # capture makes it a module (eval: identity)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, tgt_len, embed)
    out = self.out_proj(out)
    if not self.batch_first:
        out = out.transpose(0, 1)
    if not need_weights:
        return out, None
    return out, (probs.mean(dim=1) if average_attn_weights else probs)


_HINTS = "_fxq_mask_hints"


def _next_hints(module: nn.Module) -> dict[str, tuple[int, torch.dtype]] | None:
    """The (ndim, dtype) of this call's tensor arguments, recorded for the fx route (whose proxies
    carry no dtype) by :func:`mha_call_hints`; ``None`` on the export route (real/fake tensors)."""
    queue = module.__dict__.get(_HINTS)
    return queue.pop(0) if queue else None


def _info(hints: dict[str, tuple[int, torch.dtype]] | None, name: str, t: Any) -> tuple[int, torch.dtype] | None:
    if isinstance(t, torch.Tensor):
        return t.dim(), t.dtype
    return (hints or {}).get(name)


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")


def mha_call_hints(gm: fx.GraphModule) -> dict[str, list[dict[str, tuple[int, torch.dtype]]]]:
    """``{module path: [per call {argument: (ndim, dtype)}]}`` of the ``nn.MultiheadAttention``
    call_module nodes of a graph that ShapeProp ran on (``tensor_meta``), in graph order."""
    out: dict[str, list[dict[str, tuple[int, torch.dtype]]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), nn.MultiheadAttention):
            continue
        bound = dict(zip(_MHA_ARGS, node.args)) | dict(node.kwargs)
        call = {}
        for name, arg in bound.items():
            meta = arg.meta.get("tensor_meta") if isinstance(arg, fx.Node) else None
            if meta is not None and hasattr(meta, "shape"):
                call[name] = (len(meta.shape), meta.dtype)
        out.setdefault(str(node.target), []).append(call)
    return out


@contextlib.contextmanager
def explicit_attention_modules(model: nn.Module, hints: dict[str, list[dict]] | None = None
                               ) -> Iterator[list[nn.MultiheadAttention]]:
    """Within the block, every ``nn.MultiheadAttention`` of ``model`` runs
    :func:`explicit_multihead_attention` (an instance attribute; the class is untouched and the
    original is restored on exit), reading its calls' ``hints`` (:func:`mha_call_hints`) in order.
    Yields the patched modules (fx must trace through them)."""
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for path, m in model.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                patched.append((m, m.__dict__.get("forward")))
                m.forward = types.MethodType(explicit_multihead_attention, m)
                m.__dict__["_fxq_path"] = path
                m.__dict__[_HINTS] = list((hints or {}).get(path, []))
        yield [m for m, _ in patched]
    finally:
        for m, previous in patched:
            del m.forward
            m.__dict__.pop("_fxq_path", None)
            m.__dict__.pop(_HINTS, None)
            if previous is not None:
                m.forward = previous


# ------------------------------------------------------------------------------ scaled_dot_product_attention
def _argument(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _static_shape(node: Any) -> tuple[Any, ...] | None:
    """The shape recorded on a node (export's fake value, or ShapeProp's metadata), ints or SymInts."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _dtype(node: Any) -> torch.dtype | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    meta = node.meta.get("tensor_meta")
    return getattr(meta, "dtype", None)


class _Emitter:
    """Emits aten calls before ``anchor``, copying its provenance metadata to every new node."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node) -> None:
        self.gm, self.anchor = gm, anchor
        self.meta = {k: v for k, v in anchor.meta.items() if k in ("nn_module_stack", "stack_trace")}

    def __call__(self, target: Any, *args: Any) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.call_function(target, args)
        node.meta.update(self.meta)
        return node

    def dim(self, x: fx.Node, d: int) -> Any:
        """``x.size(d)``: an int where the recorded shape knows it, else a ``sym_size`` node."""
        shape = _static_shape(x)
        if shape is not None and isinstance(shape[d], int):
            return int(shape[d])
        return self(_aten.sym_size.int, x, d)

    def module(self, module: nn.Module, name: str, x: fx.Node) -> fx.Node:
        self.gm.add_module(name, module)
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.call_module(name, (x,))
        node.meta.update(self.meta)
        return node

    def buffer(self, name: str, value: torch.Tensor) -> fx.Node:
        self.gm.register_buffer(name, value)
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.get_attr(name)
        node.meta.update(self.meta)
        return node


def _describe(node: fx.Node) -> str:
    from fxquant.passes.op_kinds import source_line

    where = source_line(node)
    return f"scaled_dot_product_attention at {where}" if where else f"scaled_dot_product_attention ({node.name})"


def decompose_sdpa(gm: fx.GraphModule) -> bool:
    """Rewrite every ``scaled_dot_product_attention`` call of ``gm`` (module docstring); returns
    whether the graph changed. The caller recompiles."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        q, k, v = (_argument(node, i, n, None) for i, n in enumerate(("query", "key", "value")))
        mask = _argument(node, 3, "attn_mask", None)
        dropout_p = _argument(node, 4, "dropout_p", 0.0)
        is_causal = _argument(node, 5, "is_causal", False)
        scale = _argument(node, 6, "scale", None)
        if _argument(node, 7, "enable_gqa", False):
            raise CaptureError(f"{_describe(node)}: enable_gqa (grouped-query attention) is not decomposed",
                               "repeat the key/value heads explicitly (repeat_kv) before the attention")
        if not all(isinstance(t, fx.Node) for t in (q, k, v)) or isinstance(dropout_p, fx.Node) or \
                isinstance(is_causal, fx.Node) or isinstance(scale, fx.Node):
            raise CaptureError(f"{_describe(node)}: dropout_p, is_causal and scale must be constants",
                               "pass python numbers / bools to scaled_dot_product_attention")
        emit = _Emitter(gm, node)
        if scale is None:
            head_dim = emit.dim(q, -1)
            scale = 1.0 / math.sqrt(head_dim) if isinstance(head_dim, int) else \
                emit(operator.truediv, 1.0, emit(math.sqrt, head_dim))
        scores = emit(_aten.matmul.default, q, emit(_aten.transpose.int, k, -2, -1))
        scores = emit(_aten.mul.Tensor, scores, scale)
        if is_causal:
            tgt, src = emit.dim(q, -2), emit.dim(k, -2)
            if isinstance(tgt, int) and isinstance(src, int):
                above = emit.buffer(f"_fxq_causal_mask_{node.name}",
                                    torch.ones(tgt, src, dtype=torch.bool).triu(1))
            else:
                ones = emit(_aten.ones.default, [tgt, src])
                above = emit(_aten.ne.Scalar, emit(_aten.triu.default, ones, 1), 0)
            scores = emit(_aten.masked_fill.Scalar, scores, above, float("-inf"))
        if isinstance(mask, fx.Node) and _dtype(mask) is None and gm.meta.get(SHAPES_RECORDED):
            mask = None  # a mask argument that is None at the example inputs (fx: an unused default)
        if isinstance(mask, fx.Node):
            if _dtype(mask) is None:
                raise CaptureError(f"{_describe(node)}: the attn_mask's dtype is unknown (no example inputs)",
                                   "define example_inputs() in model.py")
            if _dtype(mask) == torch.bool:
                scores = emit(_aten.masked_fill.Scalar, scores, emit(_aten.logical_not.default, mask), float("-inf"))
            else:
                scores = emit(_aten.add.Tensor, scores, mask)
        elif mask is not None:
            raise CaptureError(f"{_describe(node)}: a constant attn_mask is not supported", "pass the mask as a tensor")
        probs = emit(_aten.softmax.int, scores, -1)
        if float(dropout_p) > 0.0:
            probs = emit.module(nn.Dropout(float(dropout_p)), f"_fxq_dropout_{node.name}", probs)
        out = emit(_aten.matmul.default, probs, v)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        changed = True
    return changed


__all__ = ["SDPA_TARGETS", "decompose_sdpa", "explicit_attention_modules", "explicit_multihead_attention",
           "mha_call_hints"]
