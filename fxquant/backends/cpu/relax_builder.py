"""IntegerGraph -> Relax in QDQ form: the same shape of IR ``relax.frontend.onnx.from_onnx`` gives
for a QDQ ONNX model, so :class:`~.rewrite_quantized_ops.RewriteQuantizedOps` serves both entries.

``main`` takes the float32 model inputs (quantized by ``R.quantize`` [+ clip], as ONNX's input
QuantizeLinear) and int32 token ids (an input an ``embedding`` reads: never quantized) and returns
the int8 output integers (uint8 for a 9-bit softmax output, :func:`storage_dtype`). Every other
integer value is an int8 tensor with a symbolic batch ``n``; a value of format ``<BW,FL>`` is read by ``R.dequantize(v, 2^-FL, 0)`` and written by ``R.quantize(y, 2^-FL, 0)`` (plus
``R.clip(., -2^(BW-1), 2^(BW-1)-1)`` when ``BW < 8``). Per op (as the ONNX importer emits it):

* conv2d: ``Q([relu](conv2d(DQ(x), DQ(W)) + reshape(DQ(b), [1,O,1,1])))``
* linear: ``Q([relu](matmul(DQ(x), permute_dims(DQ(W))) + DQ(b)))``
* add: ``Q([relu](DQ(a) + DQ(b)))``; avgpool2d: ``Q(avg_pool2d(DQ(x)))``;
  requantize / standalone relu: ``Q([relu](DQ(x)))``
* maxpool2d: ``Q(max_pool2d(DQ(x)))`` with the input scale; flatten: ``reshape`` on the int8 tensor.
* constant: ``call_tir`` of :func:`.transformer_kernels.constant_broadcast` (the int8 integers copied
  into every sample).
* linear on a value of rank > 2 (with the batch): ``reshape`` to ``[n * lead, K]``, the linear above,
  ``reshape`` back; ``matmul``, ``embedding``, ``slice``, ``softmax``, ``layernorm``: ``call_tir`` of a
  :mod:`.transformer_kernels` kernel on the integer tensors.

Weights are int8 constants, int16 for formats of 9..16 bits (never cast narrower than their
format); biases are int32 constants at ``FL_w + FL_in``. What the CPU kernels cannot build
(activations wider than 8 bits, ...) is refused before this runs, by
:meth:`fxquant.backends.cpu.target.CpuTarget.check`.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax, tirx

from fxquant.backends.pool_shape import PoolShape
from fxquant.backends.tvm_epilogue import Requant
from fxquant.errors import UnsupportedOpError
from fxquant.fixed_point import FixedPoint, reciprocal
from fxquant.backends.cpu.storage import ACT_DTYPE, IDS_DTYPE, id_inputs, storage_dtype, unsigned_values  # noqa: F401
from fxquant.integer_graph import IntegerGraph, Op, avg_divisors

MAX_ACT_BITS = 8
DIRECT_KINDS = ("cat", "clamp", "lut", "mul", "transpose", "upsample_nearest", "maxpool2d", "avgpool2d",
                "conv_transpose2d")
"""Kinds emitted as ``call_tir`` of a :mod:`.vision_kernels` kernel (no QDQ pattern expresses them:
an any-window average is a reciprocal multiply, not the float average ``R.quantize`` would round)."""
TRANSFORMER_DIRECT_KINDS = ("matmul", "embedding", "slice", "softmax", "layernorm", "constant")
"""Kinds emitted as ``call_tir`` of a :mod:`.transformer_kernels` kernel."""
def _scale(frac_bits: int) -> relax.Constant:
    return relax.const(math.ldexp(1.0, -frac_bits), "float32")


class _Emitter:
    def __init__(self, graph: IntegerGraph, bb: relax.BlockBuilder, batch: tirx.Var) -> None:
        self.graph, self.bb, self.batch = graph, bb, batch
        self.env: dict[str, relax.Expr] = {}
        self.fmts: dict[str, FixedPoint] = {}  # values of the emitter's own (row-folded linear inputs)

    def fmt(self, name: str) -> FixedPoint:
        return self.fmts[name] if name in self.fmts else self.graph.value(name).fmt

    def dq(self, name: str) -> relax.Expr:
        fl = self.fmt(name).frac_bits
        assert fl is not None
        return self.bb.emit(relax.op.dequantize(self.env[name], _scale(fl), relax.const(0, ACT_DTYPE), axis=1))

    def q(self, y: relax.Expr, op: Op) -> relax.Expr:
        fmt = op.out_fmt
        assert fmt.frac_bits is not None
        if op.attrs.get("relu"):
            y = self.bb.emit(relax.op.nn.relu(y))
        out = self.bb.emit(relax.op.quantize(y, _scale(fmt.frac_bits), relax.const(0, ACT_DTYPE), axis=1,
                                             out_dtype=ACT_DTYPE))
        if fmt.bits < MAX_ACT_BITS:
            out = self.bb.emit(relax.op.clip(out, relax.prim_value(fmt.qmin), relax.prim_value(fmt.qmax)))
        return out

    def weight(self, op: Op) -> relax.Expr:
        assert op.weight is not None and op.weight_fmt is not None and op.weight_fmt.frac_bits is not None
        dtype = "int8" if op.weight_fmt.bits <= MAX_ACT_BITS else "int16"
        return self.bb.emit(relax.op.dequantize(relax.const(op.weight.astype(dtype)), _scale(op.weight_fmt.frac_bits),
                                                relax.const(0, ACT_DTYPE), axis=0))

    def bias(self, op: Op, in_name: str) -> relax.Expr | None:
        if op.bias is None:
            return None
        assert op.weight_fmt is not None and op.weight_fmt.frac_bits is not None
        fl = self.fmt(in_name).frac_bits + op.weight_fmt.frac_bits
        return self.bb.emit(relax.op.dequantize(relax.const(op.bias.astype(np.int32)), _scale(fl),
                                                relax.const(0, "int32"), axis=0))

    def emit(self, op: Op) -> relax.Expr:
        bb, x = self.bb, op.inputs[0]
        if op.kind == "conv2d" and _is_patch_conv(op, tuple(self.graph.value(x).shape)):
            return self.patch_linear(op)
        if op.kind == "conv2d":
            y = bb.emit(relax.op.nn.conv2d(self.dq(x), self.weight(op), strides=op.attrs.get("stride", (1, 1)),
                                           padding=op.attrs.get("padding", (0, 0)),
                                           dilation=op.attrs.get("dilation", (1, 1)),
                                           groups=op.attrs.get("groups", 1)))
            b = self.bias(op, x)
            if b is not None:
                y = bb.emit(relax.op.add(y, bb.emit(relax.op.reshape(b, (1, -1, 1, 1)))))
            return self.q(y, op)
        if op.kind == "linear":
            shape = () if x in self.fmts else tuple(self.graph.value(x).shape)
            if len(shape) > 1:  # leading dims folded into rows: [n * lead, K] through the 2-D kernel
                rows = Op(op.name, op.kind, (f"{x}#rows",), op.output, op.out_fmt, op.weight, op.weight_fmt, op.bias,
                          op.attrs)
                self.env[rows.inputs[0]] = bb.emit(relax.op.reshape(self.env[x], (self.batch * math.prod(shape[:-1]),
                                                                                   shape[-1])))
                self.fmts[rows.inputs[0]] = self.fmt(x)
                y = self.emit(rows)
                return bb.emit(relax.op.reshape(y, (self.batch, *shape[:-1], op.weight.shape[0])))
            y = bb.emit(relax.op.matmul(self.dq(x), bb.emit(relax.op.permute_dims(self.weight(op), [1, 0]))))
            b = self.bias(op, x)
            return self.q(bb.emit(relax.op.add(y, b)) if b is not None else y, op)
        if op.kind == "add":
            return self.q(bb.emit(relax.op.add(self.dq(op.inputs[0]), self.dq(op.inputs[1]))), op)
        if op.kind in DIRECT_KINDS:
            return self.direct(op)
        if op.kind in TRANSFORMER_DIRECT_KINDS:
            return self.transformer(op)
        if op.kind in ("relu", "requantize"):
            out_fmt = self.fmt(x) if op.kind == "relu" else op.out_fmt
            return self.q(self.dq(x), Op(op.name, "requantize", op.inputs, op.output, out_fmt,
                                         attrs={"relu": op.kind == "relu" or op.attrs.get("relu", False)}))
        if op.kind == "flatten":
            return bb.emit(relax.op.reshape(self.env[x], (self.batch, -1)))
        if op.kind == "reshape":
            return bb.emit(relax.op.reshape(self.env[x], (self.batch, *(int(d) for d in op.attrs["shape"]))))
        if op.kind == "mul_pow2":  # the same integers read at another scale (DQ uses the output's FL)
            return self.env[x]
        raise UnsupportedOpError(f"op {op.name!r}: kind {op.kind!r} has no fxquant CPU kernel")

    def patch_linear(self, op: Op) -> relax.Expr:
        """A conv whose stride is its kernel (no padding): ``patches`` -> the linear's QDQ pattern over
        ``[n * P, C KH KW]`` (the weight read as ``[O, C KH KW]``) -> ``[n, O, OH, OW]``. The linear
        kernel's register tiles fill every lane; the conv kernel's vectors of output columns would run
        a ``OW``-wide row (4 in a ViT) half empty."""
        from fxquant.backends.cpu import vision_kernels as vk

        assert op.weight is not None
        x = op.inputs[0]
        c, h, w = (int(d) for d in self.graph.value(x).shape)
        kh, kw = (int(k) for k in op.weight.shape[2:])
        oh, ow, o = h // kh, w // kw, int(op.weight.shape[0])
        p, k = oh * ow, c * kh * kw
        rows = f"{x}#patches"
        patches = self.call(vk.patches((c, h, w), (kh, kw)), "patches", [self.env[x]], (p, k))
        self.env[rows] = self.bb.emit(relax.op.reshape(patches, (self.batch * p, k)))
        self.fmts[rows] = self.fmt(x)
        y = self.emit(Op(op.name, "linear", (rows,), op.output, op.out_fmt, op.weight.reshape(o, k), op.weight_fmt,
                         op.bias, {"relu": bool(op.attrs.get("relu", False))}))
        y = self.bb.emit(relax.op.reshape(y, (self.batch, p, o)))
        y = self.call(vk.transpose((p, o), (1, 0)), "transpose", [y], (o, p))
        return self.bb.emit(relax.op.reshape(y, (self.batch, o, oh, ow)))

    def call(self, func: "tirx.PrimFunc", kind: str, args: list, shape: tuple[int, ...],
             dtype: str = ACT_DTYPE) -> relax.Expr:
        """``call_tir`` of an fxquant kernel (added once per distinct kernel, named by
        ``AttachGlobalSymbol`` after its GlobalVar, as the rewrite pass adds its kernels)."""
        gv = self.bb.add_func(func.without_attr("global_symbol"), f"fxq_{kind}")
        return self.bb.emit(relax.call_tir(gv, args, relax.TensorType((self.batch,) + tuple(shape), dtype)))

    def transformer(self, op: Op) -> relax.Expr:
        """The transformer kinds: one :mod:`.transformer_kernels` kernel each."""
        from fxquant.backends.cpu import transformer_kernels as tk
        from fxquant.fixed_point import (LAYERNORM_FRAC_BITS, SOFTMAX_EXP_BITS, softmax_exp_table,
                                         softmax_recip_bits)

        x, out_shape = op.inputs[0], tuple(self.graph.value(op.output).shape)
        shape, fl = tuple(self.graph.value(x).shape), self.fmt(x).frac_bits
        dtype = storage_dtype(self.graph, x)
        if op.kind == "matmul":
            a, b = op.inputs
            rq = self.rq(self.fmt(a).frac_bits + self.fmt(b).frac_bits, op)
            b_t = self.swapped_last_axes(b)  # Q K^T: read K as it was written, no transpose kernel
            b_in = b if b_t is None else b_t
            sa, sb = tuple(self.graph.value(a).shape), tuple(self.graph.value(b_in).shape)
            return self.call(tk.matmul(sa, sb, rq, storage_dtype(self.graph, a), storage_dtype(self.graph, b_in),
                                       b_transposed=b_t is not None), "matmul", [self.env[a], self.env[b_in]],
                             out_shape)
        if op.kind == "embedding":
            assert op.weight is not None and op.weight_fmt is not None
            rq = self.rq(op.weight_fmt.frac_bits, op)
            rows, dim = op.weight.shape
            return self.call(tk.embedding(shape, int(rows), int(dim), rq, dtype), "embedding",
                             [self.env[x], relax.const(np.asarray(op.weight, np.int32).reshape(-1))], out_shape)
        if op.kind == "constant":  # the stored integers copied into every sample
            assert op.weight is not None
            dtype = storage_dtype(self.graph, op.output)
            return self.call(tk.constant_broadcast(out_shape, dtype), "constant",
                             [relax.const(np.asarray(op.weight).reshape(-1).astype(dtype))], out_shape, dtype)
        if op.kind == "slice":
            axis = int(op.attrs["dim"]) - 1
            if "index" in op.attrs:
                start, count, step = int(op.attrs["index"]), 1, 1
            else:
                start, step = int(op.attrs["start"]), int(op.attrs.get("step", 1))
                count = len(range(start, int(op.attrs["stop"]), step))
            return self.call(tk.slice_copy(shape, out_shape, axis, start, count, step, dtype), "slice",
                             [self.env[x]], out_shape, storage_dtype(self.graph, op.output))
        if op.kind == "softmax":
            e_bits = int(op.attrs.get("exp_bits", SOFTMAX_EXP_BITS))
            table = softmax_exp_table(self.fmt(x), e_bits)
            mask = tuple(self.graph.value(op.inputs[1]).shape) if len(op.inputs) > 1 else None
            out_dtype = storage_dtype(self.graph, op.output)
            func = tk.softmax(shape, mask, bool(op.attrs.get("causal", False)), self.fmt(x).qmin, int(table.size),
                              e_bits, softmax_recip_bits(op.out_fmt, e_bits), op.out_fmt.bits, out_dtype)
            args = [self.env[x]] + ([self.env[op.inputs[1]]] if mask is not None else [])
            return self.call(func, "softmax", args + [relax.const(table.astype(np.int32))], out_shape, out_dtype)
        if op.kind == "layernorm":
            assert op.weight is not None and op.weight_fmt is not None
            n = shape[-1]
            beta = np.zeros(n, np.int64) if op.bias is None else np.asarray(op.bias, np.int64)
            rshift = op.weight_fmt.frac_bits + LAYERNORM_FRAC_BITS - op.out_fmt.frac_bits
            func = tk.layernorm(shape, int(op.attrs["eps"]), int(rshift), op.out_fmt.bits,
                                bool(op.attrs.get("relu", False)),
                                tk.layernorm_acc_bound(np.asarray(op.weight, np.int64), beta))
            return self.call(func, "layernorm", [self.env[x], relax.const(np.asarray(op.weight, np.int32)),
                                                 relax.const(beta.astype(np.int32))], out_shape)
        raise UnsupportedOpError(f"op {op.name!r}: kind {op.kind!r} has no fxquant CPU kernel")

    def swapped_last_axes(self, name: str) -> str | None:
        """The input of the ``transpose`` that wrote ``name`` when it only swaps the last two axes
        (the integers are the same: a transpose never changes values), else ``None``."""
        op = next((o for o in self.graph.ops if o.output == name), None)
        if op is None or op.kind != "transpose":
            return None
        perm = tuple(int(p) for p in op.attrs["perm"])
        rank = len(perm)
        if rank < 2 or perm != tuple(range(rank - 2)) + (rank - 1, rank - 2):
            return None
        return op.inputs[0]

    def rq(self, acc_frac_bits: int, op: Op) -> Requant:
        return Requant(op.out_fmt.frac_bits - acc_frac_bits, op.out_fmt.bits, bool(op.attrs.get("relu", False)))

    def direct(self, op: Op) -> relax.Expr:
        """The ops with no QDQ form the rewrite pass reads: one fxquant kernel each, emitted here."""
        from fxquant.backends.cpu import vision_kernels as vk

        x, out_shape = op.inputs[0], tuple(self.graph.value(op.output).shape)
        shape, fl = tuple(self.graph.value(x).shape), self.fmt(x).frac_bits
        if op.kind == "cat":  # k inputs: k - 1 two-input kernels, the running result already in out_fmt
            axis = (op.attrs.get("dim", 1) % (len(shape) + 1)) - 1
            keep = Requant(0, op.out_fmt.bits, bool(op.attrs.get("relu", False)))
            cur, cur_shape, left = self.env[x], shape, self.rq(fl, op)
            for name in op.inputs[1:]:
                other = tuple(self.graph.value(name).shape)
                new_shape = cur_shape[:axis] + (cur_shape[axis] + other[axis],) + cur_shape[axis + 1:]
                cur = self.call(vk.concat2(cur_shape, other, axis, left, self.rq(self.fmt(name).frac_bits, op)),
                                "cat", [cur, self.env[name]], new_shape)
                cur_shape, left = new_shape, keep
            if len(op.inputs) == 1:
                return self.call(vk.clamp(shape, left, None, None), "requantize", [cur], out_shape)
            return cur
        if op.kind == "clamp":
            rq = Requant(op.out_fmt.frac_bits - fl, op.out_fmt.bits, False)
            return self.call(vk.clamp(shape, rq, op.attrs.get("lo"), op.attrs.get("hi")), "clamp", [self.env[x]],
                             out_shape)
        if op.kind == "lut":
            table = np.asarray(op.attrs["table"], np.int64)
            return self.call(vk.lut(shape, int(table.size), self.fmt(x).qmin), "lut",
                             [self.env[x], relax.const(table.astype(np.int8))], out_shape)
        if op.kind == "mul":
            a, b = op.inputs
            sa, sb = tuple(self.graph.value(a).shape), tuple(self.graph.value(b).shape)
            rq = self.rq(self.fmt(a).frac_bits + self.fmt(b).frac_bits, op)
            return self.call(vk.mul(sa, sb, rq), "mul", [self.env[a], self.env[b]], out_shape)
        if op.kind == "transpose":
            perm = tuple(int(p) for p in op.attrs["perm"])
            return self.call(vk.transpose(shape, perm), "transpose", [self.env[x]], out_shape)
        if op.kind == "upsample_nearest":
            scale = tuple(int(v) for v in op.attrs["scale"])
            return self.call(vk.upsample_nearest(shape, scale), "upsample", [self.env[x]], out_shape)
        if op.kind in ("maxpool2d", "avgpool2d"):
            kernel = tuple(op.attrs["kernel"])
            ws = PoolShape(*shape, kernel=kernel, stride=tuple(op.attrs.get("stride", kernel)),
                           padding=tuple(op.attrs.get("padding", (0, 0))),
                           dilation=tuple(op.attrs.get("dilation", (1, 1))),
                           ceil_mode=bool(op.attrs.get("ceil_mode", False)))
            if op.kind == "maxpool2d":
                return self.call(vk.window_pool(ws, None), "max_pool2d", [self.env[x]], out_shape)
            divisors = avg_divisors(op, shape[1], shape[2]).reshape(-1)
            recips = [reciprocal(int(d)) for d in divisors]
            mult = np.array([m for m, _ in recips], np.int32)
            rshift = np.array([fl + s - op.out_fmt.frac_bits for _, s in recips], np.int32)
            return self.call(vk.window_pool(ws, (op.out_fmt.bits, bool(op.attrs.get("relu", False)))), "avg_pool2d",
                             [self.env[x], relax.const(mult), relax.const(rshift)], out_shape)
        if op.kind == "conv_transpose2d":
            assert op.weight is not None and op.weight_fmt is not None
            groups = int(op.attrs.get("groups", 1))
            cs = vk.ConvTransposeShape(shape[0], shape[1], shape[2], out_shape[0], groups,
                                       tuple(op.weight.shape[2:]), tuple(op.attrs.get("stride", (1, 1))),
                                       tuple(op.attrs.get("padding", (0, 0))),
                                       tuple(op.attrs.get("output_padding", (0, 0))),
                                       tuple(op.attrs.get("dilation", (1, 1))))
            bias = np.zeros(out_shape[0], np.int64) if op.bias is None else np.asarray(op.bias, np.int64)
            rq = self.rq(fl + op.weight_fmt.frac_bits, op)
            return self.call(vk.conv_transpose2d(cs, rq), "conv_transpose2d",
                             [self.env[x], relax.const(op.weight.astype(np.int32)), relax.const(bias.astype(np.int32))],
                             out_shape)
        raise UnsupportedOpError(f"op {op.name!r}: kind {op.kind!r} has no fxquant CPU kernel")


def _is_patch_conv(op: Op, in_shape: tuple[int, ...]) -> bool:
    """A conv of non-overlapping windows tiling the input (stride = kernel > 1, no padding, no
    dilation, no groups): a ViT patch embedding, lowered as ``patches`` + linear."""
    assert op.weight is not None
    kernel = tuple(int(k) for k in op.weight.shape[2:])
    return (len(in_shape) == 3 and op.attrs.get("groups", 1) == 1 and kernel != (1, 1)
            and tuple(op.attrs.get("stride", (1, 1))) == kernel
            and tuple(op.attrs.get("padding", (0, 0))) == (0, 0)
            and tuple(op.attrs.get("dilation", (1, 1))) == (1, 1)
            and in_shape[1] % kernel[0] == 0 and in_shape[2] % kernel[1] == 0)


def graph_to_relax(graph: IntegerGraph) -> "tvm.IRModule":  # noqa: F821
    """The QDQ-form Relax module ``main(*float32 inputs) -> int8 output integers`` of ``graph``
    (checked by ``CpuTarget.check`` first)."""
    batch = tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    ids = id_inputs(graph)
    params = [relax.Var(v.name, relax.TensorType((batch,) + tuple(v.shape), IDS_DTYPE if v.name in ids else "float32"))
              for v in graph.inputs]
    with bb.function("main", params):
        with bb.dataflow():
            emitter = _Emitter(graph, bb, batch)
            for v, p in zip(graph.inputs, params):
                emitter.env[v.name] = p if v.name in ids else emitter.q(p, Op(v.name, "requantize", (v.name,), v.name,
                                                                              v.fmt))
            for op in graph.ops:
                emitter.env[op.output] = emitter.emit(op)
            outs = [emitter.env[name] for name in graph.outputs]
            result = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(result)
    return bb.get()

