"""Module pass: rewrite quantized conv / linear / add / pool / requantize patterns into ``call_tir``
of the fxquant CPU kernels (:mod:`.kernels`).

Must run before it: nothing but the import -- the input is QDQ-form Relax, as
``relax.frontend.onnx.from_onnx(model, keep_params_in_input=False)`` produces it from a QDQ ONNX
model (or :func:`.relax_builder.graph_to_relax` from an IntegerGraph): power-of-two scales, zero
point 0, int8 activations, constant int8 weights and int32 biases. Run it before ``LegalizeOps``
(what it leaves unmatched would be legalized into slow default loops; :func:`unrewritten_ops`
lists them). Each match becomes one opaque kernel, so ``FuseOps`` leaves it alone::

    Q([relu](conv2d(DQ(x, 2^-a), DQ(W, 2^-w)) + reshape(DQ(b))))   (+ clip to BW < 8)
      -> call_tir(fxq_conv2d_i, [x, pack(W), b], int8)

The integer semantics come from the scales: ``FL = -log2(scale)``; the kernel requantizes the
accumulator at ``FL_x + FL_w`` to the output ``<BW, FL_y>`` (``BW`` from the clip, else 8) with the
shift epilogue, which is what ``R.quantize`` of the exact float sum means (round half to even).
Weights of at most 4 (2) significant bits use the packed int4 (int2) linear kernel; a VNNI target
uses ``vpdpbusd`` for linear layers of 8-bit weights; weights of 9..16 bits (int16 constants) take
the ``vpmaddwd`` kernels in int16 (:func:`.packing.linear_kind`). Each kernel's worst-case
accumulator (:mod:`.packing` bounds, :mod:`fxquant.legality` rules) must fit int32: the same rule
``CpuTarget.check`` applies to an IntegerGraph before the build, checked here again for the ONNX
entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple, rewrite_call, wildcard

from fxquant import legality
from fxquant.backends.cpu import kernels, packing, vision_kernels
from fxquant.backends.tvm_epilogue import Requant, Residual
from fxquant.backends.cpu.features import LlvmCpu
from fxquant.errors import UnsupportedOpError

_KEEP_OPS = ("relax.call_tir", "relax.call_pure_packed")


def _const_value(expr: relax.Expr) -> np.ndarray:
    return expr.value.numpy()


def _frac_bits(scale_expr: relax.Expr, what: str) -> int:
    scale = float(_const_value(scale_expr))
    mantissa, exponent = math.frexp(scale)
    if mantissa != 0.5:
        raise UnsupportedOpError(f"{what}: scale {scale!r} is not a power of two",
                                 "fxquant CPU kernels implement scales 2^-FL only")
    return 1 - exponent


def _check_zero_point(zp_expr: relax.Expr, what: str) -> None:
    if np.any(_const_value(zp_expr) != 0):
        raise UnsupportedOpError(f"{what}: non-zero zero point", "fxquant formats are symmetric (zero point 0)")


def _shape(expr: relax.Expr) -> list[Any]:
    return list(expr.ty.shape.values)


def _static(dims: list[Any]) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


class _Dq:
    """``DQ(value, scale, zp)``: the pattern and the reading of its match."""

    def __init__(self, value: Any) -> None:
        self.value, self.scale, self.zp = value, is_const(), is_const()
        self.pattern = is_op("relax.dequantize")(value, self.scale, self.zp)

    def frac_bits(self, m: dict, what: str) -> int:
        _check_zero_point(m[self.zp], what)
        return _frac_bits(m[self.scale], what)


class _Out:
    """``[relu](body)`` -> ``Q`` -> optional ``clip``: output spec and ReLU of a match."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.relu = is_op("relax.nn.relu")(body)
        self.scale, self.zp = is_const(), is_const()
        self.quantize = is_op("relax.quantize")(self.relu | body, self.scale, self.zp)
        self.lo, self.hi = wildcard(), wildcard()
        self.clip = is_op("relax.clip")(self.quantize, self.lo, self.hi)
        self.pattern = self.clip | self.quantize

    def requant(self, m: dict, frac_bits_in: int, what: str) -> Requant:
        _check_zero_point(m[self.zp], what)
        bits = 8
        if self.clip in m:
            lo, hi = int(m[self.lo].value), int(m[self.hi].value)
            bits = int(math.log2(hi + 1)) + 1
            if lo != -(1 << (bits - 1)) or hi != (1 << (bits - 1)) - 1:
                raise UnsupportedOpError(f"{what}: clip [{lo}, {hi}] is not a signed bit-width range")
        return Requant(_frac_bits(m[self.scale], what) - frac_bits_in, bits, self.relu in m)


def _weights_and_bias(m: Any, dx: Any, dw: Any, db: Any, what: str) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A matched layer's integer weights, bias (zeros when absent) and the input/weight FLs."""
    w = _const_value(m[dw.value]).astype(np.int64)
    fl_x, fl_w = dx.frac_bits(m, what), dw.frac_bits(m, what)
    bias = np.zeros(w.shape[0], np.int64)
    if db.pattern in m:
        if db.frac_bits(m, what) != fl_x + fl_w:
            raise UnsupportedOpError(f"{what}: bias scale is not 2^-(FL_w + FL_in)")
        bias = _const_value(m[db.value]).astype(np.int64)
    return w, bias, fl_x, fl_w


@tvm.transform.module_pass(opt_level=0, name="RewriteQuantizedOps")
class RewriteQuantizedOps:
    """Replace the quantized patterns of every Relax function by ``call_tir`` of fxquant kernels."""

    def __init__(self, target: LlvmCpu) -> None:
        self.target = target

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        bb = relax.BlockBuilder(mod)

        def add_kernel(func: Any, kind: str) -> relax.GlobalVar:
            # no global_symbol: identical kernels (repeated layers) are added once, and
            # AttachGlobalSymbol names each after its GlobalVar
            return bb.add_func(func.without_attr("global_symbol"), f"fxq_{kind}")

        rules = self._rules(add_kernel)
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function):
                continue
            for pattern, rewriter in rules:
                func = rewrite_call(pattern, rewriter, func)
            func = rewrite_call(*_reshape_rule(), func)
            bb.update_func(gv, func)
        return bb.get()

    def _rules(self, add_kernel: Callable[[Any, str], relax.GlobalVar]) -> list[tuple[Any, Callable]]:
        vnni = self.target.vnni

        # conv2d (+ bias) (+ relu) -> Q (-> clip); optionally followed by a residual add.
        def conv_pattern() -> tuple[_Dq, _Dq, Any, Any, Any, _Out]:
            dx, dw = _Dq(wildcard()), _Dq(is_const())
            conv = is_op("relax.nn.conv2d")(dx.pattern, dw.pattern)
            db = _Dq(is_const())
            with_bias = is_op("relax.add")(conv, is_op("relax.reshape")(db.pattern, wildcard()))
            return dx, dw, db, conv, with_bias, _Out(with_bias | conv)

        def conv_call(m: dict, parts: tuple, residual: tuple | None) -> relax.Expr:
            dx, dw, db, conv, _, out = parts
            call = m[conv]
            attrs = call.attrs
            what = "conv2d"
            groups = int(attrs.groups)
            if str(attrs.data_layout) != "NCHW" or str(attrs.kernel_layout) != "OIHW":
                raise UnsupportedOpError(f"{what}: layout {attrs.data_layout}/{attrs.kernel_layout}",
                                         "the CPU backend supports NCHW/OIHW convolutions")
            pad = [int(p) for p in attrs.padding]
            if pad[0] != pad[2] or pad[1] != pad[3]:
                raise UnsupportedOpError(f"{what}: asymmetric padding {pad}")
            x = m[dx.value]
            w, bias, fl_x, fl_w = _weights_and_bias(m, dx, dw, db, what)
            rq = out.requant(m, fl_x + fl_w, what)
            legality.require_fits(packing.conv_bound(w, bias), what)
            n, c, h, wd = _shape(x)
            res_args, res_spec = ([residual[0]], residual[1]) if residual is not None else ([], None)
            if groups != 1:  # grouped / depthwise: the direct kernel, no zero weights
                gshape = vision_kernels.GroupConvShape(int(c), int(h), int(wd), int(w.shape[0]), groups,
                                                       _static(w.shape[2:]), _static(attrs.strides), (pad[0], pad[1]),
                                                       _static(attrs.dilation))
                gv = add_kernel(vision_kernels.grouped_conv2d(gshape, rq, res_spec), "gconv2d")
                args = [x, relax.const(packing.pack_tap_pairs(w)), relax.const(bias.astype(np.int32))] + res_args
                return relax.call_tir(gv, args, relax.TensorType(_shape(m[conv]), "int8"))
            shape = kernels.ConvShape(int(c), int(h), int(wd), int(w.shape[0]), _static(w.shape[2:]),
                                      _static(attrs.strides), (pad[0], pad[1]), _static(attrs.dilation))
            ro, _ = shape.block
            args = [x, relax.const(packing.pack_conv_weight(w, ro)), relax.const(bias.astype(np.int32))]
            res_spec = None
            if residual is not None:
                args.append(residual[0])
                res_spec = residual[1]
            gv = add_kernel(kernels.conv2d(shape, rq, res_spec), "conv2d")
            return relax.call_tir(gv, args, relax.TensorType(_shape(m[conv]), "int8"))

        # residual: Q([relu](DQ(conv_q) + DQ(r))) with conv_q a quantized conv
        def residual_rule(conv_first: bool) -> tuple[Any, Callable]:
            parts = conv_pattern()
            conv_out = parts[-1]
            d_conv, d_res = _Dq(conv_out.pattern), _Dq(wildcard())
            pair = (d_conv.pattern, d_res.pattern) if conv_first else (d_res.pattern, d_conv.pattern)
            out = _Out(is_op("relax.add")(*pair))

            def rewrite(expr: relax.Expr, m: dict) -> relax.Expr:
                fl_y, fl_r = d_conv.frac_bits(m, "add"), d_res.frac_bits(m, "add")
                if _frac_bits(m[conv_out.scale], "conv2d") != fl_y:
                    raise UnsupportedOpError("add: the conv output is re-read at another scale")
                fl = max(fl_y, fl_r)
                spec = Residual(fl - fl_y, fl - fl_r, out.requant(m, fl, "add"))
                legality.require_fits(packing.add_bound((spec.left_y, spec.left_r)), "add")
                return conv_call(m, parts, (m[d_res.value], spec))

            return out.pattern, rewrite

        def conv_rule() -> tuple[Any, Callable]:
            parts = conv_pattern()
            return parts[-1].pattern, lambda expr, m: conv_call(m, parts, None)

        def linear_rule() -> tuple[Any, Callable]:
            dx, dw, db = _Dq(wildcard()), _Dq(is_const()), _Dq(is_const())
            flat = is_op("relax.reshape")(dx.pattern, wildcard())
            mm = is_op("relax.matmul")(flat | dx.pattern, is_op("relax.permute_dims")(dw.pattern))
            out = _Out(is_op("relax.add")(mm, db.pattern) | mm)

            def rewrite(expr: relax.Expr, m: dict) -> relax.Expr:
                what = "linear"
                x = m[dx.value]
                if flat in m:
                    x = relax.op.reshape(x, _shape(m[flat]))
                if len(_shape(x)) != 2:
                    raise UnsupportedOpError(f"{what}: input of rank {len(_shape(x))}",
                                             "use a 2-D [batch, features] input")
                w, bias, fl_x, fl_w = _weights_and_bias(m, dx, dw, db, what)
                rq = out.requant(m, fl_x + fl_w, what)
                o, k = w.shape
                kind = packing.linear_kind(w, vnni)
                legality.require_fits(packing.linear_bound(kind, w, bias), what)
                if kind in ("int2", "int4"):
                    packed = packing.pack_linear_weight_lowbit(w, 2 if kind == "int2" else 4)
                    b = packing.pad_bias(bias, o, packing.LINEAR_LANES)
                elif kind == "vnni":
                    packed = packing.pack_linear_weight_vnni(w)
                    b = packing.pad_bias(bias - 128 * w.sum(1), o, packing.VNNI_LANES)
                else:
                    packed = packing.pack_linear_weight(w, kind)
                    b = packing.pad_bias(bias, o, packing.LINEAR_LANES)
                gv = add_kernel(kernels.linear(k, o, rq, kind), f"linear_{kind}")
                return relax.call_tir(gv, [x, relax.const(packed), relax.const(b)],
                                      relax.TensorType(_shape(expr), "int8"))

            return out.pattern, rewrite

        def add_rule() -> tuple[Any, Callable]:
            da, db_ = _Dq(wildcard()), _Dq(wildcard())
            out = _Out(is_op("relax.add")(da.pattern, db_.pattern))

            def rewrite(expr: relax.Expr, m: dict) -> relax.Expr:
                fl_a, fl_b = da.frac_bits(m, "add"), db_.frac_bits(m, "add")
                fl = max(fl_a, fl_b)
                rq = out.requant(m, fl, "add")
                lefts = (fl - fl_a, fl - fl_b)
                legality.require_fits(packing.add_bound(lefts), "add")
                a, b = m[da.value], m[db_.value]
                if [str(d) for d in _shape(a)] != [str(d) for d in _shape(b)]:
                    raise UnsupportedOpError("add: broadcasting add", "inputs must have the same shape")
                gv = add_kernel(kernels.eltwise(_static(_shape(a)[1:]), lefts, rq), "add")
                return relax.call_tir(gv, [a, b], relax.TensorType(_shape(expr), "int8"))

            return out.pattern, rewrite

        def pool_rule(op_name: str) -> tuple[Any, Callable]:
            dx = _Dq(wildcard())
            pool = is_op(op_name)(dx.pattern)
            out = _Out(pool)

            def rewrite(expr: relax.Expr, m: dict) -> relax.Expr:
                what = op_name.split(".")[-1]
                attrs = m[pool].attrs
                pad = [int(p) for p in attrs.padding]
                if attrs.ceil_mode or pad[0] != pad[2] or pad[1] != pad[3] or any(int(d) != 1 for d in attrs.dilation):
                    raise UnsupportedOpError(f"{what}: ceil_mode/dilation/asymmetric padding")
                x = m[dx.value]
                fl_x = dx.frac_bits(m, what)
                n, c, h, w = _shape(x)
                kernel = _static(attrs.pool_size)
                shape = kernels.PoolShape(int(c), int(h), int(w), kernel, _static(attrs.strides), (pad[0], pad[1]))
                if op_name == "relax.nn.max_pool2d":
                    rq = out.requant(m, fl_x, what)
                    if rq.shift != 0 or rq.relu:
                        raise UnsupportedOpError(f"{what}: output format differs from the input format")
                    spec = None
                else:
                    p = legality.require_avg_window(kernel, (pad[0], pad[1]), what)
                    spec = out.requant(m, fl_x + p, what)
                gv = add_kernel(kernels.pool2d(shape, spec), what)
                return relax.call_tir(gv, [x], relax.TensorType(_shape(expr), "int8"))

            return out.pattern, rewrite

        def requantize_rule() -> tuple[Any, Callable]:
            dx = _Dq(wildcard())
            out = _Out(dx.pattern)

            def rewrite(expr: relax.Expr, m: dict) -> relax.Expr:
                x = m[dx.value]
                rq = out.requant(m, dx.frac_bits(m, "requantize"), "requantize")
                gv = add_kernel(kernels.eltwise(_static(_shape(x)[1:]), (0,), rq), "requantize")
                return relax.call_tir(gv, [x], relax.TensorType(_shape(expr), "int8"))

            return out.pattern, rewrite

        def int8_maxpool_rule() -> tuple[Any, Callable]:
            x = wildcard()
            pool = is_op("relax.nn.max_pool2d")(x)

            def rewrite(expr: relax.Expr, m: dict) -> relax.Expr:
                if str(expr.ty.dtype) != "int8":
                    return expr
                attrs = m[pool].attrs
                pad = [int(p) for p in attrs.padding]
                if attrs.ceil_mode or pad[0] != pad[2] or pad[1] != pad[3] or any(int(d) != 1 for d in attrs.dilation):
                    raise UnsupportedOpError("max_pool2d: ceil_mode/dilation/asymmetric padding")
                _, c, h, w = _shape(m[x])
                shape = kernels.PoolShape(int(c), int(h), int(w), _static(attrs.pool_size), _static(attrs.strides),
                                          (pad[0], pad[1]))
                gv = add_kernel(kernels.pool2d(shape, None), "max_pool2d")
                return relax.call_tir(gv, [m[x]], relax.TensorType(_shape(expr), "int8"))

            return pool, rewrite

        def integer_clamp_rule() -> tuple[Any, Callable]:
            # the ONNX importer's legalized integer Clip: minimum(maximum(x, lo), hi)
            x, lo, hi = wildcard(), is_const(), is_const()
            inner = is_op("relax.call_tir")(wildcard(), is_tuple([x, lo]))
            outer = is_op("relax.call_tir")(wildcard(), is_tuple([inner, hi]))

            def rewrite(expr: relax.Expr, m: dict) -> relax.Expr:
                if not (isinstance(m[inner], relax.Call) and isinstance(expr, relax.Call)):  # kernel outputs bound to vars
                    return expr
                names = (m[inner].args[0].name_hint, expr.args[0].name_hint)
                if not (names[0].startswith("maximum") and names[1].startswith("minimum")):
                    return expr
                low, high = int(_const_value(m[lo])), int(_const_value(m[hi]))
                bits = int(math.log2(high + 1)) + 1
                if high != (1 << (bits - 1)) - 1 or low not in (0, -(1 << (bits - 1))):
                    raise UnsupportedOpError(f"clip [{low}, {high}] is not a (ReLU'd) signed bit-width range")
                gv = add_kernel(kernels.eltwise(_static(_shape(m[x])[1:]), (0,), Requant(0, bits, low == 0)), "clip")
                return relax.call_tir(gv, [m[x]], relax.TensorType(_shape(expr), "int8"))

            return outer, rewrite

        def input_quantize_rule() -> tuple[Any, Callable]:
            out = _Out(wildcard())

            def rewrite(expr: relax.Expr, m: dict) -> relax.Expr:
                x = m[out.body]
                if str(x.ty.dtype) != "float32" or out.relu in m:
                    return expr
                rq = out.requant(m, 0, "quantize")
                gv = add_kernel(kernels.quantize_input(_static(_shape(x)[1:]), rq.shift, rq.bits), "quantize")
                return relax.call_tir(gv, [x], relax.TensorType(_shape(expr), "int8"))

            return out.pattern, rewrite

        def output_dequantize_rule() -> tuple[Any, Callable]:
            dx = _Dq(wildcard())

            def rewrite(expr: relax.Expr, m: dict) -> relax.Expr:
                x = m[dx.value]
                gv = add_kernel(kernels.dequantize_output(_static(_shape(x)[1:]), dx.frac_bits(m, "dequantize")),
                                "dequantize")
                return relax.call_tir(gv, [x], relax.TensorType(_shape(expr), "float32"))

            return dx.pattern, rewrite

        return [residual_rule(True), residual_rule(False), conv_rule(), linear_rule(), add_rule(),
                pool_rule("relax.nn.max_pool2d"), pool_rule("relax.nn.avg_pool2d"), requantize_rule(),
                int8_maxpool_rule(), integer_clamp_rule(), input_quantize_rule(), output_dequantize_rule()]


def _reshape_rule() -> tuple[Any, Callable]:
    """int8 ``reshape`` (flatten) -> the VM's zero-copy ``vm.builtin.reshape``."""
    x, shape = wildcard(), wildcard()
    pattern = is_op("relax.reshape")(x, shape)

    def rewrite(expr: relax.Expr, m: dict) -> relax.Expr:
        if str(expr.ty.dtype) != "int8":
            return expr
        return relax.op.call_pure_packed("vm.builtin.reshape", m[x], m[shape], ty_args=[expr.ty])

    return pattern, rewrite


def unrewritten_ops(mod: tvm.IRModule) -> list[str]:
    """Names of the Relax ops left in ``mod``'s functions other than ``call_tir`` and builtin reshapes."""
    found: list[str] = []

    def visit(expr: relax.Expr) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name not in _KEEP_OPS:
            found.append(expr.op.name)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return sorted(set(found))
