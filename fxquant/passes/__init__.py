"""Graph passes: each a ``torch.fx.passes.infra.pass_base.PassBase`` usable in fx's ``PassManager``.

Order: :func:`capture` → :class:`InsertQuantizers` → :class:`FuseReluIntoQuantizers` → (train under a
policy) → ``eval()`` → :class:`FoldBatchNorm` → :func:`lower_to_integer_graph` (deployment). Every
pass reads calls through :func:`fxquant.passes.op_kinds.call_arguments` (keyword form). :class:`StripQuantizers`
undoes the insertion. ``docs/passes.md`` shows the pipeline with the PassManager.
"""

from fxquant.passes.capture import capture
from fxquant.passes.fold_batchnorm import FoldBatchNorm
from fxquant.passes.fuse_relu import FuseReluIntoQuantizers
from fxquant.passes.insert_quantizers import InsertQuantizers
from fxquant.passes.lower_to_integer_graph import lower_to_integer_graph
from fxquant.passes.strip_quantizers import StripQuantizers

__all__ = ["capture", "FoldBatchNorm", "FuseReluIntoQuantizers", "InsertQuantizers", "StripQuantizers", "lower_to_integer_graph"]
