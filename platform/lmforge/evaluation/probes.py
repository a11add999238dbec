"""Probes: the same prompts answered by every checkpoint, so a person can read how a run's
answers change (and compare two versions side by side on the Models page).

    prompts = read_probes("probes.txt")       # one prompt a line, or JSON lines {"prompt"}
    table = answer(model, tok, template, prompts, samples=2, max_new_tokens=32)
    # {"prompt": [...], "kind": ["greedy", "sample 1", ...], "answer": [...], "seed": [...]}

Each prompt is answered greedily and by `samples` samples (temperature 0.8, top-k 50,
seed 0: the same draws on every checkpoint), through `lmforge.generation` as `generate`
does, in the version's template (`--template own`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.generation import SamplingParams, complete_samples
from lmforge.templates import Template, as_prompt

SEED = 0


class ProbeError(LmforgeError, ValueError):
    pass


def read_probes(path: str | Path) -> list[str]:
    """The prompts of a probes file: JSON lines with a `prompt`, else one prompt a line."""
    p = Path(path)
    if not p.is_file():
        raise ProbeError(f"{p}: probes file not found")
    prompts = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ProbeError(f"{p}:{i}: not a JSON line ({err.msg})") from None
            if not isinstance(row.get("prompt"), str) or not row["prompt"]:
                raise ProbeError(f"{p}:{i}: a JSON probe needs a non-empty string `prompt`")
            prompts.append(row["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ProbeError(f"{p}: no prompt in the probes file")
    return prompts


def answer(
    model,
    tok,
    template: Template | None,
    prompts: list[str],
    samples: int = 2,
    max_new_tokens: int = 32,
) -> dict[str, list]:
    """Each prompt's greedy answer and `samples` seeded samples, as table columns."""
    from lmforge.tokenizer import eot_id

    table: dict[str, list] = {"prompt": [], "kind": [], "answer": [], "seed": []}
    greedy = SamplingParams(max_new_tokens, temperature=0.0, top_k=None, stop_token=eot_id(tok))
    sampled = dataclasses.replace(greedy, temperature=0.8, top_k=50, seed=SEED, n=samples)
    for prompt in prompts:
        ids = tok.encode(as_prompt(template, prompt), add_special_tokens=False).ids
        rows = [("greedy", None, complete_samples(model, tok, ids, greedy)[0].text)]
        if samples:
            got = complete_samples(model, tok, ids, sampled)
            rows += [(f"sample {i + 1}", SEED, s.text) for i, s in enumerate(got)]
        for kind, seed, text in rows:
            table["prompt"].append(prompt)
            table["kind"].append(kind)
            table["answer"].append(text)
            table["seed"].append(seed)
    return table
