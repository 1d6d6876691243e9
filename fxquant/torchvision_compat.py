"""Import torchvision's model definitions beside a CPU build of torch: the one place it is done.

The package index's torchvision wheel is compiled against a CUDA build of torch; with the CPU
build its C++ extension does not load, and ``import torchvision`` fails while registering fake
kernels for ``torchvision::nms`` / ``torchvision::qnms`` ("operator torchvision::nms does not
exist"). The model definitions (``torchvision.models``) are pure Python and need neither op, so
:func:`import_torchvision` defines the two schemas first (``torch.library.Library("torchvision",
"DEF")``, exactly torchvision's own signatures) and then imports the package. Detection models'
NMS would raise at call time; no fxquant path calls it.

Use ``from fxquant.torchvision_compat import import_torchvision; tv = import_torchvision()`` in
fxquant's tests and benchmarks. A user's model file may ``import torchvision`` as usual:
:func:`fxquant.model_file.load_model_file` calls :func:`define_missing_schemas` before running it.
"""

from __future__ import annotations

import sys
from types import ModuleType

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = None  # kept alive: the schemas live as long as this Library object


def define_missing_schemas() -> None:
    """Make ``torchvision::nms`` / ``qnms`` exist before ``import torchvision`` (torchvision itself
    is not imported). Where torchvision's own C++ extension loads (a torchvision built for this
    torch), it defines them and nothing else is done; only where it cannot load are the two
    schemas defined here, without kernels."""
    global _LIBRARY
    import importlib.util
    from pathlib import Path

    import torch

    if all(_has_schema(f"torchvision::{name}") for name in _SCHEMAS):
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return  # no torchvision installed: nothing to prepare
    for lib in sorted(Path(spec.origin).parent.glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))  # what torchvision does on import; idempotent
        except (OSError, RuntimeError):
            pass  # built for another torch (the CUDA wheel beside the CPU torch)
    missing = [name for name in _SCHEMAS if not _has_schema(f"torchvision::{name}")]
    if not missing:
        return
    if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
    for name in missing:
        _LIBRARY.define(_SCHEMAS[name])


def _has_schema(qualname: str) -> bool:
    import torch

    try:
        torch._C._get_schema(qualname, "")  # noqa: SLF001
        return True
    except RuntimeError:
        return False


def import_torchvision() -> ModuleType:
    """``torchvision``, imported (once) after the ``nms``/``qnms`` schemas exist."""
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    define_missing_schemas()
    try:
        import torchvision
    except Exception as exc:  # a broken install: say what to do, keep the cause
        from fxquant.errors import FxquantError

        raise FxquantError(f"torchvision does not import beside torch: {exc}",
                           "install torchvision==0.28.0 (pip install -e '.[test]')") from exc
    return torchvision


__all__ = ["define_missing_schemas", "import_torchvision"]
