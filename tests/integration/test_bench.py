"""Every benchmark runs at its tiny size and prints its figures (no timing assertions:
speed is measured by `bash scripts/bench.sh`, never asserted in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.common import MARKER
from tests.conftest import REPO

SCRIPTS = sorted(p.stem.removeprefix("bench_") for p in (REPO / "bench").glob("bench_*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_runs_tiny_and_reports_its_figures(name, ray_cluster, dataset):
    extra = ["--data", str(dataset)] if name == "jobstart" else []
    out = subprocess.run(
        [sys.executable, f"bench/bench_{name}.py", "--tiny", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ},
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(MARKER)]
    assert len(lines) == 1, out.stdout[-2000:]
    result = json.loads(lines[0][len(MARKER) :])
    assert result["benchmark"] and result["figures"]
    for f in result["figures"]:
        assert (
            f["name"]
            and f["unit"]
            and f["value"]["min"] <= f["value"]["median"] <= f["value"]["max"]
        )
        if f["ratio"] is not None:
            assert f["baseline"] and f["baseline_value"]["median"] > 0
            assert f["target"] == "" or f["met"] in (True, False)
    assert f"== {result['benchmark']} ==" in out.stdout  # the human-readable part


def test_run_all_writes_benchmarks_md(tmp_path):
    """The report writer on a recorded result (running every benchmark twice is too slow)."""
    from bench import run_all
    from bench.common import Figure

    fig = Figure.ratio_of("x", "tokens/s", [2.0, 3.0], [4.0, 3.0], baseline="plain", target=0.9)
    results = {"data": {"figures": [fig.__dict__], "config": {"k": 1}}, "prepare": None}

    class Args:
        tiny = False

    md = run_all.to_markdown(results, {"data": 1.0, "prepare": 2.0}, Args())
    assert "| x | 2.5 (2-3) tokens/s | plain: 3.5 (3-4) | 0.75x (0.5-1) | >= 0.9x | **no** |" in md
    assert "Did not produce a result" in md and "machine:" in md
