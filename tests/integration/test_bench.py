"""One benchmark section run for real at its tiny size (no timing assertions: speed is
measured by `bash scripts/bench.sh`, never asserted in tests; `bash scripts/bench.sh --tiny
--output /tmp/B.md` runs every section). run_all's bookkeeping: tests/unit/test_bench_report.py.

The section run here is `train` (bench/bench_train.py, gpt2): it uses every helper of
bench/common.py (bench_args, alternate, spread, Figure.ratio_of with targets, report,
machine_info), the plain-loop baseline (bench/plain_loop.py) and lmforge's own train job on
Ray Train, so it runs more of the shared bench code than any other section; the others add
only their own script."""

from __future__ import annotations

import json
import os
import subprocess

from bench.common import MARKER
from bench.run_all import command
from tests.conftest import REPO


def test_the_train_benchmark_runs_tiny_and_reports_its_figures(ray_cluster):
    out = subprocess.run(
        command("train", tiny=True),
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ},
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, out.stdout[-2000:]
    result = json.loads(lines[0][len(MARKER) :])
    assert result["benchmark"] == "train" and result["figures"]
    assert result["config"]["model"]["arch"] == "gpt2"
    ratios = [f for f in result["figures"] if f["ratio"] is not None]
    assert ratios, result["figures"]  # lmforge against the plain loop
    for f in result["figures"]:
        assert (
            f["name"]
            and f["unit"]
            and f["value"]["min"] <= f["value"]["median"] <= f["value"]["max"]
        )
        if f["ratio"] is not None:
            assert f["baseline"] and f["baseline_value"]["median"] > 0
            assert f["target"] == "" or f["met"] in (True, False)
    assert "== train ==" in out.stdout  # the human-readable part
