"""capture: torch.fx first, torch.export fallback, one clear error when both fail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxquant.errors import CaptureError
from fxquant.passes import capture
from fxquant.passes.capture import CAPTURED_BY


class ShapeBranch(nn.Module):
    """fx cannot trace a branch on a tensor's size; torch.export specializes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent (value) control flow
            x = x * 2
        return self.fc(x)


class SizeLoop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.shape[1]) // 8):  # int() of a traced size: fx fails, export specializes
            x = torch.relu(x)
        return self.fc(x)


def test_fx_path(mlp):
    gm = capture(mlp)
    assert gm.meta[CAPTURED_BY] == "torch.fx"
    x = torch.randn(2, 16)
    assert torch.equal(gm(x), mlp(x))


def test_export_fallback_for_shape_control_flow():
    model = SizeLoop()
    x = torch.randn(3, 8)
    gm = capture(model, (x,))
    assert gm.meta[CAPTURED_BY] == "torch.export"
    assert torch.allclose(gm(x), model(x))


def test_both_fail_names_the_offending_line():
    with pytest.raises(CaptureError) as err:
        capture(ShapeBranch(), (torch.randn(2, 8),))
    assert "test_capture.py" in err.value.message and "x.sum() > 1e9" in err.value.message


def test_fx_failure_without_example_inputs_asks_for_them():
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(SizeLoop())
