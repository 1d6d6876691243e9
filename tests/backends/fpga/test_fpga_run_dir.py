"""End to end: train the digits CNN for one epoch, lower it through the run directory
(``fxquant.deployment.load_integer_graph``) and export it to FPGA, bit-exact on held-out digits."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxquant.backends.base import REPORT_FILE, export
from fxquant.backends.fpga.target import FpgaTarget
from tests.helpers import trained_digits_run


@pytest.mark.slow  # trains one epoch (~10 s on an idle machine)
def test_trained_digits_cnn_exports_bit_exact(tmp_path: Path) -> None:
    run = tmp_path / "run"
    graph, x = trained_digits_run(run, 6, 200)
    report = export(FpgaTarget(), graph, run / "fpga", [x], reuse=4)
    assert report["bit_exact"] and report["verification"]["n"] == 200 and report["artifact"]["testbench_ok"]
    weights = sum(op.weight.size * op.weight_fmt.bits for op in graph.ops if op.weight is not None)
    biases = sum(op.bias.size * 32 for op in graph.ops if op.bias is not None)
    assert report["artifact"]["estimates"]["weight_memory_bits"] == weights + biases
    assert (run / "fpga" / REPORT_FILE).is_file()
