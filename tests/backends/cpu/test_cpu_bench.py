"""``fxquant bench --target cpu`` on int64 token ids: PyTorch, ORT FP32/QDQ and fxquant-TVM all take them."""

from __future__ import annotations

import numpy as np

from tests.test_bench import VOCAB, token_run  # noqa: F401


def test_bench_cpu_on_token_ids(token_run):  # noqa: F811
    from fxquant.backends.cpu.bench import bench_cpu, tvm_runner
    from fxquant.backends.cpu.build import CpuModel
    from fxquant.bench import batch_inputs
    from fxquant.deployment import load_deployment

    report = bench_cpu(token_run, batches=(1, 40), threads=1, budget_s=0.1)
    engines = {r["engine"] for r in report["rows"]}
    assert engines == {"ORT FP32", "PyTorch eager FP32", "ORT fxquant QDQ", "fxquant-TVM"}
    assert all(r["verified"] for r in report["rows"] if r["engine"] == "fxquant-TVM")

    dep = load_deployment(token_run)
    model = CpuModel.load(token_run / "cpu")
    assert model.input_dtypes == ["int32"]
    x = batch_inputs(dep.held_out(32)[0], 40)
    assert x[0].dtype == np.int64 and x[0].max() < VOCAB
    y = tvm_runner(model, x)()  # int64 ids staged as the module's int32
    expected = dep.graph.run(*dep.graph.quantize_inputs(*x))[dep.graph.outputs[0]]
    np.testing.assert_array_equal(y.astype(np.int64), expected)


def test_tvm_thread_pool_is_sized_before_first_use_and_checked() -> None:
    """In fresh processes. A model loaded first runs on TVM's default count (here the user's
    ``TVM_NUM_THREADS=1``) on a pool reserved for every logical CPU, so a bench in the same process
    can still ask 2, then 1, then 2 again (``config_threadpool`` cannot grow a pool, only use less of
    it); ``TVM_NUM_THREADS`` is set so kernels skip their per-launch sysfs read. A pool that TVM sized
    at 1 before fxquant saw it refuses 2 with a ToolchainError naming the fix, instead of timing TVM
    on 1."""
    import os
    import subprocess
    import sys

    code = """
import os
if os.environ["FXQ_CASE"] == "early":
    import tvm
    tvm.get_global_func("runtime.NumThreads")()  # TVM sizes its pool before fxquant is imported
from fxquant.backends.cpu.build import default_tvm_threads, set_tvm_threads
from fxquant.errors import ToolchainError
if os.environ["FXQ_CASE"] == "late":
    print(set_tvm_threads(), default_tvm_threads(), set_tvm_threads(2), set_tvm_threads(1), set_tvm_threads(2),
          int(os.environ["TVM_NUM_THREADS"]) >= max(2, os.cpu_count()))
else:
    print(set_tvm_threads(1), end=" ")
    try:
        set_tvm_threads(2)
    except ToolchainError as exc:
        print("refused", "TVM_NUM_THREADS=2" in str(exc))
"""
    env = {**os.environ, "TVM_NUM_THREADS": "1"}
    late = subprocess.run([sys.executable, "-c", code], env={**env, "FXQ_CASE": "late"}, capture_output=True,
                          text=True, timeout=120)
    assert late.stdout.split() == ["1", "1", "2", "1", "2", "True"], late.stdout + late.stderr
    early = subprocess.run([sys.executable, "-c", code], env={**env, "FXQ_CASE": "early"}, capture_output=True,
                           text=True, timeout=120)
    assert early.stdout.split() == ["1", "refused", "True"], early.stdout + early.stderr
