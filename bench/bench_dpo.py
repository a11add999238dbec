"""Preference tuning: DPO's training tokens/s against SFT's on the same pairs, the reference
pass (before step 1) on its own, and each worker's peak memory, DPO vs SFT, at ZeRO 3.

    .venv/bin/python bench/bench_dpo.py            # gpt2 6 x 384, context 256, ZeRO 2 and 3
    .venv/bin/python bench/bench_dpo.py --tiny     # 2 x 64, context 64, ZeRO 3, 1 repeat

The pairs are built from the bundled plays (prompt: a line; chosen: the line after it;
rejected: another line of the play): the tokenizer is trained on all of them, the dataset
keeps a sample (`PAIRS`: enough for the runs' steps, few enough that the reference pass
takes seconds, not the hour all 27,633 of the full size would), prepared with
`--format preference` in this process (no Ray) and cached under `$LMFORGE_HOME/bench/`. Each run trains on 2 local gloo ranks
(`run_training(cfg, local=True)`: the trainer of a Ray job, no Ray) with tracking off:
- SFT: `train.objective=lm` on the preference dataset itself (both answers' tokens are the
  targets, the SFT stream packs the rows into windows);
- DPO: `train.objective=dpo` from the SFT run's checkpoint (the reference), same model,
  micro-batch, windows and ZeRO stage.
tokens/s is the trainer's `steady_tokens_per_s` (window positions a step, padding of DPO's
windows included, over the median step after 3 warm-up steps). The reference pass is
timed by the trainer (`reference_precompute_s`) and reported separately, in pairs/s.
Memory: each run is its own process; the peak RSS of its largest child process (a worker,
sampled every 20 ms), beside the launch page's estimate (`lmforge.estimate`) of the same
config. On CPU the RSS holds the Python/torch runtime, far above a tiny model's state.
Targets: DPO >= 0.9x SFT tokens/s; peak memory a worker within 10% of SFT's at ZeRO 3.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    REPO,
    Figure,
    alternate,
    bench_args,
    machine_info,
    report,
    spread,
)

SIZES = {
    True: ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.context_length=64"],
    False: ["model.n_layer=6", "model.d_model=384", "model.n_head=6", "model.context_length=256"],
}

PAIRS = {True: 2048, False: 1024}  # pairs in the dataset (train and val)


def pairs_dir(tiny: bool) -> Path:
    """The preference dataset (prepared on first use)."""
    from lmforge import paths, templates
    from lmforge.data import preference, sft
    from lmforge.data.dataset import MANIFEST
    from lmforge.data.prepare import PrepareOptions, split_and_write_pairs
    from lmforge.tokenizer import EOT, eot_token, train_tokenizer

    n_plays, vocab, seq = (3, 512, 64) if tiny else (21, 8192, 256)
    out = paths.home() / "bench" / f"dpo-plays{n_plays}-v{vocab}-s{seq}-p{PAIRS[tiny]}"
    if (out / MANIFEST).is_file():
        return out
    rng = random.Random(0)
    rows = []
    for play in sorted((REPO / "data" / "shakespeare").glob("*.txt"))[:n_plays]:
        lines = [x.strip() for x in play.read_text().splitlines() if len(x.strip()) > 20]
        for i in range(0, len(lines) - 1, 2):
            rows.append({"prompt": lines[i], "chosen": lines[i + 1],
                         "rejected": lines[rng.randrange(len(lines))]})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    src = out / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = PrepareOptions(format="preference", template="instruct", seq_tokens=seq,
                          vocab_size=vocab, rows_per_group=16, overwrite=True)  # fmt: skip
    pairs = list(preference.read_pairs(src))
    t = templates.get("instruct", eos_token=EOT)
    tok = train_tokenizer((t.render(s["messages"]) for _, c, r in pairs for s in (c, r)), vocab)
    tok.save(str(out / "tokenizer.json"))
    t = templates.get("instruct", eos_token=eot_token(tok) or "")
    kept = sorted(random.Random(1).sample(range(len(pairs)), min(PAIRS[tiny], len(pairs))))
    examples = (sft.encode(tok, t, s["messages"], seq, "drop", s["answer_turns"])
                for i in kept for s in pairs[i][1:])  # fmt: skip
    m = split_and_write_pairs(examples, out, tok, opts, [{"path": str(src)}], t)
    print(f"prepared {m['preference']['kept']:,} pairs into {out}", flush=True)
    return out


def config(data: Path, tiny: bool, objective: str, stage: int, steps: int, storage: Path):
    from lmforge.config import load_config

    return load_config(
        REPO / "jobs" / "configs" / "tiny.yaml",
        [
            *SIZES[tiny], f"data.path={data}", f"train.objective={objective}",
            f"zero.stage={stage}", f"train.max_steps={steps}", "train.warmup_steps=0",
            "train.micro_batch_size=4", f"train.eval_every={steps}", "train.eval_steps=2",
            f"train.checkpoint_every={steps}", f"train.log_every={steps}",
            "scaling.num_workers=2", "tracking.enabled=false", f"run.storage_path={storage}",
            f"run.name=bench-dpo-{objective}-z{stage}-{random.randrange(1 << 30):x}",
        ],
    )  # fmt: skip


def child(args) -> None:
    """One run in this process (its workers are its children): a JSON line of its figures."""
    from lmforge.estimate import estimate
    from lmforge.training.launch import run_training

    data = pairs_dir(args.tiny)
    cfg = config(data, args.tiny, args.child, args.stage, args.steps, Path(args.storage))
    peak = PeakRSS()
    with peak:
        result = run_training(cfg, init_from=args.init_from, local=True)
    first_eval = next(m for m in result.history if "val_loss" in m)
    from lmforge.data.dataset import Dataset

    ds = Dataset(data)
    out = {
        "tokens_per_s": result.metrics["steady_tokens_per_s"],
        "peak_rss": peak.max,
        "estimate": estimate(cfg, ds.vocab_size).per_worker_bytes["total"],
        "precompute_s": first_eval.get("reference_precompute_s"),
        "pairs": ds.manifest["preference"]["kept"],
        "checkpoint": str(result.checkpoint),
    }
    print("CHILD " + json.dumps(out), flush=True)


class PeakRSS:
    """The largest RSS any one child process (a worker) reaches, sampled every 20 ms."""

    def __init__(self) -> None:
        self.max, self._stop = 0, threading.Event()

    def _sample(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.02):
            for p in me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    self.max = max(self.max, p.memory_info().rss)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_child(objective: str, tiny: bool, stage: int, steps: int, storage: Path,
              init_from: str | None = None) -> dict:  # fmt: skip
    cmd = [sys.executable, __file__, "--child", objective, "--stage", str(stage),
           "--steps", str(steps), "--storage", str(storage)]  # fmt: skip
    cmd += ["--tiny"] if tiny else []
    cmd += ["--init-from", init_from] if init_from else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CHILD ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{objective} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("CHILD ") :])


def main(argv: list[str] | None = None) -> None:
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--child", choices=("lm", "dpo"), help=argparse_hidden())
    p.add_argument("--stage", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--storage")
    p.add_argument("--init-from")
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    repeats = 1 if args.tiny else args.repeats
    steps = 10 if args.tiny else 20
    stages = [3] if args.tiny else [2, 3]
    pairs_dir(args.tiny)
    figures, details = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        storage = Path(tmp)
        base = run_child("lm", args.tiny, 2, steps, storage)["checkpoint"]  # the reference
        for stage in stages:
            got: dict[str, list[dict]] = {"lm": [], "dpo": []}
            # The first DPO run of each stage computes the reference's log-probs (timed).
            shutil.rmtree(pairs_dir(args.tiny) / "reference", ignore_errors=True)

            def one(objective: str, stage=stage, got=got) -> float:
                r = run_child(objective, args.tiny, stage, steps, storage,
                              base if objective == "dpo" else None)  # fmt: skip
                got[objective].append(r)
                print(f"ZeRO {stage} {objective}: {r}", flush=True)
                return r["tokens_per_s"]

            runs = alternate({"dpo": lambda: one("dpo"), "sft": lambda: one("lm")}, repeats)
            figures.append(Figure.ratio_of(
                f"DPO vs SFT tokens/s, ZeRO {stage} fp32 (same pairs, model, windows)",
                "tokens/s", runs["dpo"], runs["sft"], baseline="SFT (objective lm)", target=0.9,
            ))  # fmt: skip
            pre = [r["precompute_s"] for r in got["dpo"] if r["precompute_s"]]
            pairs = got["dpo"][0]["pairs"]
            if pre:
                figures.append(Figure(
                    f"reference pass before step 1, ZeRO {stage} ({pairs:,} pairs, once; "
                    f"later runs reuse the cache; {statistics.median(pre):.1f} s)", "pairs/s",
                    spread([pairs / v for v in pre]),
                ))  # fmt: skip
            if stage == 3:
                mem_d = [r["peak_rss"] / 2**20 for r in got["dpo"]]
                mem_s = [r["peak_rss"] / 2**20 for r in got["lm"]]
                est = got["dpo"][0]["estimate"] / 2**20
                figures.append(Figure.ratio_of(
                    f"peak RSS a worker, ZeRO 3, DPO vs SFT (launch estimate of the model "
                    f"state {est:,.1f} MiB, the same for both)", "MiB", mem_d, mem_s,
                    baseline="SFT", target=1.1, higher_is_better=False,
                ))  # fmt: skip
            details[f"zero{stage}"] = got
    report("dpo", figures, config={
        "sizes": SIZES[args.tiny], "steps": steps, "micro_batch_size": 4, "workers": 2,
        "repeats": repeats, "dataset": str(pairs_dir(args.tiny)), "machine": machine_info(),
    })  # fmt: skip


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
