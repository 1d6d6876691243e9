"""Bad graphs, options and toolchains raise fxquant.errors types with one-line messages (no g++ build)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fxquant.backends.fpga import generate_project, run_csim
from fxquant.errors import ExportError, PrecisionError, ToolchainError, UnsupportedOpError, UsageError
from fxquant.fixed_point import FixedPoint

from tests.backends.fpga.fpga_graphs import GraphBuilder, build_mlp, fp


def _one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_unsupported_op_is_named(tmp_path: Path) -> None:
    # the backend builds every IntegerGraph kind; a kind from elsewhere (set past Op's own check) is named
    g = GraphBuilder("x", (2, 4), fp(8, 4), 0)
    h = g.add("act", "relu", ("x",), (2, 4), fp(8, 4))
    g.ops[0].kind = "gelu_erf"
    with pytest.raises(UnsupportedOpError, match="'act': kind 'gelu_erf' is not supported") as exc:
        generate_project(g.graph(h), tmp_path)
    _one_line(exc)


@pytest.mark.parametrize(("case", "why", "error"), [
    ("inner", r"matmul of shapes \[2, 4\] and \[2, 4\]: inner dims differ", ExportError),
    ("ranks", r"matmul of shapes \[2, 4\] and \[1, 4, 2\] \(batch excluded\)", UnsupportedOpError),
    ("heads", r"leading dims do not broadcast", ExportError),
    ("softmax_axis", r"softmax over axis 1 of a rank-2 value", UnsupportedOpError)])
def test_unsupported_transformer_shapes(tmp_path: Path, case: str, why: str, error: type) -> None:
    g = GraphBuilder("x", (2, 4), fp(8, 4), 0)
    if case == "inner":
        h = g.add("mm", "matmul", ("x", "x"), (2, 4), fp(8, 4))
    elif case == "ranks":
        g.reshape("r", "x", (1, 4, 2))
        h = g.add("mm", "matmul", ("x", "r"), (2, 2), fp(8, 4))
    elif case == "heads":
        g = GraphBuilder("x", (2, 2, 2), fp(8, 4), 0)
        g.reshape("r", "x", (4, 2, 1))
        h = g.add("mm", "matmul", ("x", "r"), (4, 2, 1), fp(8, 4))
    else:
        h = g.add("sm", "softmax", ("x",), (2, 4), fp(8, 7), dim=1)
    with pytest.raises(error, match=why) as exc:
        generate_project(g.graph(h), tmp_path)
    _one_line(exc)


@pytest.mark.parametrize(("case", "why"), [
    ("add3", "add of 3 inputs"), ("cat_batch", "cat on dim 0"), ("avg_dilated", "average pooling with dilation"),
    ("max_empty", "a max pooling window along H holds no input cell"), ("mul_rank5", "mul of rank-5 values"),
    ("lut_13bit", "table of 8192 entries on a 13-bit input"), ("conv_vector", "conv2d on an input of shape")])
def test_unsupported_shapes_of_supported_ops(tmp_path: Path, case: str, why: str) -> None:
    g = GraphBuilder("x", (1, 6, 6), fp(8, 4), 0)
    if case == "add3":
        h = g.add("add", "add", ("x", "x", "x"), (1, 6, 6), fp(8, 4))
    elif case == "cat_batch":
        h = g.add("cat", "cat", ("x", "x"), (1, 6, 6), fp(8, 4), dim=0)
    elif case == "avg_dilated":
        h = g.add("avg", "avgpool2d", ("x",), (1, 4, 4), fp(8, 4), kernel=(2, 2), stride=(1, 1), dilation=(2, 2))
    elif case == "max_empty":  # dilation 2, padding 1: the one window reads rows -1 and 1 of a 1-row input
        g = GraphBuilder("x", (1, 1, 4), fp(8, 4), 0)
        h = g.add("mp", "maxpool2d", ("x",), (1, 1, 5), fp(8, 4), kernel=(2, 2), stride=(1, 1), padding=(1, 1),
                  dilation=(2, 1))
    elif case == "mul_rank5":
        g = GraphBuilder("x", (1, 2, 1, 2, 2), fp(8, 4), 0)
        h = g.add("m", "mul", ("x", "x"), (1, 2, 1, 2, 2), fp(8, 4))
    elif case == "lut_13bit":
        g = GraphBuilder("x", (4,), fp(13, 4), 0)
        h = g.add("t", "lut", ("x",), (4,), fp(8, 4), table=np.zeros(8192, np.int64))
    else:
        g = GraphBuilder("x", (6,), fp(8, 4), 0)
        h = g.add("conv", "conv2d", ("x",), (1, 6, 1), fp(8, 4), (1, 1, 1, 1), fp(4, 3))
    with pytest.raises(UnsupportedOpError, match=f"op '{h}': {why}"):
        generate_project(g.graph(h), tmp_path)
    from fxquant.backends.fpga.target import FpgaTarget

    assert any(p.layer == h for p in FpgaTarget().check(g.graph(h)))


def test_off_format_is_rejected(tmp_path: Path) -> None:
    g = GraphBuilder("x", (4,), fp(8, 4), 0)
    h = g.add("fc", "linear", ("x",), (3,), FixedPoint(32, 0), (3, 4), fp(4, 2))
    with pytest.raises(PrecisionError, match="value 'fc' has format off"):
        generate_project(g.graph(h), tmp_path)


def test_accumulator_wider_than_64_bits(tmp_path: Path) -> None:
    g = GraphBuilder("x", (4,), fp(16, 64), 0)
    a = g.add("q", "requantize", ("x",), (4,), fp(16, 0))
    h = g.add("add", "add", ("x", a), (4,), fp(8, 0))  # aligns FL 0 to FL 64: 16 + 64 + 1 bits
    with pytest.raises(PrecisionError, match="'add': accumulator needs 81 bits, more than 64") as exc:
        generate_project(g.graph(h), tmp_path)
    _one_line(exc)


def test_weight_outside_its_format(tmp_path: Path) -> None:
    graph, _ = build_mlp()
    graph.ops[0].weight = graph.ops[0].weight * 4
    with pytest.raises(PrecisionError, match="'fc1': a weight needs 7 bits, more than its 5-bit format"):
        generate_project(graph, tmp_path)


def test_check_lists_every_problem_at_once() -> None:
    from fxquant.backends.fpga.target import FpgaTarget

    g = GraphBuilder("x", (1, 6, 6), fp(8, 4), 0)
    g.reshape("r", "x", (1, 4, 9))
    a = g.add("mm", "matmul", ("x", "r"), (1, 6, 9), fp(8, 4))  # (6 x 6) @ (4 x 9): inner dims differ
    b = g.add("add3", "add", ("x", "x", "x"), (1, 6, 6), fp(8, 4))
    c = g.add("avg3", "avgpool2d", ("x",), (1, 2, 2), fp(8, 4), kernel=(3, 3), dilation=(2, 2))
    d = g.add("cat_h", "cat", ("x", "x"), (1, 12, 6), fp(8, 4), dim=0)
    graph = g.graph(d)
    graph.outputs += [a, b, c, "x"]  # a graph input as an output: not computed by an op
    problems = FpgaTarget().check(graph)
    assert {(p.layer, p.kind) for p in problems} == {("mm", "matmul"), ("add3", "add"), ("avg3", "avgpool2d"),
                                                     ("cat_h", "cat"), ("graph", "outputs")}, problems
    assert all("\n" not in str(p) for p in problems)


@pytest.mark.parametrize("opts", [{"io": "axi"}, {"reuse": 0}, {"clock_ns": 0.0}, {"part": ""}])
def test_bad_options(tmp_path: Path, opts: dict) -> None:
    graph, _ = build_mlp()
    with pytest.raises(UsageError):
        generate_project(graph, tmp_path, **opts)


def test_inputs_outside_the_input_format(tmp_path: Path) -> None:
    graph, builder = build_mlp()
    project = generate_project(graph, tmp_path)
    with pytest.raises(ExportError, match=r"outside 'input''s format <6,3>"):
        run_csim(project, graph, np.full((3, 32), 40))
    with pytest.raises(ExportError, match="expected integers"):
        run_csim(project, graph, builder.inputs(3).astype(np.float64))
    with pytest.raises(ExportError, match=r"expected \(batch, 32\)"):
        run_csim(project, graph, np.zeros((3, 31), dtype=np.int64))


def test_missing_compiler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph, builder = build_mlp()
    project = generate_project(graph, tmp_path)
    monkeypatch.setenv("CXX", "no-such-g++")
    with pytest.raises(ToolchainError, match="'no-such-g\\+\\+' not found on PATH") as exc:
        run_csim(project, graph, builder.inputs(2))
    assert "install g++" in exc.value.hint


def test_missing_ap_types(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    graph, builder = build_mlp()
    project = generate_project(graph, tmp_path)
    monkeypatch.setenv("FXQUANT_AP_TYPES", str(tmp_path / "nowhere"))
    with pytest.raises(ToolchainError, match="no ap_int.h in"):
        run_csim(project, graph, builder.inputs(2))


def test_inconsistent_graphs(tmp_path: Path) -> None:
    g = GraphBuilder("x", (1, 6, 6), fp(8, 4), 0)
    h = g.add("conv", "conv2d", ("x",), (2, 6, 6), fp(8, 2), (2, 1, 3, 3), fp(4, 3))  # no padding: 4x4
    with pytest.raises(ExportError, match=r"'conv': output value 'conv' has shape \(2, 6, 6\), but conv2d computes"):
        generate_project(g.graph(h), tmp_path)
    graph, _ = build_mlp()
    graph.ops[1].out_fmt = fp(12, 0)
    with pytest.raises(ExportError, match="'fc2': out_fmt <12,0> differs from its value's format <12,-1>"):
        generate_project(graph, tmp_path)
    g = GraphBuilder("x", (4,), fp(8, 4), 0)
    h = g.add("relu6", "clamp", ("x",), (4,), fp(4, 0), lo=9, hi=None)  # <4,0> tops out at 7
    with pytest.raises(ExportError, match=r"'relu6': clamp bounds \[9, None\] leave the output format <4,0>"):
        generate_project(g.graph(h), tmp_path)
    g = GraphBuilder("x", (4,), fp(8, 4), 0)
    h = g.add("half", "mul_pow2", ("x",), (4,), fp(8, 4), exponent=-1)  # FL must move to 5
    with pytest.raises(ExportError, match=r"'half': mul_pow2 by 2\^-1 of <8,4> gives <8,4>"):
        generate_project(g.graph(h), tmp_path)


def test_csim_without_a_project(tmp_path: Path) -> None:
    graph, builder = build_mlp()
    with pytest.raises(ExportError, match="no generated FPGA project in"):
        run_csim(tmp_path, graph, builder.inputs(2))


def test_compile_error_names_the_file_and_keeps_the_log(tmp_path: Path) -> None:
    graph, builder = build_mlp()
    project = generate_project(graph, tmp_path)
    (project / "bridge.cpp").write_text((project / "bridge.cpp").read_text() + "\nnot C++\n")
    with pytest.raises(ToolchainError, match="g\\+\\+ failed on bridge.cpp: .*error") as exc:
        run_csim(project, graph, builder.inputs(2))
    assert (project / "build" / "build.log").is_file() and "build.log" in exc.value.hint
