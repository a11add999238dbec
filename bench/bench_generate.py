"""Generation: tokens/s of `lmforge generate` (`generate_tokens`, KV cache) against Hugging
Face `transformers` `generate()` on the exported copy of the same weights; and how
per-token latency grows with the context the cache holds.

    .venv/bin/python bench/bench_generate.py               # gpt2: 6 layers, d 384, vocab 8192
    .venv/bin/python bench/bench_generate.py --arch llama  # the same sizes as a Llama (GQA)
    .venv/bin/python bench/bench_generate.py --tiny        # 2 layers, d 64, vocab 512: runs?

The weights are a random-init model of `--arch` (context 1280) saved as a checkpoint dir
with `save_servable`, loaded back with `load_model` (as `lmforge generate --checkpoint`
does) and exported with `export_hf` (the architecture's own mapping, `hf_state_dict` and
`hf_config`), which `AutoModelForCausalLM.from_pretrained` loads offline: a
`GPT2LMHeadModel` for gpt2 (~14M parameters), a `LlamaForCausalLM` for llama (n_head 6,
n_kv_head 2, SwiGLU 1024, tied: ~12.6M). gpt2 reports as `generate`, llama as
`generate-llama`.
The tokenizer is trained once on the bundled plays and cached under `$LMFORGE_HOME/bench/`.

Both sides: batch 1, fp32, this process's torch threads, a 32-token prompt, 256 new
tokens, greedy (ours `SamplingParams(temperature=0, stop_token=None)`; HF
`do_sample=False, min_new_tokens=256` with no end-of-text id, so neither stops early nor
masks a token). The run checks that both pick the same greedy tokens. Target >= 1.0x.

Latency: seconds per new token after the first (the prefill is left out), for prompts of
64 and 1024 tokens, so the cache holds ~64 and ~1024 tokens. Attention grows with the
context but the weights' matmuls do not; with the cache the ratio stays near 1 (target
<= 1.5x), without it every token would recompute the whole context.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Figure, alternate, bench_args, machine_info, report  # noqa: E402

NEW_TOKENS = 256
PROMPT = 32
CONTEXTS = (64, 1024)
# The architectures with a transformers equivalent, and the settings of each beyond the
# shared sizes (full size, then --tiny).
ARCHS = {
    "gpt2": ({"arch": "gpt2"}, {"arch": "gpt2"}),
    "llama": ({"arch": "llama", "n_kv_head": 2}, {"arch": "llama", "n_kv_head": 1}),
}


def section(arch: str) -> str:
    """The benchmark's name in BENCHMARKS.md: `generate` for gpt2, else `generate-<arch>`."""
    return "generate" if arch == "gpt2" else f"generate-{arch}"


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


def make_checkpoint(out: Path, shape: dict[str, int | str], tokenizer: Path) -> None:
    import torch

    from lmforge import models
    from lmforge.checkpoint import TrainerState, save_servable, seal
    from lmforge.config import load_config

    cfg = load_config(None, [f"model.{k}={v}" for k, v in shape.items()])
    torch.manual_seed(0)
    model = models.build(cfg.model)
    print(f"model: {shape}, {models.of(model).n_params(cfg.model):,} parameters", flush=True)
    save_servable(out, model.state_dict(), cfg, tokenizer, TrainerState(0))
    seal(out)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv: list[str] | None = None) -> None:
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--latency-tokens", type=int, default=32,
                   help="new tokens per latency run (default 32)")  # fmt: skip
    p.add_argument("--arch", choices=sorted(ARCHS), default="gpt2",
                   help="model.arch to benchmark (default gpt2)")  # fmt: skip
    args = p.parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    n_plays, vocab = (3, 512) if args.tiny else (21, 8192)
    shape = (
        {"n_layer": 2, "d_model": 64, "n_head": 2}
        if args.tiny
        else {"n_layer": 6, "d_model": 384, "n_head": 6}
    )
    shape = (
        ARCHS[args.arch][bool(args.tiny)] | shape | {"context_length": 1280, "vocab_size": vocab}
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach the Hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    from lmforge.checkpoint import load_model
    from lmforge.export_hf import export_hf
    from lmforge.generation import SamplingParams, generate_tokens
    from lmforge.tokenizer import eot_id

    hf_logging.disable_progress_bar()
    plays = sorted((REPO / "data" / "shakespeare").glob("*.txt"))[:n_plays]
    tok_path = trained_tokenizer(plays, vocab)
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-generate-", dir=os.environ.get("TMPDIR")))
    try:
        make_checkpoint(work / "checkpoint", shape, tok_path)
        export_hf(work / "checkpoint", work / "hf")
        model, tok, _ = load_model(work / "checkpoint")
        hf = AutoModelForCausalLM.from_pretrained(work / "hf").eval()
        text_ids = tok.encode(plays[0].read_text(), add_special_tokens=False).ids
        prompt = text_ids[:PROMPT]
        hf_cfg = GenerationConfig(
            do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            eos_token_id=None, pad_token_id=eot_id(tok),
        )  # fmt: skip
        hf.generation_config.eos_token_id = None  # or HF fills the unset id in from it
        print(
            f"torch threads {torch.get_num_threads()}, HF attention "
            f"{hf.config._attn_implementation}, dtypes {next(model.parameters()).dtype} / "
            f"{next(hf.parameters()).dtype}",
            flush=True,
        )
        tokens: dict[str, list[int]] = {}

        def ours() -> float:
            params = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, stop_token=None)
            t0 = time.perf_counter()
            tokens["ours"] = list(generate_tokens(model, prompt, params))
            return len(tokens["ours"]) / (time.perf_counter() - t0)

        def theirs() -> float:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                t0 = time.perf_counter()
                out = hf.generate(
                    ids, attention_mask=torch.ones_like(ids), generation_config=hf_cfg
                )
                dt = time.perf_counter() - t0
            tokens["hf"] = out[0, len(prompt) :].tolist()
            return len(tokens["hf"]) / dt

        def latency(context: int) -> float:
            params = SamplingParams(
                temperature=0, max_new_tokens=args.latency_tokens, stop_token=None
            )
            stamps = [
                time.perf_counter() for _ in generate_tokens(model, text_ids[:context], params)
            ]
            return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3

        print("warm-up ...", flush=True)
        ours(), theirs(), latency(CONTEXTS[0]), latency(CONTEXTS[1])
        fns = {"ours": ours, "hf": theirs}
        fns |= {f"latency{c}": (lambda c=c: latency(c)) for c in CONTEXTS}
        runs = alternate(fns, repeats)
        for name, values in runs.items():
            unit = "ms/token" if name.startswith("latency") else "tokens/s"
            print(f"{name}: {', '.join(f'{v:,.2f}' for v in values)} {unit}", flush=True)
        diff = first_difference(tokens["ours"], tokens["hf"])
        match = diff is None
        print(
            "greedy tokens match: "
            + (
                f"yes, all {len(tokens['ours'])}" if match else f"NO, they differ from token {diff}"
            ),
            flush=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lo, hi = CONTEXTS
    figures = [
        Figure.ratio_of(
            "generate, batch 1, greedy, 256 new tokens", "tokens/s", runs["ours"], runs["hf"],
            baseline="transformers generate()", target=1.0,
            note="same greedy tokens" if match else f"greedy tokens differ from token {diff}",
        ),
        Figure.ratio_of(
            f"per-token latency, cache holding {hi} vs {lo} tokens", "ms/token",
            runs[f"latency{hi}"], runs[f"latency{lo}"], baseline=f"at {lo}",
            target=1.5, higher_is_better=False,
        ),
    ]  # fmt: skip
    report(
        section(args.arch),
        figures,
        config={
            "model": shape,
            "prompt_tokens": PROMPT,
            "new_tokens": NEW_TOKENS,
            "latency_tokens": args.latency_tokens,
            "hf_class": type(hf).__name__,
            "hf_attention": hf.config._attn_implementation,
            "torch_threads": torch.get_num_threads(),
            "greedy_match": match,
            "repeats": repeats,
            "machine": machine_info(),
        },
    )


if __name__ == "__main__":
    main()
