"""Run every benchmark, one after another, and write BENCHMARKS.md.

    bash scripts/bench.sh                      # all of them, full size (see README)
    .venv/bin/python bench/run_all.py --only checkpoint,data --repeats 5
    .venv/bin/python bench/run_all.py --only train-llama,generate-llama --note "machine shared"
    .venv/bin/python bench/run_all.py --tiny --output /tmp/B.md   # seconds: checks they run

Each section of BENCHMARKS.md is a script `bench/bench_<script>.py` with its arguments
(`SECTIONS`: e.g. `train-llama` is `bench_train.py --arch llama`), run in its own process
(so one's Ray, DeepSpeed or thread settings never leak into the next); it measures lmforge
and its baseline alternately and prints one `BENCH_RESULT {json}` line, collected here.

With `--only`, the other sections of the existing output file are kept as they were, so
rerunning one benchmark does not drop the rest; a hand-written last section `## Notes`
(profiles, caveats) is always kept. Every section says when it was measured
(date, commit, whether the tree had uncommitted changes, the load average sampled while it
ran, and `--note`), since kept sections can be older than the file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MARKER, REPO, cpu_flags_line, machine_info  # noqa: E402

# The sections of BENCHMARKS.md in the order they run: (bench/bench_<script>.py, arguments).
# The script reports under the section's name (bench_train.py --arch llama: train-llama).
SECTIONS = {
    "train": ("train", []),
    "train-small": ("train", ["--shape", "small"]),
    "train-llama": ("train", ["--arch", "llama"]),
    "train-lstm": ("train", ["--arch", "lstm"]),
    "data": ("data", []),
    "mixture": ("mixture", []),
    "dpo": ("dpo", []),
    "prepare": ("prepare", []),
    "generate": ("generate", []),
    "generate-llama": ("generate", ["--arch", "llama"]),
    "eval": ("eval", []),
    "eval-beside": ("eval", ["--what", "beside"]),
    "serve": ("serve", []),
    "checkpoint": ("checkpoint", []),
    "jobstart": ("jobstart", []),
    # How cost grows (bench_growth.py): each writes a PNG under bench/plots/, linked here.
    "growth-model": ("growth", ["--what", "model"]),
    "growth-data": ("growth", ["--what", "data"]),
    "growth-workers": ("growth", ["--what", "workers"]),
    "growth-options": ("growth", ["--what", "options"]),
}
BENCHMARKS = [n for n, (s, _) in SECTIONS.items() if (REPO / "bench" / f"bench_{s}.py").is_file()]


def command(name: str, tiny: bool, repeats: int | None = None) -> list[str]:
    """The command line that measures section `name`."""
    script, extra = SECTIONS[name]
    cmd = [sys.executable, str(REPO / "bench" / f"bench_{script}.py"), *extra]
    return cmd + (["--tiny"] if tiny else []) + (["--repeats", str(repeats)] if repeats else [])


class LoadSampler:
    """This machine's 1-minute load average every `every` seconds while a benchmark runs
    (the benchmark's own processes included): how shared the machine was."""

    def __init__(self, every: float = 5.0) -> None:
        self.every, self.samples = every, [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])


def stamp(tiny: bool, note: str = "", load: list[float] | None = None) -> str:
    """The line under a section's heading: when, at which commit, on how busy a machine."""
    m = machine_info()
    # The report itself and its plots do not count: this run writes them after each section.
    outputs = [":(exclude)BENCHMARKS.md", ":(exclude)bench/plots"]
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", *outputs], cwd=REPO)
    dirty = dirty.returncode != 0
    line = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit "
        f"`{m['commit']}`{' (with uncommitted changes in the tree)' if dirty else ''}"
    )
    if load:
        line += (
            f"; load average while it ran {statistics.median(load):.1f} (median; "
            f"{min(load):.1f}-{max(load):.1f}) on {m['cores']} cores, its own processes included"
        )
    if tiny:
        line += "; --tiny: sizes too small to mean anything"
    return line + (f"; {note}" if note else "") + "."


def run_one(name: str, tiny: bool, repeats: int | None) -> tuple[dict | None, float, str]:
    cmd = command(name, tiny, repeats)
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


def _ratio(d: dict | None) -> str:
    return _spread(d).replace(" (", "x (") if d else ""


def _peer_cells(p: dict) -> str:
    """A peer's two cells: its value, then lmforge / it with its goal and whether met."""
    goal = ""
    if p.get("target"):
        goal = f", goal {p['target']}: {'yes' if p['met'] else '**no**'}"
    return f"{_spread(p['value'])} | {_ratio(p['ratio'])}{goal}"


NOTES = "Notes"  # a hand-written last section (profiles, caveats): always kept
HEADER_STAMP = re.compile(r"(?:Written|Updated) by `bench/run_all.py` on (.+?) at commit `(\w+)`")


def read_sections(text: str) -> dict[str, str]:
    """The sections of an existing BENCHMARKS.md: name -> its body (the lines after its
    heading). A measured section without its own "Measured ..." line (a file written before
    sections had one) gets the file header's date and commit."""
    header = HEADER_STAMP.search(text.split("\n## ", 1)[0])
    sections = {}
    for chunk in re.split(r"^## ", text, flags=re.MULTILINE)[1:]:
        name, _, body = chunk.partition("\n")
        body = body.strip("\n")
        if not body.startswith("Measured ") and header and name.strip() != NOTES:
            date, commit = header.groups()
            body = f"Measured {date} at commit `{commit}` (the file's date then).\n\n" + body
        sections[name.strip()] = body
    return sections


def kept_sections(output: Path, rerun_all: bool) -> dict[str, str]:
    """What stays of the previous file: every section but those rerun (`--only`), or only
    the hand-written notes when everything is rerun."""
    kept = read_sections(output.read_text()) if output.is_file() else {}
    return {k: v for k, v in kept.items() if k == NOTES} if rerun_all else kept


def section_lines(r: dict | None, seconds: float, stamp_line: str = "") -> list[str]:
    """One section's body: its stamp, its table of figures and its config line."""
    lines = [stamp_line, ""] if stamp_line else []
    if r is None:
        return lines + [f"Did not produce a result (see the bench log); ran {seconds:.0f} s."]
    # A column pair per peer (what a user would run instead: `Figure.peers`), after the
    # baseline's columns, in the order the figures first name them.
    peers = list(dict.fromkeys(p["peer"] for f in r["figures"] for p in f.get("peers") or []))
    head = "| figure | lmforge | baseline | ratio | target | met |"
    head += "".join(f" {name} | lmforge / {name} |" for name in peers)
    lines += [head, "|" + " --- |" * (6 + 2 * len(peers))]
    for f in r["figures"]:
        base = f"{f['baseline']}: {_spread(f['baseline_value'])}" if f["baseline"] else ""
        ratio = _ratio(f["ratio"])
        met = "" if f["met"] is None else ("yes" if f["met"] else "**no**")
        note = f" ({f['note']})" if f.get("note") else ""
        row = (
            f"| {f['name']}{note} | {_spread(f['value'])} {f['unit']} | {base} | {ratio} "
            f"| {f['target']} | {met} |"
        )
        theirs = {p["peer"]: p for p in f.get("peers") or []}
        for name in peers:
            p = theirs.get(name)
            row += f" {_peer_cells(p)} |" if p else "  |  |"
        lines.append(row)
    config = {k: v for k, v in r.get("config", {}).items() if k != "machine"}
    if config.get("plot"):  # a PNG the benchmark wrote, relative to the repo root
        lines += ["", f"![{r['benchmark']}]({config['plot']})"]
    return lines + ["", f"Config: `{json.dumps(config)}`; ran {seconds:.0f} s."]


def to_markdown(
    results: dict[str, dict | None],
    seconds: dict[str, float],
    args,
    stamps: dict[str, str] | None = None,
    kept: dict[str, str] | None = None,
) -> str:
    """BENCHMARKS.md from this invocation's `results` (each under its `stamps` line) and
    the `kept` sections of the previous file (bodies as `read_sections` returns them)."""
    m = machine_info()
    stamps, kept = stamps or {}, {k: v for k, v in (kept or {}).items() if k not in results}
    when = f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at commit `{m['commit']}`"
    tiny = " (--tiny: sizes too small to mean anything)" if args.tiny else ""
    if set(kept) - {NOTES}:
        what = (
            f"Updated by `bench/run_all.py` {when}{tiny}: reran {', '.join(results)}; the "
            "other sections are kept from the previous file (each says when it was measured)."
        )
    else:
        what = f"Written by `bench/run_all.py` {when}{tiny}."
    lines = [
        "# Benchmarks",
        "",
        what,
        "Each figure is lmforge's, measured alternately with its baseline in the same process "
        "or invocation; values are median (min-max) over the repeats, ratios are per-repeat "
        "ratios lmforge / baseline.",
        "",
        f"- machine{' (of the sections rerun now)' if set(kept) - {NOTES} else ''}: {m['cpu']}, "
        f"{m['cores']} cores, GPU: {m['gpu']}, "
        f"avx512_bf16: {'yes' if m['avx512_bf16'] else 'no'}; {cpu_flags_line(m)}",
        f"- Python {m['python']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- reproduce: `bash scripts/bench.sh{' --tiny' if args.tiny else ''}`",
        "",
    ]
    known = [n for n in SECTIONS if n in results or n in kept]
    others = [n for n in [*results, *kept] if n not in SECTIONS and n != NOTES]
    for name in known + others + ([NOTES] if NOTES in kept else []):
        lines += [f"## {name}", ""]
        if name in results:
            lines += section_lines(results[name], seconds[name], stamps.get(name, ""))
        else:
            lines += kept[name].splitlines()
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}; the "
                   "output's other sections are kept")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="tiny sizes: checks that all run")
    p.add_argument("--repeats", type=int, default=None, help="override each one's repeats")
    p.add_argument("--note", default="",
                   help="added to each measured section's line, e.g. 'machine shared'")  # fmt: skip
    p.add_argument("--output", type=Path, default=REPO / "BENCHMARKS.md")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")
    results, seconds, stamps = {}, {}, {}
    for i, name in enumerate(names):
        with LoadSampler() as load:
            results[name], seconds[name], _ = run_one(name, args.tiny, args.repeats)
        stamps[name] = stamp(args.tiny, args.note, load.samples)
        # Written after each section, so a run stopped part-way keeps what it measured; the
        # sections not rerun yet stay until the last write. Read each time, not once at the
        # start: another --only run may have written meanwhile.
        last = i == len(names) - 1
        kept = kept_sections(args.output, rerun_all=last and not args.only)
        args.output.write_text(to_markdown(results, seconds, args, stamps, kept))
        print(f"\nwrote {args.output} ({i + 1} of {len(names)} sections measured)", flush=True)
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
