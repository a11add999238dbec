"""Prepare throughput: MB/s of raw text turned into token shards by `prepare()`, against the
tokenizer's own `encode_batch` on the same text in one process; and how prepare scales
from one CPU to all of them.

    .venv/bin/python bench/bench_prepare.py            # all 21 plays (2.7 MB), 3 repeats
    .venv/bin/python bench/bench_prepare.py --tiny     # 3 plays: checks it runs

`prepare()` is timed end to end (Ray Data reading and tokenizing one file per task, the
driver packing rows and writing shards, hashes, manifest, rename into place) with one
tokenizer trained beforehand and passed as `PrepareOptions(tokenizer=...)`, so tokenizer
training is not timed. The baseline reads the same files and calls
`Tokenizer.encode_batch` on their texts in this process, with the tokenizers library's own
thread pool on every core (its default): what a user would write without Ray.

Ray is a private local instance with every core of this machine, started here (one first
prepare warms its workers up and is not counted). The 1-CPU runs cap prepare at one tokenize task at a time
(`PrepareOptions(max_tasks=1)`, Ray Data's `TaskPoolStrategy(size=1)`) in the same Ray
instance, so they alternate with the others; the driver's own work is not capped. Targets (issue 16): prepare >= 0.8x `encode_batch`, and >= 1.8x from 1 to 2 CPUs
(ideal: the number of CPUs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Figure, alternate, bench_args, machine_info, report  # noqa: E402


def start_ray(num_cpus: int) -> None:
    """A private local Ray, set up as `lmforge.cluster.connect()` sets up its own."""
    from lmforge.cluster import LOCAL_ENV, ensure_token

    os.environ.update(LOCAL_ENV)  # before Ray is imported: it reads them once
    ensure_token()
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def trained_tokenizer(plays: list[Path], vocab: int) -> Path:
    """A tokenizer trained once on `plays` and cached under `$LMFORGE_HOME/bench/`."""
    from lmforge import paths
    from lmforge.tokenizer import train_tokenizer

    path = paths.home() / "bench" / f"tokenizer-plays{len(plays)}-v{vocab}.json"
    if not path.is_file():
        print(f"training a tokenizer (vocab {vocab}) on {len(plays)} plays ...", flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        train_tokenizer((p.read_text() for p in plays), vocab).save(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    args = bench_args(__doc__.splitlines()[0]).parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    n_plays, vocab = (3, 512) if args.tiny else (21, 8192)
    plays = sorted((REPO / "data" / "shakespeare").glob("*.txt"))[:n_plays]
    mb = sum(p.stat().st_size for p in plays) / 1e6
    cpus = os.cpu_count() or 1
    tok_path = trained_tokenizer(plays, vocab)

    from lmforge import paths
    from lmforge.data.prepare import PrepareOptions, prepare
    from lmforge.data.readers import read_documents
    from lmforge.tokenizer import load_tokenizer

    print(f"starting a private local Ray with {cpus} CPUs ...", flush=True)
    start_ray(cpus)
    import ray

    out = paths.home() / "bench" / "prepare-out"
    opts = PrepareOptions(vocab_size=vocab, tokenizer=tok_path, overwrite=True)

    def run_prepare(max_tasks: int | None) -> float:
        t0 = time.perf_counter()
        prepare(plays, out, dataclasses.replace(opts, max_tasks=max_tasks))
        return mb / (time.perf_counter() - t0)

    tok = load_tokenizer(tok_path)

    def encode_batch() -> float:
        t0 = time.perf_counter()
        texts = [text for p in plays for _, text in read_documents(p)]
        tok.encode_batch(texts, add_special_tokens=False)
        return mb / (time.perf_counter() - t0)

    fns = {
        "prepare": lambda: run_prepare(None),
        "encode_batch": encode_batch,
        "prepare_1cpu": lambda: run_prepare(1),
    }
    print(f"{len(plays)} plays, {mb:.2f} MB of text, vocab {vocab}", flush=True)
    t0 = time.perf_counter()
    run_prepare(None)  # warm-up: Ray Data's first execution starts the worker processes
    print(f"warm-up prepare: {time.perf_counter() - t0:.1f} s", flush=True)
    runs = alternate(fns, repeats)
    for name, values in runs.items():
        secs = ", ".join(f"{mb / v:.2f}" for v in values)
        print(f"{name}: {secs} s  ({', '.join(f'{v:.2f}' for v in values)} MB/s)", flush=True)
    ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)  # the shards themselves are not needed

    figures = [
        Figure.ratio_of(
            f"prepare, {cpus} CPUs (Ray Data)", "MB/s", runs["prepare"], runs["encode_batch"],
            baseline="tokenizers encode_batch, one process", target=0.8,
            note=f"{mb:.1f} MB in {mb / sorted(runs['prepare'])[len(runs['prepare']) // 2]:.1f} s",
        ),
        Figure.ratio_of(
            f"prepare scaling, {cpus} CPUs vs 1", "MB/s", runs["prepare"], runs["prepare_1cpu"],
            baseline="prepare, 1 task at a time", target=0.9 * cpus,
            note=f"ideal {cpus}x; 1 CPU: max_tasks=1",
        ),
    ]  # fmt: skip
    report(
        "prepare",
        figures,
        config={
            "plays": len(plays),
            "mb": round(mb, 3),
            "vocab_size": vocab,
            "ray_cpus": cpus,
            "repeats": repeats,
            "machine": machine_info(),
        },
    )


if __name__ == "__main__":
    main()
