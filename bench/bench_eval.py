"""Evaluation speed (issue 26): lmforge's lm-evaluation-harness `LM` (`LmforgeLM`) against
the harness's own `HFLM` on the same weights and the same requests: log-likelihood tokens
per second (every context + continuation token scored), alternating, in one process.

    .venv/bin/python bench/bench_eval.py            # a GPT-2 shape of 6 layers x 384, 512 requests
    .venv/bin/python bench/bench_eval.py --tiny     # 2 layers, 64 requests: checks it runs

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


def main() -> None:
    args = bench_args(__doc__.splitlines()[0]).parse_args()
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
