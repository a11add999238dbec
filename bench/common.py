"""What every benchmark shares: the machine, interleaved repeats, ratios with spread, and
one JSON line per benchmark for `bench/run_all.py` to turn into BENCHMARKS.md.

Each benchmark measures lmforge and its baseline in the same invocation, alternating
(A B A B ...), so machine noise lands on both and mostly cancels in the ratio.

A benchmark script:

    from bench.common import Figure, alternate, report, bench_args
    args = bench_args("train throughput").parse_args()
    runs = alternate({"lmforge": run_ours, "plain": run_plain}, args.repeats)
    report("train", [Figure.ratio_of("ZeRO 1 fp32", "tokens/s", runs["lmforge"], runs["plain"],
                                     baseline="plain PyTorch loop", target=0.90)], config={...})
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MARKER = "BENCH_RESULT "  # the line run_all.py collects


def bench_args(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--tiny", action="store_true",
                   help="smallest sizes and one repeat: checks that it runs, not how fast")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats (default 3)")
    return p


def alternate(fns: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run each function `repeats` times, interleaved: A B A B ... (A first, then B first)."""
    out: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            out[name].append(fns[name]())
    return out


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@dataclass
class Figure:
    """One measured figure, its baseline, and the ratio of the two (over paired repeats)."""

    name: str
    unit: str
    value: dict[str, float]  # min / median / max of lmforge's repeats
    baseline: str = ""
    baseline_value: dict[str, float] | None = None
    ratio: dict[str, float] | None = None  # min / median / max of per-repeat ratios
    target: str = ""  # e.g. ">= 0.90x"
    met: bool | None = None
    note: str = ""
    # What a user would run instead (issue 31): one entry a peer, each its own column pair
    # in BENCHMARKS.md: {"peer", "value", "ratio" (lmforge / it, per repeat), "target", "met"}.
    peers: list[dict[str, Any]] = field(default_factory=list)

    def add_peer(
        self, peer: str, ours: list[float], theirs: list[float], target: float | None = None
    ) -> Figure:
        """Add `peer`'s repeats (paired with `ours` as alternated) and lmforge / it."""
        ratio = spread([a / b for a, b in zip(ours, theirs, strict=True)])
        self.peers.append({
            "peer": peer, "value": spread(theirs), "ratio": ratio,
            "target": "" if target is None else f">= {target:g}x",
            "met": None if target is None else ratio["median"] >= target,
        })  # fmt: skip
        return self

    @classmethod
    def ratio_of(
        cls,
        name: str,
        unit: str,
        ours: list[float],
        theirs: list[float],
        baseline: str,
        target: float | None = None,
        higher_is_better: bool = True,
        note: str = "",
    ) -> Figure:
        ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
        r = spread(ratios)
        met = None
        if target is not None:
            met = r["median"] >= target if higher_is_better else r["median"] <= target
        return cls(
            name=name, unit=unit, value=spread(ours), baseline=baseline,
            baseline_value=spread(theirs), ratio=r,
            target="" if target is None else f"{'>=' if higher_is_better else '<='} {target:g}x",
            met=met, note=note,
        )  # fmt: skip


@dataclass
class Result:
    benchmark: str
    figures: list[Figure]
    config: dict[str, Any] = field(default_factory=dict)


def report(benchmark: str, figures: list[Figure], config: dict[str, Any] | None = None) -> None:
    """Print the figures for a person, then one machine-readable line for run_all.py."""
    print(f"\n== {benchmark} ==")
    for f in figures:
        line = f"{f.name}: {f.value['median']:,.4g} {f.unit}"
        if f.ratio:
            line += (
                f" | {f.baseline} {f.baseline_value['median']:,.4g} | ratio "
                f"{f.ratio['median']:.3f}x (min {f.ratio['min']:.3f}, max {f.ratio['max']:.3f})"
            )
        if f.target:
            line += f" | target {f.target}: {'met' if f.met else 'NOT met'}"
        for peer in f.peers:
            line += (
                f" | {peer['peer']} {peer['value']['median']:,.4g}, lmforge / it "
                f"{peer['ratio']['median']:.3f}x"
            )
            if peer["target"]:
                line += f" (goal {peer['target']}: {'met' if peer['met'] else 'NOT met'})"
        print(line)
    result = Result(benchmark, figures, config or {})
    print(MARKER + json.dumps(asdict(result)), flush=True)


# CPU features that pick the matmul kernels: fp32 (AVX2/AVX-512) and bf16 (AVX512-BF16, AMX).
MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags_line(m: dict[str, Any]) -> str:
    """The machine's matmul-relevant CPU flags, for a report: which bf16 path it has."""
    flags = m.get("cpu_flags") or []
    fast = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    bf16 = f"bf16 matmuls: {' + '.join(fast)}" if fast else "bf16 matmuls: fallback kernels"
    return f"CPU flags {' '.join(flags) or 'unknown'} ({bf16})"


def machine_info() -> dict[str, Any]:
    import torch

    cpu, flags = platform.processor() or platform.machine(), ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in ("", platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    versions = {}
    for dist in ("torch", "deepspeed", "ray", "mlflow", "tokenizers", "pyarrow", "transformers"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO
    ).stdout.strip()
    have = set(flags.partition(":")[2].split())
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in have,
        # the flags that decide matmul speed per dtype (bf16: avx512_bf16 or AMX)
        "cpu_flags": [f for f in MATMUL_FLAGS if f in have],
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": sys.version.split()[0],
        "versions": versions,
        "commit": commit,
    }
