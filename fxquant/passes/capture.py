"""Capture an ``nn.Module`` as a ``torch.fx.GraphModule`` (first step of every pipeline).

``torch.fx`` first (with the user's source lines recorded in ``node.meta["stack_trace"]``): it
keeps the module hierarchy (``call_module`` nodes) and works without example inputs. Models it
cannot trace (Python control flow on tensor shapes, for instance) fall back to ``torch.export``
with the example inputs, which specializes shape-dependent branches. **Hugging Face models**
(any ``transformers`` module inside) go to torch.export directly: ``transformers.utils.fx`` no
longer exists in transformers 5, and their forward's Python checks are what export evaluates
faithfully. If both routes fail, :class:`~fxquant.errors.CaptureError` names the offending line of
the user's code.

**Dynamic sizes.** torch.export runs with a dynamic batch dimension (``Dim.AUTO``; a batch of 1 is
traced at 2, export's 0/1 rule) and, for integer inputs of two or more dimensions (token ids,
masks), a dynamic sequence dimension. Training, calibration, evaluation and BitOPs counting all
feed other batch sizes than ``example_inputs()``, so with example inputs the captured graph is
run at the example batch and at batch + 1: a graph that fails at the second (a model that fixes
its batch, ``x.view(4, 16)``) is a :class:`CaptureError` naming the node and the source line,
never a crash in the first training step.

**Transformer constructs** (both routes): ``nn.MultiheadAttention`` and
``F.scaled_dot_product_attention`` become explicit linear / matmul / scale / mask / softmax /
dropout / matmul ops (:mod:`fxquant.passes.decompose_attention`); Hugging Face ``Conv1D``
(``addmm`` on a ``view(-1, C)``) becomes ``linear(x, aten.t(W), b)`` on the unmerged input
(:func:`_conv1d_as_linear`); and constant shape arithmetic is folded, only the batch (and
sequence) sizes staying symbolic as ``aten.sym_size.int`` (:mod:`fxquant.passes.fold_shapes`).

**The export graph is made to train and evaluate like the model.** Export records one mode (it
captures in training mode): BatchNorm as ``aten.batch_norm(training=True)`` plus the
``num_batches_tracked.add_(1)`` bookkeeping, dropout as ``aten.dropout(train=True)``.
Both are put back as the model's own modules::

    add_(bn.num_batches_tracked, 1); batch_norm(x, bn.weight, …, True, …)   →   call_module bn(x)
    dropout(x, 0.5, True)                                                  →   call_module drop(x)

so ``gm.train()`` / ``gm.eval()`` switch batch statistics / running statistics and dropout as in
eager mode, :class:`FoldBatchNorm` folds the BN modules, and quantizers land where the fx path puts
them. Other ``if self.training:`` branches stay specialized to training (documented limitation).
On the fx path, ``torchvision.ops.StochasticDepth`` stays a module (a leaf): it drops rows in
training and is the identity in eval, and the lowering removes it like dropout; an
``F.dropout(x, p, training=True)`` call (the explicit attention's) becomes an ``nn.Dropout`` too.
In-place adds on activations (``y += z``) become out-of-place adds in both paths, so a quantizer
output shared by several consumers is never overwritten by one of them.
"""

from __future__ import annotations

import contextlib
import io
import operator
import re
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.errors import CaptureError
from fxquant.passes.decompose_attention import (SDPA_TARGETS, SHAPES_RECORDED, decompose_sdpa,
                                                explicit_attention_modules, mha_call_hints)
from fxquant.passes.eval_probe import eval_probe
from fxquant.passes.fold_shapes import fold_shapes
from fxquant.passes.op_kinds import is_stochastic_depth, module_path

CAPTURED_BY = "fxquant_captured_by"
_aten = torch.ops.aten
_BN_OPS = frozenset({_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default})
_ASSERT_OPS = frozenset({_aten._assert_scalar.default, _aten.sym_constrain_range_for_size.default,
                         _aten._assert_tensor_metadata.default, _aten.sym_constrain_range.default})


def _user_frame(exc: BaseException) -> str | None:
    """``file:line: code`` of the innermost traceback frame outside torch and fxquant."""
    best = None
    for frame in traceback.extract_tb(exc.__traceback__):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or "/fxquant/" in path or path.startswith("<"):
            continue
        best = f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return best


class _Tracer(fx.Tracer):
    """fx's tracer, keeping ``torchvision.ops.StochasticDepth`` a module: traced through, its
    ``if not self.training`` would be frozen to the mode at capture (a random drop in eval)."""

    def __init__(self, trace_attention: bool = False) -> None:
        super().__init__()
        self.trace_attention = trace_attention

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.trace_attention and isinstance(m, nn.MultiheadAttention):
            return False  # its forward is explicit_multihead_attention during the trace
        return is_stochastic_depth(m) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module, trace_attention: bool = False) -> fx.GraphModule:
    tracer = _Tracer(trace_attention)
    tracer.record_stack_traces = True
    graph = tracer.trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _token_like(x: Any) -> bool:
    """Integer inputs of two or more dimensions (token ids, attention masks): dim 1 is a sequence."""
    return isinstance(x, torch.Tensor) and x.dim() >= 2 and not x.is_floating_point()


def _dynamic_dims(x: Any) -> list[int]:
    """The dimensions of an example input that are exported dynamic: the batch, and the sequence
    of token-like inputs."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return []
    return [0, 1] if _token_like(x) and x.shape[1] > 1 else [0]


def _export(model: nn.Module, example_inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension (and sequence dimension of token inputs).

    A batch of 1 would be specialized (export's 0/1 rule): the example is traced at batch 2.
    Where the model itself fixes the batch size (``x.view(4, -1)``, ``torch.zeros(4, …)``), the
    capture would crash at every other batch size in training: that is a :class:`CaptureError`
    naming the line (read from export's constraint violation with a named batch ``Dim``).
    """
    from torch.export import Dim

    def batched(x: Any) -> Any:
        return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x

    tensors = tuple(batched(x) for x in example_inputs)
    dynamic = tuple({d: Dim.AUTO for d in _dynamic_dims(x)} or None for x in tensors)
    try:
        exported = torch.export.export(model, tensors, dynamic_shapes=dynamic, strict=False)
    except Exception as dynamic_error:  # noqa: BLE001
        try:
            torch.export.export(model, tuple(example_inputs), strict=False)
        except Exception:  # noqa: BLE001 - the model does not export at all: report the dynamic attempt
            raise dynamic_error from None
        raise _batch_specialized(model, dynamic_error, None) from dynamic_error
    placeholders = [n for n in exported.graph.nodes if n.op == "placeholder"
                    and n.name in exported.graph_signature.user_inputs]
    for x, node in zip(tensors, placeholders):
        val = node.meta.get("val")
        if isinstance(x, torch.Tensor) and x.dim() > 0 and isinstance(val, torch.Tensor) and isinstance(val.shape[0], int):
            named = tuple({0: Dim("batch")} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in tensors)
            try:
                torch.export.export(model, tensors, dynamic_shapes=named, strict=False)
                cause: BaseException | None = None
            except Exception as exc:  # noqa: BLE001 - the constraint violation names the line
                cause = exc
            raise _batch_specialized(model, cause, int(val.shape[0]))
    return exported


_FRAME_LINE = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+)[^\n]*\n\s*(?P<code>[^\n]*)')


def _batch_specialized(model: nn.Module, exc: BaseException | None, size: int | None) -> CaptureError:
    """The :class:`CaptureError` for a model that fixes its batch size, at the user's line."""
    text = str(exc) if exc is not None else ""
    where = None
    for match in _FRAME_LINE.finditer(text):
        path = match["file"].replace("\\", "/")
        if "/torch/" in path or "/fxquant/" in path or path.startswith("<"):
            continue
        where = f"{match['file']}:{match['line']}: {match['code'].strip()}"
    if where is None and exc is not None:
        where = _user_frame(exc)
    hint = "derive sizes from the input (x.size(0), or -1 in view/reshape) instead of constants"
    if size is None:
        first = (text.splitlines() or [type(exc).__name__])[0][:200]
        return CaptureError(f"cannot capture {type(model).__name__}: torch.export fails with a dynamic batch "
                            f"dimension at {where or 'an unknown line'}: {first}", hint)
    return CaptureError(f"cannot capture {type(model).__name__}: its batch dimension is fixed to {size} at "
                        f"{where or 'an unknown line'}; the captured graph would fail at every other batch size", hint)


def _restore_train_eval_modules(gm: fx.GraphModule, model: nn.Module) -> None:
    """Aten BatchNorm/dropout of a training-mode export → the model's modules (module docstring)."""
    graph = gm.graph
    bn_paths: set[str] = set()
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        path = module_path(node)
        try:
            owner = model.get_submodule(path) if path else None
        except AttributeError:
            owner = None
        if node.target in _BN_OPS and isinstance(owner, nn.modules.batchnorm._BatchNorm):
            stats = node.args[3] if len(node.args) > 3 else None
            if not (isinstance(stats, fx.Node) and stats.op == "get_attr" and str(stats.target) == f"{path}.running_mean"):
                continue
            replacement = _call_model_module(gm, owner, path, node)
            bn_paths.add(path)
        elif node.target is _aten.dropout.default:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
            if not train:
                replacement = node.args[0]
            else:
                module = owner if isinstance(owner, nn.Dropout) else nn.Dropout(float(node.args[1]))
                target = path if isinstance(owner, nn.Dropout) else f"_fxq_dropout_{node.name}"
                replacement = _call_model_module(gm, module, target, node)
        else:
            continue
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    for node in list(graph.nodes):  # the BN modules keep their own num_batches_tracked
        if node.op == "call_function" and node.target is _aten.add_.Tensor and not node.users:
            buf = node.args[0]
            if isinstance(buf, fx.Node) and buf.op == "get_attr" and \
                    str(buf.target).rpartition(".")[0] in bn_paths and str(buf.target).endswith(".num_batches_tracked"):
                graph.erase_node(node)


def _call_model_module(gm: fx.GraphModule, module: nn.Module, path: str, node: fx.Node) -> fx.Node:
    parent, _, leaf = path.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    setattr(owner, leaf, module)  # the model's own module: parameters and buffers stay shared
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(path, (node.args[0],))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    return new


def _out_of_place_adds(gm: fx.GraphModule) -> None:
    """``y += z`` on activations → ``y + z``: a quantizer output shared by several consumers must
    not be overwritten by one of them (later reads of ``y`` already use the add's result)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.iadd:
            node.target = operator.add
        elif node.op == "call_function" and node.target is _aten.add_.Tensor and \
                not (isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"):
            node.target = _aten.add.Tensor


def is_hugging_face(model: nn.Module) -> bool:
    """Whether ``model`` contains a Hugging Face ``transformers`` module (captured with torch.export:
    ``transformers.utils.fx`` is gone in transformers 5, and plain fx cannot follow their control flow)."""
    return any(type(m).__module__.startswith("transformers.") for m in model.modules())


def capture(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, or with ``torch.export`` if fx fails (needs example inputs).

    Hugging Face models go to torch.export directly. On both routes attention is decomposed
    (:mod:`fxquant.passes.decompose_attention`), HF ``Conv1D`` becomes a linear
    (:func:`_conv1d_as_linear`) and, with example inputs, constant shape arithmetic is folded
    (:mod:`fxquant.passes.fold_shapes`).
    """
    examples = tuple(example_inputs) if example_inputs is not None else None
    fx_error: Exception | None = None
    gm = None
    if not is_hugging_face(model):
        try:
            gm = _capture_fx(model, examples)
        except CaptureError:
            raise
        except Exception as exc:  # noqa: BLE001 - any tracing failure triggers the fallback
            fx_error = exc
    elif examples is None:
        raise CaptureError(f"{type(model).__name__} is a Hugging Face model: it is captured with torch.export, "
                           "which needs example inputs", "define example_inputs() in model.py (token ids, int64)")
    if gm is None:
        fx_where = _user_frame(fx_error) if fx_error is not None else None
        if examples is None:
            raise CaptureError(f"torch.fx cannot trace {type(model).__name__} at {fx_where}: "
                               f"{str(fx_error).splitlines()[0]}",
                               "define example_inputs() in model.py so torch.export can capture it") from fx_error
        gm = _capture_export(model, examples, fx_where)
    changed = decompose_sdpa(gm)
    changed = _conv1d_as_linear(gm) or changed
    if changed:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    if examples is not None:
        _check_other_batch(model, gm, examples)
        fold_shapes(gm, examples)
    return gm


class _FailingNode(fx.Interpreter):
    """Runs the graph and remembers the node that raised."""

    failed: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            return super().run_node(n)
        except Exception:
            self.failed = self.failed or n
            raise


def _check_other_batch(model: nn.Module, gm: fx.GraphModule, examples: tuple[Any, ...]) -> None:
    """The captured graph must run at another batch size than the example's (training, evaluation
    and BitOPs counting use others): a graph that runs at the example batch and fails at batch + 1
    fixes its batch size somewhere; that is a :class:`CaptureError` naming the node and its line."""
    from fxquant.passes.op_kinds import describe

    grown = tuple(torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x for x in examples)
    with eval_probe(gm), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            fx.Interpreter(gm).run(*examples)
        except Exception:  # noqa: BLE001 - not fitting the examples is reported where they are checked
            return
        runner = _FailingNode(gm)
        try:
            runner.run(*grown)
        except Exception as exc:  # noqa: BLE001
            batch = next((int(x.shape[0]) for x in grown if isinstance(x, torch.Tensor) and x.dim() > 0), 0)
            at = describe(gm, runner.failed) if runner.failed is not None else "an unknown node"
            raise CaptureError(f"cannot capture {type(model).__name__}: the captured graph fails at batch {batch} "
                               f"(it runs at the example batch {batch - 1}) at {at}: "
                               f"{(str(exc).splitlines() or [type(exc).__name__])[0][:160]}",
                               "derive sizes from the input (x.size(0), or -1 in view/reshape) instead of "
                               "constants") from None


def _shape_prop(gm: fx.GraphModule, examples: tuple[Any, ...]) -> None:
    """ShapeProp (``tensor_meta`` on every node) in eval mode, buffers restored."""
    from torch.fx.passes.shape_prop import ShapeProp

    with eval_probe(gm), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        ShapeProp(gm).propagate(*examples)
    gm.meta[SHAPES_RECORDED] = True


def _capture_fx(model: nn.Module, examples: tuple[Any, ...] | None) -> fx.GraphModule:
    """The fx route; ``nn.MultiheadAttention`` is traced through its explicit form (with the
    masks' dtypes from a first trace's shape propagation, fx proxies have none)."""
    gm = _trace(model)
    nodes = list(gm.graph.nodes)
    has_mha = any(n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.MultiheadAttention)
                  for n in nodes)
    has_sdpa = any(n.op == "call_function" and n.target in SDPA_TARGETS for n in nodes)
    has_addmm = any(n.op == "call_function" and n.target in _ADDMM for n in nodes)
    if (has_mha or has_sdpa or has_addmm) and examples is not None:
        try:
            _shape_prop(gm, examples)
        except Exception as exc:  # noqa: BLE001 - the example inputs do not fit: the user's error
            if has_mha or has_sdpa:  # the decomposition needs the masks' dtypes
                raise CaptureError(f"{type(model).__name__} fails on its example inputs: "
                                   f"{(str(exc).splitlines() or [type(exc).__name__])[0][:200]}",
                                   "check example_inputs() (shapes, dtypes) against model()") from exc
    if has_mha:
        hints = mha_call_hints(gm) if examples is not None else None
        with explicit_attention_modules(model, hints):
            gm = _trace(model, trace_attention=True)
        paths = {path for path, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
        for node in reversed(list(gm.graph.nodes)):  # e.g. the averaged weights nobody reads
            if not node.users and node.op in ("call_function", "call_method") and module_path(node) in paths:
                gm.graph.erase_node(node)
        if examples is not None:
            _shape_prop(gm, examples)  # SDPA's mask dtype, Conv1D's shapes
    _dropout_modules(gm)
    _out_of_place_adds(gm)
    gm.recompile()
    gm.meta[CAPTURED_BY] = "torch.fx"
    return gm


def _capture_export(model: nn.Module, examples: tuple[Any, ...], fx_where: str | None) -> fx.GraphModule:
    was_training = model.training
    model.train()  # BN / dropout in their training form; eval is re-derived from the modules
    try:
        with explicit_attention_modules(model):
            exported = _export(model, examples)
    except CaptureError:
        raise
    except Exception as export_error:  # noqa: BLE001
        where = _user_frame(export_error) or fx_where or "an unknown line"
        raise CaptureError(f"cannot capture {type(model).__name__}: torch.fx and torch.export both "
                           f"failed at {where}: {str(export_error).splitlines()[0][:200]}",
                           "avoid Python control flow on tensor values (use torch.where / torch.cond)"
                           ) from export_error
    finally:
        model.train(was_training)
    unlifted = exported.module()
    for node in list(unlifted.graph.nodes):  # export's input guard and shape asserts are not the model
        if (node.op == "call_module" and str(node.target) == "_guards_fn") or \
                (node.op == "call_function" and node.target in _ASSERT_OPS and not node.users):
            unlifted.graph.erase_node(node)
    _restore_train_eval_modules(unlifted, model)
    _out_of_place_adds(unlifted)
    unlifted.graph.eliminate_dead_code()
    # a plain GraphModule (export's own refuses .train()/.eval())
    gm = fx.GraphModule(unlifted, unlifted.graph)
    gm.train(was_training)
    gm.meta[CAPTURED_BY] = "torch.export"
    return gm


def _dropout_modules(gm: fx.GraphModule) -> None:
    """``F.dropout(x, p, training=True)`` (the fx trace of a dropout that follows the mode, e.g.
    the explicit attention's) → an ``nn.Dropout(p)`` module, so ``gm.eval()`` removes it."""
    from fxquant.passes.op_kinds import argument

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not F.dropout:
            continue
        if argument(node, 2, "training", True) is not True or argument(node, 3, "inplace", False):
            continue
        p = argument(node, 1, "p", 0.5)
        if not isinstance(p, (int, float)):
            continue
        name = f"_fxq_dropout_{node.name}"
        gm.add_module(name, nn.Dropout(float(p)))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


_VIEWS = frozenset({_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default})
_ADDMM = frozenset({_aten.addmm.default, torch.addmm})


def _is_view(node: Any) -> bool:
    return isinstance(node, fx.Node) and (node.op == "call_function" and node.target in _VIEWS or
                                          node.op == "call_method" and node.target in ("view", "reshape"))


def _shape(node: Any) -> tuple[str, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    shape = val.shape if isinstance(val, torch.Tensor) else getattr(node.meta.get("tensor_meta"), "shape", None)
    return tuple(str(d) for d in shape) if shape is not None else None


def _conv1d_as_linear(gm: fx.GraphModule) -> bool:
    """Hugging Face ``Conv1D``, ``addmm(b, x.view(-1, C), W).view(*x.shape[:-1], N)`` with
    parameters ``b`` and ``W`` (stored ``(in, out)``), → ``linear(x, aten.t(W), b)`` on the
    unmerged ``x``: the same sums, the module's own weight (a weight quantizer attaches to it) and
    no view merging the batch into the rows. Shapes come from export's values or ShapeProp."""
    changed = False
    for node in list(gm.graph.nodes):
        if not (_is_view(node) and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_function"
                and node.args[0].target in _ADDMM):
            continue
        mm = node.args[0]
        bias, flat, weight = (mm.args + (None, None, None))[:3]
        if len(mm.users) != 1 or any(mm.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or len(mm.args) > 3 or \
                not (isinstance(bias, fx.Node) and bias.op == "get_attr" and isinstance(weight, fx.Node)
                     and weight.op == "get_attr" and _is_view(flat) and isinstance(flat.args[0], fx.Node)):
            continue
        x = flat.args[0]
        x_shape, out_shape = _shape(x), _shape(node)
        if x_shape is None or out_shape is None or len(x_shape) != len(out_shape) or x_shape[:-1] != out_shape[:-1]:
            continue
        with gm.graph.inserting_before(node):
            wt = gm.graph.call_function(_aten.t.default, (weight,))
            linear = gm.graph.call_function(_aten.linear.default, (x, wt, bias))
        for new in (wt, linear):
            new.meta.update({k: v for k, v in mm.meta.items() if k in ("nn_module_stack", "stack_trace")})
        if "val" in node.meta:
            linear.meta["val"] = node.meta["val"]
        node.replace_all_uses_with(linear)
        gm.graph.erase_node(node)
        gm.graph.erase_node(mm)
        if not flat.users:
            gm.graph.erase_node(flat)
        changed = True
    return changed
