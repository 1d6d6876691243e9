"""The hand-written HLS requantize (templates/fxq_common.h) against fixed_point.requantize.

Random accumulators plus every tie (``m * 2^s + 2^(s-1)``) and the saturation edges, for
accumulator widths 4..62, output widths 2..16 and shifts -62..+40, in one small g++ build.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fxquant.backends.fpga.csim import ap_types_dir
from fxquant.backends.fpga.codegen import TEMPLATES
from fxquant.fixed_point import FixedPoint, requantize

COMBOS = [(w, bw, shift) for w, bw, shift in [
    (4, 2, 0), (4, 2, -3), (4, 2, -4), (4, 2, -7), (8, 8, 0), (8, 3, 5), (8, 16, 8), (8, 4, -1), (8, 4, -2),
    (17, 8, -9), (17, 2, -16), (17, 16, -1), (17, 5, 3), (17, 3, 1), (17, 16, 15), (17, 16, 16), (17, 16, 40),
    (33, 8, -25), (33, 16, -17), (33, 2, -32), (33, 2, -33), (33, 7, -40), (33, 12, 2), (40, 4, -36),
    (48, 16, -30), (48, 9, -47), (48, 9, -48), (62, 16, -46), (62, 3, -60), (62, 16, 0), (62, 16, -62),
    (62, 10, 1), (62, 5, -1), (24, 6, 20), (24, 6, 5), (12, 16, 4), (12, 12, 0),
]]
PER_COMBO = 600


def _samples(rng: np.random.Generator, w: int, shift: int) -> np.ndarray:
    lo, hi = -(1 << (w - 1)), (1 << (w - 1)) - 1
    vals = [rng.integers(lo, hi, size=PER_COMBO // 2, endpoint=True),
            rng.integers(-256, 256, size=64), np.array([lo, hi, 0, -1, 1, lo + 1, hi - 1])]
    if shift < 0:
        s = -shift
        m = rng.integers(lo >> s, hi >> s, size=PER_COMBO // 4, endpoint=True)
        ties = m * (1 << s) + (1 << (s - 1))
        vals += [ties, ties - 1, ties + 1]
    v = np.concatenate(vals).astype(np.int64)
    return v[(v >= lo) & (v <= hi)]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[tuple[int, int, int], np.ndarray, np.ndarray]]:
    assert shutil.which("g++"), "g++ is required: the FPGA backend C-simulates with it"
    rng = np.random.default_rng(7)
    tmp = tmp_path_factory.mktemp("requantize")
    inputs = [_samples(rng, w, shift) for w, _, shift in COMBOS]
    (tmp / "in.txt").write_text("\n".join(" ".join(map(str, v.tolist())) for v in inputs) + "\n")
    calls = "\n".join(f"    run<{w}, {bw}, {shift}>(f, {len(v)});" for (w, bw, shift), v in zip(COMBOS, inputs))
    (tmp / "t.cpp").write_text(f"""#include <cstdio>
#include "fxq_common.h"
template <int W, int BW, int SHIFT> void run(FILE *f, int n) {{
    for (int i = 0; i < n; i++) {{
        long long v; if (std::fscanf(f, "%lld", &v) != 1) return;
        std::printf("%lld ", (long long)fxq::requantize<BW, SHIFT>(ap_int<W>(v)).to_int64());
    }}
    std::printf("\\n");
}}
int main() {{
    FILE *f = std::fopen("in.txt", "r");
{calls}
    return 0;
}}
""")
    subprocess.run(["g++", "-O1", "-std=c++14", "-w", f"-I{TEMPLATES}", f"-I{ap_types_dir()}", "t.cpp", "-o", "t"],
                   cwd=tmp, check=True)
    lines = subprocess.run(["./t"], cwd=tmp, check=True, capture_output=True, text=True).stdout.splitlines()
    return [(c, v, np.array(line.split(), dtype=np.int64)) for c, v, line in zip(COMBOS, inputs, lines, strict=True)]


def test_requantize_header_matches_reference(results: list) -> None:
    for (w, bw, shift), acc, got in results:
        want = requantize(acc, 0, FixedPoint(bw, shift))
        bad = np.flatnonzero(got != want)
        assert bad.size == 0, f"W={w} BW={bw} shift={shift}: acc {acc[bad[:5]]} -> {got[bad[:5]]}, want {want[bad[:5]]}"


def test_large_right_shift_rounds_to_zero(results: list) -> None:
    """s >= W: |acc| <= 2^(s-1), so every value (and the one tie, -2^(W-1) when s == W) becomes 0."""
    for (w, _, shift), _, got in results:
        if -shift >= w:
            assert not got.any()
