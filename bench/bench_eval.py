"""Evaluation speed (issue 26): lmforge's lm-evaluation-harness `LM` (`LmforgeLM`) against
the harness's own `HFLM` on the same weights and the same requests: log-likelihood tokens
per second (every context + continuation token scored), alternating, in one process.

    .venv/bin/python bench/bench_eval.py            # a GPT-2 shape of 6 layers x 384, 512 requests
    .venv/bin/python bench/bench_eval.py --tiny     # 2 layers, 64 requests: checks it runs
    .venv/bin/python bench/bench_eval.py --what beside   # training with evaluation beside it

`--what beside`: a local training run (1 worker, 1 thread) with every checkpoint evaluated
beside it (a generative task file, the driver's validator thread given the other core, as
Ray gives its validation task `eval.cpus`) against the same run without evaluation:
training tokens/s over the steps after warm-up. Target: >= 0.9x (issue 26).

A random `GPT2LMHeadModel` (transformers' class) is saved as a Hugging Face folder and
imported by lmforge (`import_hf.write_checkpoint`); both sides score the same
multiple-choice-like requests (a ~40-120-token context, 4 continuations each), batch 16,
float32 on the CPU, through the harness's `loglikelihood` entry point.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Figure, alternate, bench_args, machine_info, report  # noqa: E402


def build(out: Path, tiny: bool) -> tuple[Path, Path]:
    import torch
    import transformers

    from lmforge.import_hf import read_folder, write_checkpoint
    from lmforge.tokenizer import eot_id, train_tokenizer
    from tests.conftest import CORPUS

    text = (CORPUS / "henry_v.txt").read_text()[:200_000].splitlines()
    tok = train_tokenizer([t for t in text if t.strip()], 512 if tiny else 4096)
    hf = out / "hf"
    hf.mkdir(parents=True)
    tok.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    )
    size = dict(n_layer=2, n_embd=64, n_head=2) if tiny else dict(n_layer=6, n_embd=384, n_head=6)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=256,
                                  bos_token_id=eot_id(tok), eos_token_id=eot_id(tok), **size)  # fmt: skip
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(hf)
    write_checkpoint(read_folder(hf), out / "ckpt", "bench")
    return hf, out / "ckpt"


def requests(n: int):
    from lm_eval.api.instance import Instance

    from tests.conftest import CORPUS

    words = (CORPUS / "twelfth_night.txt").read_text().split()
    out = []
    for i in range(n // 4):
        start = (i * 97) % (len(words) - 200)
        ctx = " ".join(words[start : start + 30 + (i * 7) % 60])
        for j in range(4):
            cont = " " + " ".join(words[start + 100 + j * 5 : start + 100 + j * 5 + 1 + j])
            out.append(Instance("loglikelihood", {}, (ctx, cont), i * 4 + j))
    return out


def beside(tiny: bool, repeats: int) -> None:
    """Training tokens/s with every checkpoint evaluated beside it, against without."""
    import torch

    from lmforge.config import load_config
    from lmforge.training.launch import run_training
    from tests.conftest import CORPUS, REPO
    from tests.datasets import plays_dataset
    from tests.unit import evaltasks

    torch.set_num_threads(1)  # the driver's validator thread: the core the worker leaves
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-eval-beside-"))
    try:
        data = plays_dataset(tmp / "plays").path  # three plays, in-process (no Ray)
        words = (CORPUS / "twelfth_night.txt").read_text().split()
        rows = [{"prompt": " ".join(words[i : i + 12]), "completion": " " + words[i + 12]}
                for i in range(0, 64 * 13, 13)]  # fmt: skip
        task = evaltasks.generative(tmp, "copy", evaltasks.write_rows(tmp / "rows.jsonl", rows),
                                    max_gen=16)  # fmt: skip
        steps, every = (30, 10) if tiny else (120, 20)
        runs = iter(range(1000))

        def train(with_eval: bool):
            def once() -> float:
                overrides = [
                    f"data.path={data}", f"run.name=beside-{next(runs)}",
                    f"run.storage_path={tmp / 'runs'}", "tracking.enabled=false",
                    "scaling.num_workers=1", "scaling.cpus_per_worker=1", "train.log_every=1",
                    f"train.max_steps={steps}", f"train.checkpoint_every={every}",
                    f"train.eval_every={steps}", "model.n_layer=4", "model.d_model=128",
                    "model.n_head=4",
                ]  # fmt: skip
                if with_eval:
                    overrides += [f"eval.tasks=[{task}]", "eval.limit=32"]
                cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", overrides)
                result = run_training(cfg, local=True)
                timed = [m for m in result.history if "step_time_s" in m][3:]  # after warm-up
                t = cfg.train  # one worker: a step is its micro-batches
                tokens = t.micro_batch_size * t.grad_accum_steps * cfg.model.context_length
                return tokens * len(timed) / sum(m["step_time_s"] for m in timed)

            return once

        got = alternate({"beside": train(True), "alone": train(False)}, 1 if tiny else repeats)
        figure = Figure.ratio_of(
            f"training, every {every} steps' checkpoint evaluated beside it", "tokens/s",
            got["beside"], got["alone"], "the same run without evaluation", target=0.9,
            note="1 worker x 1 thread; the validator thread on the other core (Ray: eval.cpus)",
        )  # fmt: skip
        report("eval-beside", [figure], {"steps": steps, "checkpoint_every": every,
                                         "task": "generative, 32 examples, 16 new tokens",
                                         "model": "gpt2 4x128, context 64",
                                         "machine": machine_info()})  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--what", choices=["harness", "beside"], default="harness",
                   help="harness: our LM against HFLM (default); beside: training with "
                   "evaluation beside it against without")  # fmt: skip
    args = p.parse_args()
    if args.what == "beside":
        return beside(args.tiny, args.repeats)
    import torch
    from lm_eval.models.huggingface import HFLM

    from lmforge.evaluation.lm import LmforgeLM

    torch.set_num_threads(2)
    tmp = Path(tempfile.mkdtemp(prefix="lmforge-bench-eval-"))
    try:
        hf, ckpt = build(tmp, args.tiny)
        reqs = requests(64 if args.tiny else 512)
        ours = LmforgeLM.from_checkpoint(ckpt, template="none", batch_size=16)
        theirs = HFLM(pretrained=str(hf), device="cpu", batch_size=16)
        tokens = sum(len(ours.tok_encode(r.args[0] + r.args[1])) for r in reqs)

        def timed(lm):
            def once() -> float:
                t0 = time.perf_counter()
                lm.loglikelihood(reqs, disable_tqdm=True)
                return tokens / (time.perf_counter() - t0)

            return once

        timed(ours)(), timed(theirs)()  # warm-up
        got = alternate(
            {"lmforge": timed(ours), "hflm": timed(theirs)}, 1 if args.tiny else args.repeats
        )
        a = ours.loglikelihood(reqs[:16], disable_tqdm=True)
        b = theirs.loglikelihood(reqs[:16], disable_tqdm=True)
        diff = max(abs(x[0] - y[0]) for x, y in zip(a, b, strict=True))
        figure = Figure.ratio_of(
            "loglikelihood, batch 16", "tokens/s", got["lmforge"], got["hflm"],
            "lm-eval HFLM (same weights, same requests)", target=1.0,
            note=f"max abs logp difference {diff:.2e} on the first 16 requests",
        )  # fmt: skip
        report("eval", [figure], {"requests": len(reqs), "tokens": tokens, "tiny": args.tiny,
                                  "model": "gpt2 2x64" if args.tiny else "gpt2 6x384",
                                  "machine": machine_info()})  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
