"""The soundness issue's failures, end to end from the CLI: train → export onnx-qdq/cpu/fpga → bench.

Each scenario once broke the chain or, worse, exported "bit-exact" artifacts of the wrong model.
Now every export must prove two things, recorded in ``RUN/<target>/report.json``: the integer
reference equals the trained fake-quant model (``reference_check``) and the artifact equals the
reference (``verification``); bench times only such verified artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_train_cli import DIGITS, fxquant

SCENARIOS = Path(__file__).with_name("scenarios")
N_VERIFY = 64
CASES = {
    # 12-bit weights once exported to CPU as int8-cast garbage ("differs in 3540 of 3600 elements")
    "weights12": (DIGITS, ["--bits", "12", "--act-bits", "8"]),
    "kwargs_functional": (SCENARIOS / "kwargs_functional.py", ["--bits", "8"]),
    "add_alpha": (SCENARIOS / "add_alpha.py", ["--bits", "8"]),
    "export_batchnorm": (SCENARIOS / "export_batchnorm.py", ["--bits", "8"]),
    "flatten_first": (SCENARIOS / "flatten_first.py", ["--bits", "8"]),
    "flatten_shapes": (SCENARIOS / "flatten_shapes.py", ["--bits", "8"]),
}


REFUSED = {
    # (case, target): the fragment of the one-line refusal. Declared as data: a refusal not listed
    # here fails, and a listed one that now exports fails too (the table stays true).
    # none today: onnx-qdq, cpu and fpga build linear on any rank since issue 14 (flatten_shapes exports)
}


def _report(run: Path, target: str) -> dict:
    return json.loads((run / target / "report.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_train_export_bench(case, tmp_path):
    model_py, bits = CASES[case]
    run = tmp_path / case
    proc = fxquant("train", "--policy", "static", *bits, str(model_py), "--out", str(run), "--epochs", "1",
                   "--no-progress")
    assert proc.returncode == 0, proc.stderr
    exported = []
    for target in ("onnx-qdq", "cpu", "fpga"):
        proc = fxquant("export", "--target", target, str(run), "--verify", str(N_VERIFY))
        if (case, target) in REFUSED:  # a clean, complete refusal: one line, exit 2, nothing placed
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
            assert proc.stderr.startswith("error: ") and REFUSED[case, target] in proc.stderr, proc.stderr
            assert "docs/coverage.md" in proc.stderr and not (run / target).exists()
            continue
        assert proc.returncode == 0, f"{case} → {target}: {proc.stderr}"
        exported.append(target)
        report = _report(run, target)
        assert report["target"] == target
        reference, verification = report["reference_check"], report["verification"]
        assert reference["n"] == N_VERIFY and reference["mismatched_elements"] == 0, reference
        assert verification["n"] == N_VERIFY and verification["mismatched_elements"] == 0, verification
        assert report["bit_exact"] is True
    for target in ("onnx-qdq", "cpu"):
        proc = fxquant("bench", str(run), "--target", target, "--batch", "1")
        if target in exported:
            assert proc.returncode == 0, f"{case} bench {target}: {proc.stderr}"
            bench = json.loads((run / f"bench-{target}.json").read_text())
            timed = [r for r in bench["rows"] if r.get("verified")]
            assert timed and all(r["graph_fingerprint"] == _report(run, target)["graph_fingerprint"] for r in timed)
        else:  # bench never times what could not be exported and verified
            assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
