"""The native targets' registry entries load and ``check`` without importing TVM or hls4ml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_check_imports_no_heavy_tooling() -> None:
    code = """
import sys
from fxquant.backends.registry import get_target
from tests.export.integer_graphs import cnn, mlp
for name in ("cpu", "cuda", "fpga"):
    target = get_target(name)
    assert target.check(mlp()) == [] and target.check(cnn()) == [], name
heavy = sorted(m for m in ("tvm", "hls4ml", "qonnx", "onnxruntime") if m in sys.modules)
assert not heavy, heavy
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
