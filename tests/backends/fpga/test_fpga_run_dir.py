"""End to end: train the digits CNN for one epoch, lower it through the run directory
(``fxquant.deployment.load_integer_graph``) and export it to FPGA, bit-exact on held-out digits."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxquant.backends.fpga import export_fpga
from tests.helpers import trained_digits_run



@pytest.mark.slow  # trains one epoch (~10 s on an idle machine)
def test_trained_digits_cnn_exports_bit_exact(tmp_path: Path) -> None:
    run = tmp_path / "run"
    graph, x = trained_digits_run(run, 6, 200)
    report = export_fpga(graph, run / "fpga", reuse=4, int_inputs=graph.quantize_inputs(x)[0])
    assert report["bit_exact"] and report["n"] == 200 and report["csim"]["testbench_ok"]
    assert report["estimates"]["weight_memory_bits"] == graph.param_bits()
    assert (run / "fpga" / "fpga_report.json").is_file()
