"""Capture an ``nn.Module`` as a ``torch.fx.GraphModule`` (first step of every pipeline).

``torch.fx`` first (with the user's source lines recorded in ``node.meta["stack_trace"]``): it
keeps the module hierarchy (``call_module`` nodes) and works without example inputs. Models it
cannot trace (Python control flow on tensor shapes, for instance) fall back to ``torch.export``
with the example inputs, which specializes shape-dependent branches. If both fail,
:class:`~fxquant.errors.CaptureError` names the offending line of the user's code.

**The export graph is made to train and evaluate like the model.** Export records one mode (it
captures in training mode, with a dynamic batch dimension where the model allows it, so that
``x.view(x.size(0), -1)`` stays batch-independent): BatchNorm as ``aten.batch_norm(training=True)``
plus the ``num_batches_tracked.add_(1)`` bookkeeping, dropout as ``aten.dropout(train=True)``.
Both are put back as the model's own modules::

    add_(bn.num_batches_tracked, 1); batch_norm(x, bn.weight, …, True, …)   →   call_module bn(x)
    dropout(x, 0.5, True)                                                  →   call_module drop(x)

so ``gm.train()`` / ``gm.eval()`` switch batch statistics / running statistics and dropout as in
eager mode, :class:`FoldBatchNorm` folds the BN modules, and quantizers land where the fx path puts
them. Other ``if self.training:`` branches stay specialized to training (documented limitation).
On the fx path, ``torchvision.ops.StochasticDepth`` stays a module (a leaf): it drops rows in
training and is the identity in eval, and the lowering removes it like dropout.
In-place adds on activations (``y += z``) become out-of-place adds in both paths, so a quantizer
output shared by several consumers is never overwritten by one of them.
"""

from __future__ import annotations

import operator
import traceback
from typing import Any

import torch
from torch import fx, nn

from fxquant.errors import CaptureError
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

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_stochastic_depth(m) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    tracer.record_stack_traces = True
    graph = tracer.trace(model)
    name = model.__class__.__name__ if isinstance(model, nn.Module) else model.__name__
    return fx.GraphModule(tracer.root, graph, name)


def _export(model: nn.Module, example_inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch dimension if the model allows it, else static shapes."""
    from torch.export import Dim

    def batched(x: Any) -> Any:  # batch 1 would be specialized (0/1 rule): trace with 2
        return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x

    tensors = tuple(batched(x) for x in example_inputs)
    dynamic = tuple({0: Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None for x in tensors)
    try:
        return torch.export.export(model, tensors, dynamic_shapes=dynamic, strict=False)
    except Exception:  # noqa: BLE001 - the static export below reports the real failure
        return torch.export.export(model, tuple(example_inputs), strict=False)


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


def capture(model: nn.Module, example_inputs: tuple[Any, ...] | None = None) -> fx.GraphModule:
    """Trace ``model`` with torch.fx, or with ``torch.export`` if fx fails (needs example inputs)."""
    try:
        gm = _trace(model)
        _out_of_place_adds(gm)
        gm.recompile()
        gm.meta[CAPTURED_BY] = "torch.fx"
        return gm
    except Exception as fx_error:  # noqa: BLE001 - any tracing failure triggers the fallback
        fx_where = _user_frame(fx_error)
        if example_inputs is None:
            raise CaptureError(f"torch.fx cannot trace {type(model).__name__} at {fx_where}: "
                               f"{str(fx_error).splitlines()[0]}",
                               "define example_inputs() in model.py so torch.export can capture it") from fx_error
        was_training = model.training
        model.train()  # BN / dropout in their training form; eval is re-derived from the modules
        try:
            exported = _export(model, tuple(example_inputs))
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
