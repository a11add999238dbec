"""Data streaming: tokens/s that one training worker's `TokenStream` delivers (shards ->
packed (x, y) batches), against a raw `pyarrow` scan of the same Parquet files, and
against what training consumes.

    .venv/bin/python bench/bench_data.py            # all 21 plays, vocab 8192 (~0.8M tokens)
    .venv/bin/python bench/bench_data.py --tiny     # 3 plays, vocab 512: checks it runs

The dataset is prepared once with `lmforge.data.prepare.prepare` (seq_tokens 1024, so a
row group holds 16K tokens) and cached under `$LMFORGE_HOME/bench/`; preparing needs Ray
(a private local one starts if no cluster runs), the measurement itself does not.

Each repeat reads the train split `--passes` times, alternately:
  * the stream (`TokenStream(...).batches()`, rank 0 of 1 worker) at the tiny training
    shape (jobs/configs/tiny.yaml: context 64, batch 8) and at GPT-2's (context 1024);
  * the raw scan: every row group's `tokens` column read with `pyarrow.parquet` and
    flattened to numpy, with no packing, no int64 copy and no batching;
  * training: forward, backward and AdamW step of the tiny model on one worker's batch with
    one torch thread (a tiny-config worker gets `cpus_per_worker: 1`), timed over a few
    steps. A real step (DeepSpeed, gradient all-reduce) is slower, so this overstates
    consumption and the headroom figure errs on the safe side. `--train-tokens-per-s`
    replaces it with a number you measured elsewhere (e.g. `tokens_per_s` in MLflow).

Targets: the stream >= 0.5x the raw scan, and >= 20x what training consumes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Figure, alternate, bench_args, machine_info, report  # noqa: E402

TINY_CONFIG = REPO / "jobs" / "configs" / "tiny.yaml"
GPT2_CONTEXT = 1024


def prepared_dataset(tiny: bool) -> Path:
    """The benchmark's dataset dir, prepared on first use and reused afterwards."""
    from lmforge import paths

    n_plays, vocab = (3, 512) if tiny else (21, 8192)
    out = paths.home() / "bench" / f"data-plays{n_plays}-v{vocab}"
    if (out / "manifest.json").is_file():
        return out
    import ray

    from lmforge.cluster import connect
    from lmforge.data.prepare import PrepareOptions, prepare

    plays = sorted((REPO / "data" / "shakespeare").glob("*.txt"))[:n_plays]
    print(f"preparing {len(plays)} plays (vocab {vocab}) into {out} ...", flush=True)
    connect()
    prepare(plays, out, PrepareOptions(vocab_size=vocab, seq_tokens=1024, overwrite=True))
    ray.shutdown()  # the measurement needs no Ray: leave the cores to it
    return out


def stream_rate(dataset, context: int, batch: int, passes: int) -> float:
    """Tokens/s of `TokenStream.batches()` over `passes` x the train split (inputs counted)."""
    from lmforge.data.stream import TokenStream

    n_batches = passes * dataset.tokens("train") // (context * batch)
    t0 = time.perf_counter()
    it = TokenStream(dataset, "train", context, batch, rank=0, world=1, seed=0).batches()
    for _ in range(n_batches):
        next(it)
    return n_batches * context * batch / (time.perf_counter() - t0)


def raw_scan_rate(files: list[Path], passes: int) -> float:
    """Tokens/s of reading every row group's `tokens` column into flat numpy arrays."""
    import pyarrow.parquet as pq

    n = 0
    t0 = time.perf_counter()
    for _ in range(passes):
        for f in files:
            pf = pq.ParquetFile(f)
            for i in range(pf.num_row_groups):
                col = pf.read_row_group(i, columns=["tokens"]).column(0)
                n += len(col.combine_chunks().flatten().to_numpy())
    return n / (time.perf_counter() - t0)


class TrainRate:
    """Tokens/s one worker trains at the tiny config: fwd + bwd + AdamW, one torch thread."""

    def __init__(self, dataset, steps: int) -> None:
        import torch

        from lmforge import models
        from lmforge.config import load_config
        from lmforge.data.stream import TokenStream

        cfg = load_config(TINY_CONFIG, [f"model.vocab_size={dataset.vocab_size}"])
        torch.manual_seed(cfg.train.seed)
        self.model = models.build(cfg.model)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr)
        stream = TokenStream(dataset, "train", cfg.model.context_length, cfg.train.micro_batch_size)
        self.x, self.y = next(stream.batches())
        self.steps = steps
        self.threads = max(1, int(cfg.scaling.cpus_per_worker))
        self.context, self.batch = cfg.model.context_length, cfg.train.micro_batch_size
        self._step()  # warm-up: first-call allocations

    def _step(self) -> None:
        _, loss = self.model(self.x, self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def __call__(self) -> float:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            t0 = time.perf_counter()
            for _ in range(self.steps):
                self._step()
            dt = time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)
        return self.steps * self.x.numel() / dt


def main(argv: list[str] | None = None) -> None:
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--passes", type=int, default=None,
                   help="reads of the train split per timed run (default 5; 1 with --tiny)")  # fmt: skip
    p.add_argument("--train-tokens-per-s", type=float, default=None,
                   help="what training consumes per worker; default: measured here")  # fmt: skip
    args = p.parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    passes = args.passes or (1 if args.tiny else 5)

    from lmforge.config import load_config
    from lmforge.data.dataset import Dataset

    dataset = Dataset(prepared_dataset(args.tiny))
    files = list(dict.fromkeys(u.file for u in dataset.units("train")))  # each shard once
    tiny_cfg = load_config(TINY_CONFIG, [f"model.vocab_size={dataset.vocab_size}"])
    ctx, batch = tiny_cfg.model.context_length, tiny_cfg.train.micro_batch_size
    print(
        f"dataset {dataset.path}: {dataset.tokens('train'):,} train tokens in "
        f"{len(dataset.units('train'))} row groups, {len(files)} shard(s); {passes} pass(es) a run",
        flush=True,
    )

    fns = {
        "stream_tiny": lambda: stream_rate(dataset, ctx, batch, passes),
        "raw": lambda: raw_scan_rate(files, passes),
        "stream_gpt2": lambda: stream_rate(dataset, GPT2_CONTEXT, batch, passes),
    }
    if args.train_tokens_per_s is None:
        train = TrainRate(dataset, steps=3 if args.tiny else 20)
        fns["train"] = train
    for name, fn in fns.items():  # warm-up: page cache, imports, first allocations
        print(f"warm-up {name}: {fn():,.0f} tokens/s", flush=True)
    runs = alternate(fns, repeats)
    if args.train_tokens_per_s is not None:
        runs["train"] = [args.train_tokens_per_s] * repeats
    for name, values in runs.items():
        print(f"{name}: " + ", ".join(f"{v:,.0f}" for v in values) + " tokens/s", flush=True)

    train_note = (
        "given with --train-tokens-per-s"
        if args.train_tokens_per_s is not None
        else f"fwd+bwd+AdamW of the tiny model, batch {batch} x {ctx}, {train.threads} thread(s)"
    )
    figures = [
        Figure.ratio_of(
            f"stream, tiny training shape (context {ctx}, batch {batch})", "tokens/s",
            runs["stream_tiny"], runs["raw"], baseline="raw pyarrow scan", target=0.5,
        ),
        Figure.ratio_of(
            f"stream, GPT-2 shape (context {GPT2_CONTEXT}, batch {batch})", "tokens/s",
            runs["stream_gpt2"], runs["raw"], baseline="raw pyarrow scan", target=0.5,
        ),
        Figure.ratio_of(
            "stream headroom over training (tiny config, one worker)", "tokens/s",
            runs["stream_tiny"], runs["train"], baseline="training consumes", target=20,
            note=train_note,
        ),
    ]  # fmt: skip
    report(
        "data",
        figures,
        config={
            "dataset": str(dataset.path),
            "train_tokens": dataset.tokens("train"),
            "vocab_size": dataset.vocab_size,
            "row_groups": len(dataset.units("train")),
            "passes": passes,
            "repeats": repeats,
            "machine": machine_info(),
        },
    )


if __name__ == "__main__":
    main()
