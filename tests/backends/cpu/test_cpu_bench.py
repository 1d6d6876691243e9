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
