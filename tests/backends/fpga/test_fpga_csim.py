"""g++ C-simulation of generated HLS projects, bit-exact against IntegerGraph.run (1000 inputs each)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fxquant.backends.base import REPORT_FILE, export
from fxquant.backends.fpga import generate_project, run_csim
from fxquant.backends.fpga.target import FpgaTarget
from fxquant.errors import ExportError
from fxquant.integer_graph import IntegerGraph

from tests.backends.fpga.fpga_graphs import GraphBuilder, build_cnn, build_mlp, build_residual, build_vision

N = 1000
CASES = {  # model -> (builder, generate_project options)
    "mlp": (build_mlp, {"reuse": 1, "io": "parallel"}),
    "cnn": (build_cnn, {"reuse": 4, "io": "stream"}),
    "residual": (build_residual, {"reuse": 2, "io": "parallel", "part": "xc7z020clg400-1", "clock_ns": 10.0}),
    "vision": (build_vision, {"reuse": 3, "io": "stream"}),
}


@pytest.fixture(scope="module")
def projects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[IntegerGraph, GraphBuilder, Path, dict[str, Any]]]:
    """Generate and C-simulate every case once (one g++ build each); residual goes through the
    contract (base.export with FpgaTarget, then run_csim on the placed project: a cached build)."""
    out = {}
    for name, (build, opts) in CASES.items():
        graph, builder = build()
        x = builder.inputs(N)
        project = tmp_path_factory.mktemp(name)
        if name == "residual":
            fl = graph.inputs[0].fmt.frac_bits
            project = project / "fpga"
            export(FpgaTarget(), graph, project, [np.ldexp(x.astype(np.float64), -fl)], **opts)
            report = run_csim(project, graph, x)  # the project export built and moved into place
        else:
            generate_project(graph, project, test_inputs=x[:50], **opts)
            report = run_csim(project, graph, x)
        out[name] = (graph, builder, project, report)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_csim_is_bit_exact(projects: dict, name: str) -> None:
    report = projects[name][3]
    assert report["n"] == N
    assert report["mismatches"] == 0 and report["mismatched_elements"] == 0
    assert report["bit_exact"] is True and report["first_mismatch"] is None
    assert report["testbench_ok"] is True
    # residual: built by export in its temporary directory, reused after the move (relocatable)
    assert report["build_cached"] == (name == "residual") and report["build_seconds"] < 30
    json.dumps(report)


def test_rebuild_is_cached_and_mismatch_is_detected(projects: dict) -> None:
    graph, builder, project, _ = projects["mlp"]
    x = builder.inputs(200)
    again = run_csim(project, graph, x)
    assert again["build_cached"] and again["bit_exact"]
    other, _ = build_mlp(seed=99)  # same shapes and formats, other weights: the C model must disagree
    report = run_csim(project, other, x)
    assert not report["bit_exact"] and report["mismatches"] > 0


def test_export_report_written_atomically(projects: dict) -> None:
    graph, _, project, _ = projects["residual"]
    report = json.loads((project / REPORT_FILE).read_text())
    assert report["verification"]["bit_exact"] and report["verification"]["n"] == N
    art = report["artifact"]
    assert art["part"] == "xc7z020clg400-1" and art["testbench_ok"] and art["top"] == "fxq_model"
    est = art["estimates"]
    assert est["estimate"] is True and "estimate" in est["model"]
    # c1 36 x 8 + 2 x 32, c2 72 x 11 + 4 x 32, fc 48 x 10 (no bias): counted by hand from build_residual
    assert est["weight_memory_bits"] == est["param_bits"] == 288 + 64 + 792 + 128 + 480
    assert [layer["name"] for layer in est["layers"]] == [op.name for op in graph.ops]
    assert sorted(p.name for p in project.parent.iterdir()) == ["fpga"]  # no temporaries beside it
    assert not list(project.glob(".*"))


def test_project_content(projects: dict) -> None:
    graph, _, project, _ = projects["cnn"]
    fw = project / "firmware"
    params = (fw / "parameters.h").read_text()
    conv2 = graph.ops[3]
    assert (graph.value(conv2.inputs[0]).fmt.bits, conv2.weight_fmt.bits, conv2.bias) == (6, 7, None)
    acc = 6 + 7 + 6  # <6,5> activations x <7,-2> weights over fan-in 4*3*3 = 36: + ceil(log2 36) bits
    assert re.search(rf"struct config_l3_conv2 {{\n    typedef l3_conv2_t out_t;\n.*typedef ap_int<{acc}> accum_t;",
                     params, re.S)
    assert "static const unsigned reuse_factor = 4;" in params
    defines = (fw / "defines.h").read_text()
    assert "typedef ap_int<16> l5_fc_t;  // fc: <16,4> == ap_fixed<16,12,AP_RND_CONV,AP_SAT>" in defines
    top = (fw / "fxq_model.cpp").read_text()
    assert "#pragma HLS DATAFLOW" in top and "hls::stream<input_t> &in_stream" in top
    assert "fxq::conv2d<config_l0_conv1>(in, l0_conv1_out, w_l0_conv1, b_l0_conv1);" in top
    weights = (fw / "weights" / "w_l5_fc.h").read_text()
    assert "static const int8_t w_l5_fc[240]" in weights and "ap_" not in weights
    tcl = (project / "build_prj.tcl").read_text()
    assert "set_part {xcu250-figd2104-2L-e}" in tcl and "create_clock -period 5.0" in tcl
    assert all(k in tcl for k in ("csim_design", "csynth_design", "cosim_design"))
    golden = (project / "tb_data" / "tb_output.dat").read_text().splitlines()
    assert len(golden) == 50 and len(golden[0].split()) == 10
    for header in ("fxq_common.h", "fxq_conv2d.h", "fxq_dense.h", "fxq_pool.h", "fxq_stream.h"):
        assert (fw / "nnet_utils" / header).is_file()


def test_mismatch_raises_and_places_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph, builder = build_mlp()
    x = builder.inputs(10)
    real = FpgaTarget.run

    def tampered(self: FpgaTarget, out_dir: Path, ints: list[np.ndarray]) -> list[np.ndarray]:
        (y,) = real(self, out_dir, ints)
        y[3, 0] += 1
        return [y]

    monkeypatch.setattr(FpgaTarget, "run", tampered)
    fl = graph.inputs[0].fmt.frac_bits
    with pytest.raises(ExportError, match="differs from the integer reference.*sample 3"):
        export(FpgaTarget(), graph, tmp_path / "fpga", [np.ldexp(x.astype(np.float64), -fl)])
    assert list(tmp_path.iterdir()) == []


def test_project_for_another_graph_is_refused(projects: dict) -> None:
    _, _, project, _ = projects["mlp"]
    graph, builder = build_cnn()
    with pytest.raises(ExportError, match="maps 32 inputs to 10 outputs, not 64 to 10"):
        run_csim(project, graph, builder.inputs(3))


def test_vision_project_content(projects: dict) -> None:
    """Tables are ROMs in weights headers, a cat of three is one function, layout ops gather."""
    graph, _, project, _ = projects["vision"]
    fw = project / "firmware"
    hswish = (fw / "weights" / "w_l3_hswish.h").read_text()
    assert "static const int8_t t_l3_hswish[1024]" in hswish  # 2^10 entries of the <7,3> output
    table = graph.ops[3].attrs["table"]
    assert re.search(r"t_l3_hswish\[1024\] = \{\n    " + ", ".join(map(str, table[:24])) + ",", hswish)
    avg = (fw / "weights" / "w_l16_avg.h").read_text()
    assert "static const int64_t m_l16_avg[10]" in avg  # divisors 0..9 of a 3x3 window
    top = (fw / "fxq_model.cpp").read_text()
    assert "static void cat_l9_cat(" in top and top.count("fxq::cat_part<config_l9_cat_") == 3
    assert "fxq::gather<config_l11_shuffle>(l10_split_out, l11_shuffle_out);" in top
    params = (fw / "parameters.h").read_text()
    # the SE gate (4,3,3) x (4,1,1): the gate's H and W strides are 0; product exact in 7 + 8 bits
    assert re.search(r"struct config_l7_excite \{.*typedef ap_int<15> accum_t;.*b1 = 1;\n.*b2 = 0;\n.*b3 = 0;",
                     params, re.S)
    assert "static const long long hi = 96;" in params and "static const bool has_lo = false;" in params
