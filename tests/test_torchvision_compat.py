"""torchvision's model definitions import beside the CPU torch (fxquant.torchvision_compat)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path


def test_import_torchvision_gives_working_model_definitions() -> None:
    from fxquant.torchvision_compat import import_torchvision

    tv = import_torchvision()
    import torch

    model = tv.models.squeezenet1_1(num_classes=10).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert import_torchvision() is tv


def test_a_model_file_may_import_torchvision_directly(tmp_path: Path) -> None:
    """In a fresh interpreter (nothing imported yet), as ``fxquant train model.py`` loads it."""
    path = tmp_path / "model.py"
    path.write_text("import torchvision\n\ndef model():\n    return torchvision.models.resnet18(num_classes=10)\n")
    code = textwrap.dedent(f"""
        from fxquant.model_file import load_model_file
        print(type(load_model_file({str(path)!r}).model()).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ResNet"
