"""Load a user's model.py: the one place fxquant executes code it did not ship.

Contract: ``model()`` → ``nn.Module`` (required); ``data(batch_size)`` → ``(train, val)`` loaders
and ``example_inputs()`` → tuple of tensors (optional). Nothing in a run directory is ever
executed: a run records the model file's path and SHA-256, and is rebuilt from that file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from fxquant.errors import ModelFileError


@dataclass
class ModelFile:
    path: Path
    module: ModuleType

    @property
    def sha256(self) -> str:
        return file_sha256(self.path)

    def model(self) -> nn.Module:
        net = self._call("model")
        if not isinstance(net, nn.Module):
            raise ModelFileError(f"{self.path}: model() returned {type(net).__name__}, not an nn.Module",
                                 "return the network instance from model()")
        return net

    def has(self, name: str) -> bool:
        return callable(getattr(self.module, name, None))

    def data(self, batch_size: int) -> tuple[DataLoader, DataLoader]:
        if not self.has("data"):
            raise ModelFileError(f"{self.path}: no data() factory", "define data(batch_size) -> (train, val)")
        fn = self.module.data
        takes_batch = "batch_size" in inspect.signature(fn).parameters
        loaders = self._call("data", batch_size=batch_size) if takes_batch else self._call("data")
        if not (isinstance(loaders, (tuple, list)) and len(loaders) == 2):
            raise ModelFileError(f"{self.path}: data() must return (train_loader, val_loader)")
        return loaders[0], loaders[1]

    def example_inputs(self) -> tuple[Any, ...] | None:
        if not self.has("example_inputs"):
            return None
        inputs = self._call("example_inputs")
        return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)

    def check_example_inputs(self) -> None:
        """Run the eager model on ``example_inputs()`` (eval, no grad): a misfit is one line, before
        any run directory is written."""
        net = self.model().eval()
        example = self.example_inputs()
        if example is None:
            return
        import torch

        try:
            with torch.no_grad():
                net(*example)
        except Exception as exc:  # noqa: BLE001 - any failure means the inputs do not fit the model
            shapes = ", ".join(describe_input(x) for x in example)
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise ModelFileError(f"{self.path}: example inputs {shapes} do not fit the model: {first}",
                                 "check example_inputs() (shapes, dtypes) against model()") from exc

    def _call(self, name: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.module, name)(**kwargs)
        except Exception as exc:  # noqa: BLE001 - any user error becomes one line
            raise ModelFileError(f"{self.path}: {name}() raised {type(exc).__name__}: {exc}",
                                 "fix the factory; run with --debug for the traceback") from exc


def describe_input(x: Any) -> str:
    """``(1, 32) int64`` for a tensor (shape and dtype: token ids must stay integers), else its type."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
    return type(x).__name__


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_model_file(path: str | Path) -> ModelFile:
    """Import ``path`` as a module and check it defines ``model()``."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist", "pass the path of a model.py")
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"model file {path} is not readable: {exc.strerror}") from exc
    name = f"fxquant_user_model_{hashlib.sha256(source).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelFileError(f"model file {path} cannot be imported", "use a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    from fxquant.torchvision_compat import define_missing_schemas

    define_missing_schemas()  # a model file may `import torchvision` beside the CPU torch
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        sys.modules.pop(name, None)
        raise ModelFileError(f"{path}: importing failed with {type(exc).__name__}: {exc}",
                             "run `python model.py` to see the error") from exc
    if not callable(getattr(module, "model", None)):
        raise ModelFileError(f"{path}: no model() factory", "define `def model() -> nn.Module`")
    return ModelFile(path.resolve(), module)
