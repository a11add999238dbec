"""Mixture streaming: tokens/s of one worker's 3-source mixture (`MixtureStream`, weights
0.5 / 0.3 / 0.2) against one source's `TokenStream` over the same plays, same tokenizer.

    .venv/bin/python bench/bench_mixture.py            # 21 plays, vocab 8192 (~0.8M tokens)
    .venv/bin/python bench/bench_mixture.py --tiny     # 3 plays, vocab 512: checks it runs

The plays are prepared in this process (no Ray) with one tokenizer, trained on all of
them: once as one dataset (the baseline), once split into 3 datasets of every third play
(the mixture's sources); both are cached under `$LMFORGE_HOME/bench/`. Each repeat reads
`--batches` batches of each, alternately, at the tiny training shape (context 64, batch 8:
the most batches per token, where a mixture's per-batch work shows most) and at GPT-2's
(context 1024). Target: the mixture >= 0.9x one source.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Figure, alternate, bench_args, machine_info, report  # noqa: E402

WEIGHTS = (0.5, 0.3, 0.2)
SHAPES = {"tiny": (64, 8), "gpt2": (1024, 8)}
NOTES = {
    "tiny": "a batch here is 512 tokens (~16 us of one source's stream): the mixture's "
    "per-batch Python (the choice of sources, planned 64 batches at a time) shows most here",
    "gpt2": "",
}


def prepared(tiny: bool) -> tuple[Path, list[Path]]:
    """(the one-source dataset, the 3 sources), prepared on first use."""
    import numpy as np

    from lmforge import paths
    from lmforge.checkpoint import TOKENIZER
    from lmforge.data.prepare import PrepareOptions, split_and_write
    from lmforge.data.readers import read_documents
    from lmforge.tokenizer import eot_id, train_tokenizer

    n_plays, vocab = (3, 512) if tiny else (21, 8192)
    root = paths.home() / "bench" / f"mixture-plays{n_plays}-v{vocab}"
    one, parts = root / "one", [root / f"part{i}" for i in range(3)]
    if all((d / "manifest.json").is_file() for d in (one, *parts)):
        return one, parts
    plays = sorted((REPO / "data" / "shakespeare").glob("*.txt"))[:n_plays]
    print(f"preparing {len(plays)} plays (vocab {vocab}) into {root} ...", flush=True)
    docs = {p: [text for _, text in read_documents(p)] for p in plays}
    tok = train_tokenizer((t for d in docs.values() for t in d), vocab)
    eot = eot_id(tok)
    opts = PrepareOptions(vocab_size=vocab, seq_tokens=1024, overwrite=True)

    def write(out: Path, group: list[Path]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        tok.save(str(out / TOKENIZER))
        ids = (
            np.append(np.asarray(tok.encode(t, add_special_tokens=False).ids, np.int32), eot)
            for p in group
            for t in docs[p]
        )
        split_and_write(ids, out, tok, opts, sources=[])

    write(one, plays)
    for i, part in enumerate(parts):
        write(part, plays[i::3])
    return one, parts


def rate(make, batches: int, context: int, batch: int) -> float:
    it = make().batches()
    next(it)  # the first row group's read is in both: leave it out
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * context * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=None,
                   help="batches a timed run reads (default 20000; 2000 with --tiny)")  # fmt: skip
    args = p.parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    n = args.batches or (2000 if args.tiny else 20000)

    from lmforge.config import DataConfig
    from lmforge.data.dataset import Dataset
    from lmforge.data.mixture import Mixture, MixtureStream
    from lmforge.data.stream import TokenStream

    one_dir, part_dirs = prepared(args.tiny)
    one = Dataset(one_dir)
    mix = Mixture(
        DataConfig(
            sources=[
                {"path": str(d), "weight": w, "name": d.name}
                for d, w in zip(part_dirs, WEIGHTS, strict=True)
            ]
        )
    )
    fns = {}
    for shape, (ctx, batch) in SHAPES.items():
        fns[f"one_{shape}"] = lambda c=ctx, b=batch: rate(
            lambda: TokenStream(one, "train", c, b, seed=0), n, c, b
        )
        fns[f"mix_{shape}"] = lambda c=ctx, b=batch: rate(
            lambda: MixtureStream(mix, c, b, seed=0, windows_per_step=b), n, c, b
        )
    for name, fn in fns.items():  # warm-up: page cache, imports
        print(f"warm-up {name}: {fn():,.0f} tokens/s", flush=True)
    runs = alternate(fns, repeats)
    for name, values in runs.items():
        print(f"{name}: " + ", ".join(f"{v:,.0f}" for v in values) + " tokens/s", flush=True)
    figures = [
        Figure.ratio_of(
            f"3-source mixture {'/'.join(map(str, WEIGHTS))}, context {ctx}, batch {batch}",
            "tokens/s", runs[f"mix_{shape}"], runs[f"one_{shape}"],
            baseline="one source (TokenStream)", target=0.9, note=NOTES[shape],
        )
        for shape, (ctx, batch) in SHAPES.items()
    ]  # fmt: skip
    report(
        "mixture",
        figures,
        config={
            "one": str(one_dir),
            "train_tokens": one.tokens("train"),
            "sources": {s.name: s.dataset.tokens("train") for s in mix.sources},
            "batches": n,
            "repeats": repeats,
            "machine": machine_info(),
        },
    )


if __name__ == "__main__":
    main()
