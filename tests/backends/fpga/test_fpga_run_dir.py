"""End to end: train the digits CNN for one epoch, lower it through the run directory
(``fxquant.run_dir.load_integer_graph``) and export it to FPGA, bit-exact on held-out digits."""

from __future__ import annotations

from pathlib import Path

import pytest

from fxquant.backends.fpga import export_fpga

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "digits_cnn.py"


@pytest.mark.slow  # trains one epoch (~10 s on an idle machine)
def test_trained_digits_cnn_exports_bit_exact(tmp_path: Path) -> None:
    from fxquant.run_dir import RunDir, load_integer_graph
    from fxquant.trainer import TrainOptions, train

    run = tmp_path / "run"
    train(EXAMPLE, run, "static", {"bits": 6, "act_bits": 8, "grad_bits": None},
          TrainOptions(epochs=1, lr=0.05, batch_size=64, seed=0, progress=False), force=True)
    graph = load_integer_graph(run)
    rd = RunDir(run)
    x, _ = rd.held_out(rd.model_file(), 200)
    report = export_fpga(graph, run / "fpga", reuse=4, int_inputs=graph.quantize_inputs(x)[0])
    assert report["bit_exact"] and report["n"] == 200 and report["csim"]["testbench_ok"]
    assert report["estimates"]["weight_memory_bits"] == graph.param_bits()
    assert (run / "fpga" / "fpga_report.json").is_file()
