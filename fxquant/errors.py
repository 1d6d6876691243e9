"""One error family for every user-facing failure.

Every error carries a one-line ``message`` that names the thing at fault (file, layer, node, op,
field) and a ``hint`` saying what to do. The CLI prints ``error: <message>`` and ``hint: <hint>``
without a traceback and exits with status 2 (``--debug`` shows the traceback).
"""

from __future__ import annotations


class FxquantError(Exception):
    """Base class: a failure the user can act on."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class ModelFileError(FxquantError):
    """model.py missing, unreadable, without ``model()``, or its factory raised."""


class CaptureError(FxquantError):
    """Neither torch.fx nor torch.export could capture the model."""


class PrecisionError(FxquantError):
    """A ``<BW,FL>`` outside the supported range."""


class PrecisionMapError(FxquantError):
    """A precision map that is malformed or does not match the model (all problems listed)."""


class UnsupportedOpError(FxquantError):
    """An op with no integer / quantized form in the requested target."""


class ExportError(FxquantError):
    """An export or lowering step failed or its verification found a mismatch."""


class ToolchainError(FxquantError):
    """A required external tool (g++, nvcc, TVM) is missing or failed."""


class CheckpointError(FxquantError):
    """A truncated, corrupt or incompatible checkpoint."""


class RunDirError(FxquantError):
    """A run directory that is missing, incompatible, exists already, or is not writable."""


class TrainingError(FxquantError):
    """Training cannot go on (e.g. NaN/inf loss)."""


class TrainingInterrupted(TrainingError):
    """SIGINT/SIGTERM stopped training at a step boundary; a checkpoint of that step was saved (exit 130)."""

    exit_code = 130


class UsageError(FxquantError):
    """Bad option values or combinations (unknown policy, target, flavour, bounds)."""


class InputRangeError(FxquantError, ValueError):
    """A run-time input outside what the graph defines (a token id outside ``[0, V)``): never clipped."""
