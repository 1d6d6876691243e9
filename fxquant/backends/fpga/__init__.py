"""FPGA backend: an :class:`~fxquant.integer_graph.IntegerGraph` as a bit-exact HLS C++ project.

``generate_project`` writes the Vitis HLS project (``ap_int`` types, fixed ``fxq_*.h`` headers,
top function, testbench, tcl), ``run_csim`` builds it with g++ and checks it bit for bit against
``IntegerGraph.run``, ``export_fpga`` does both plus analytic resource estimates and writes
``fpga_report.json``. ``hls4ml_route.hls4ml_csim`` cross-checks through QONNX and hls4ml (imported
only there). See ``docs/fpga.md``.
"""

from .codegen import generate_project
from .csim import run_csim
from .export import export_fpga

__all__ = ["export_fpga", "generate_project", "run_csim"]
