"""FPGA backend: an :class:`~fxquant.integer_graph.IntegerGraph` as a bit-exact HLS C++ project.

:class:`fxquant.backends.fpga.target.FpgaTarget` (registry name ``fpga``) generates the Vitis HLS
project (``generate_project``: ``ap_int`` types, fixed ``fxq_*.h`` headers, top function,
testbench, tcl), compiles it with g++ and runs the C model (``csim``), with analytic resource
estimates in its build facts. ``run_csim`` builds a project and compares it with
``IntegerGraph.run`` bit for bit; ``hls4ml_route.hls4ml_csim`` cross-checks through QONNX and
hls4ml (imported only there). See ``docs/fpga.md``.
"""

from .codegen import generate_project
from .csim import run_csim

__all__ = ["generate_project", "run_csim"]
