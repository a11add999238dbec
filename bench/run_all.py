"""Run every benchmark, one after another, and write BENCHMARKS.md.

    bash scripts/bench.sh                      # all of them, full size (see README)
    .venv/bin/python bench/run_all.py --only checkpoint,data --repeats 5
    .venv/bin/python bench/run_all.py --tiny --output /tmp/B.md   # seconds: checks they run

Each benchmark is a script `bench/bench_<name>.py` run in its own process (so one's Ray,
DeepSpeed or thread settings never leak into the next); it measures lmforge and its
baseline alternately and prints one `BENCH_RESULT {json}` line, collected here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MARKER, REPO, machine_info  # noqa: E402

# In the order they run; each is bench/bench_<name>.py.
ORDER = ["train", "data", "prepare", "generate", "checkpoint", "jobstart"]
BENCHMARKS = [n for n in ORDER if (REPO / "bench" / f"bench_{n}.py").is_file()]


def run_one(name: str, tiny: bool, repeats: int | None) -> tuple[dict | None, float, str]:
    script = REPO / "bench" / f"bench_{name}.py"
    cmd = [sys.executable, str(script), *(["--tiny"] if tiny else [])]
    if repeats:
        cmd += ["--repeats", str(repeats)]
    print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    result, tail = None, []
    for line in proc.stdout:
        if line.startswith(MARKER):
            result = json.loads(line[len(MARKER) :])
            continue
        sys.stdout.write(line)
        tail = (tail + [line])[-20:]
    proc.wait()
    if proc.returncode != 0 and result is None:
        print(f"### {name} FAILED (exit {proc.returncode})", flush=True)
    return result, time.perf_counter() - t0, "".join(tail)


def _num(x: float) -> str:
    return f"{x:,.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def _spread(d: dict | None) -> str:
    if not d:
        return ""
    return f"{_num(d['median'])} ({_num(d['min'])}-{_num(d['max'])})"


def to_markdown(results: dict[str, dict | None], seconds: dict[str, float], args) -> str:
    m = machine_info()
    lines = [
        "# Benchmarks",
        "",
        f"Written by `bench/run_all.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
        f"at commit `{m['commit']}`{' (--tiny: sizes too small to mean anything)' if args.tiny else ''}.",
        "Each figure is lmforge's, measured alternately with its baseline in the same process "
        "or invocation; values are median (min-max) over the repeats, ratios are per-repeat "
        "ratios lmforge / baseline.",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}, "
        f"avx512_bf16: {'yes' if m['avx512_bf16'] else 'no'}",
        f"- Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- reproduce: `bash scripts/bench.sh{' --tiny' if args.tiny else ''}`",
        "",
    ]
    for name, r in results.items():
        lines += [f"## {name}", ""]
        if r is None:
            lines += [
                f"Did not produce a result (see the bench log); ran {seconds[name]:.0f} s.",
                "",
            ]
            continue
        lines += [
            "| figure | lmforge | baseline | ratio | target | met |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for f in r["figures"]:
            base = f"{f['baseline']}: {_spread(f['baseline_value'])}" if f["baseline"] else ""
            ratio = _spread(f["ratio"]).replace(" (", "x (") if f["ratio"] else ""
            met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
            note = f" ({f['note']})" if f.get("note") else ""
            lines.append(
                f"| {f['name']}{note} | {_spread(f['value'])} {f['unit']} | {base} | {ratio} "
                f"| {f['target']} | {met} |"
            )
        config = {k: v for k, v in r.get("config", {}).items() if k != "machine"}
        lines += ["", f"Config: `{json.dumps(config)}`; ran {seconds[name]:.0f} s.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks that all run")
    p.add_argument("--repeats", type=int, default=None, help="override each one's repeats")
    p.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    results, seconds = {}, {}
    for name in names:
        results[name], seconds[name], _ = run_one(name, args.tiny, args.repeats)
    args.output.write_text(to_markdown(results, seconds, args))
    print(f"\nwrote {args.output}")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
