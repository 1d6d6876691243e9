"""Bit-exactness of every kernel's integer algorithm: the unscheduled PrimFuncs (the TIR the CUDA
schedules start from) built for llvm, run through the runner's PlanRunner, vs IntegerGraph.run."""

from __future__ import annotations

import numpy as np
import pytest

from tests.backends.cuda.cuda_graphs import cnn, linear_on_matrix, mixed_net, mlp, residual_net, vision_net
from tests.export.integer_graphs import sample_inputs

from fxquant.backends.cuda.cpu_check import build_llvm, run_llvm
from fxquant.backends.cuda.plan import plan_graph

GRAPHS = {"mlp": mlp, "cnn": cnn, "residual": residual_net, "mixed": mixed_net, "vision": vision_net,
          "token_linear": linear_on_matrix}


@pytest.fixture(scope="module")
def built() -> dict:
    out = {}
    for name, make in GRAPHS.items():
        graph = make()
        plan = plan_graph(graph)
        out[name] = (graph, plan, build_llvm(plan))
    return out


@pytest.mark.parametrize("name", list(GRAPHS))
@pytest.mark.parametrize("batch", [1, 5, 64])  # 64: the linear layers' large-batch kernels
def test_bit_exact_on_cpu(built: dict, name: str, batch: int) -> None:
    graph, plan, lib = built[name]
    x = sample_inputs(graph, batch, seed=batch)
    ref = graph.run(*graph.quantize_inputs(x))
    (got,) = run_llvm(plan, lib, x)
    np.testing.assert_array_equal(got, ref[graph.outputs[0]])


def test_input_quantizer_rounds_half_to_even_and_saturates(built: dict) -> None:
    import tvm

    graph, plan, lib = built["mlp"]
    fl = graph.inputs[0].fmt.frac_bits
    x = np.ldexp(np.array([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 1000.0, -1000.0] * 2]), -fl).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(x.shape, np.int8))
    lib[plan.launches[0].kernel](tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), graph.quantize_inputs(x)[0])
    assert list(out.numpy()[0, :8]) == [0, 2, 2, 0, -2, -2, 127, -128]


def test_runner_drives_the_kernels_through_dlpack_with_torch_tensors(built: dict) -> None:
    """run_cuda.PlanRunner with torch tensors (CPU here, CUDA on a GPU host) passed via DLPack."""
    import torch
    from fxquant.backends.cuda.run_cuda import PlanRunner

    graph, plan, lib = built["residual"]
    runner = PlanRunner(plan.to_json(), lambda name: lib[name], lambda shape, dtype: torch.empty(shape, dtype=getattr(torch, dtype)),
                        {k: torch.from_numpy(v) for k, v in plan.params.items()})
    x = sample_inputs(graph, 3)
    (got,) = runner.run({"input": torch.from_numpy(x)}, runner.buffers(3))
    np.testing.assert_array_equal(got.numpy(), graph.run(*graph.quantize_inputs(x))[graph.outputs[0]])


def test_resnet20_is_bit_exact_on_cpu() -> None:
    """The benchmark network: 21 convs (9 residual adds fused), global average pool, linear."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    from onnx_latency import resnet20

    graph = resnet20()
    plan = plan_graph(graph)
    assert sum(len(launch.ops) == 2 for launch in plan.launches) == 9
    x = sample_inputs(graph, 2)
    (got,) = run_llvm(plan, build_llvm(plan), x)
    np.testing.assert_array_equal(got, graph.run(*graph.quantize_inputs(x))[graph.outputs[0]])
