"""Loss and perplexity of a model on a prepared dataset's val split (one process, no Ray).

    lmforge evaluate --model models:/tiny@best --data ~/.lmforge/datasets/shakespeare

The model's tokenizer must be the dataset's: a loss over different token ids means nothing.

On an SFT dataset (`prepare --format sft`: one example a row, a `targets` mask) the val
split is read example by example (`read_examples`), never cut at a window's edge:
- `completion_loss`: the mean cross-entropy over the completion (target) tokens only, the
  prompt's tokens are context; examples are packed several to a window with `segments`,
  so each is scored exactly as alone (`lmforge.models.attention.segment_layout`);
- `exact_match`: the fraction of examples whose greedy continuation of the prompt (the
  tokens before the example's last run of targets) is that run token for token, its
  ending eos included: the model must also stop where the completion stops.
Both take examples as `lmforge.data.sft.Example` (int64 ids + bool targets, one per token).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.data.dataset import Dataset, open_shard
from lmforge.data.sft import Example
from lmforge.data.stream import TokenStream
from lmforge.errors import LmforgeError


class EvaluationError(LmforgeError, ValueError):
    pass


def read_examples(ds: Dataset, split: str = "val", limit: int | None = None) -> list[Example]:
    """The examples of an SFT dataset's split in manifest order (the first `limit`)."""
    if ds.data_format != "sft":
        raise EvaluationError(f"{ds.path}: not an SFT dataset (data_format {ds.data_format!r})")
    out: list[Example] = []
    for unit in ds.units(split):
        if limit is not None and len(out) >= limit:
            break
        with open_shard(unit.file) as pf:
            table = pf.read_row_group(unit.row_group, columns=["tokens", "targets"])
        for ids, mask in zip(
            table.column("tokens").to_pylist(), table.column("targets").to_pylist(), strict=True
        ):
            out.append(Example(np.asarray(ids, np.int64), np.asarray(mask, bool)))
    return out if limit is None else out[:limit]


def _pack(examples: Sequence[Example], T: int) -> tuple[list[list[tuple]], int]:
    """Rows of at most T inputs: (x, y, segment) per example (y -100 off target), packed in
    order; examples with more than T + 1 tokens are left out and counted."""
    rows: list[list[tuple]] = []
    used, skipped = T, 0
    for ex in examples:
        n = len(ex.ids) - 1
        if n > T:
            skipped += 1
            continue
        if n < 1:
            continue
        x = ex.ids[:-1]
        y = np.where(ex.targets[1:], ex.ids[1:], -100)
        if used + n > T:
            rows.append([])
            used = 0
        rows[-1].append((x, y))
        used += n
    return rows, skipped


@torch.no_grad()
def completion_loss(model, examples: Sequence[Example], batch_size: int = 8) -> dict[str, float]:
    """{"loss", "perplexity", "target_tokens", "skipped"}: the summed cross-entropy of every
    target token (a completion token, predicted from the tokens before it in its own
    example) over their count. Examples longer than the model's context + 1 are skipped."""
    model.eval()
    device = next(model.parameters()).device
    rows, skipped = _pack(examples, model.cfg.context_length)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size]
        L = max(sum(len(x) for x, _ in r) for r in batch)
        xs = torch.zeros(len(batch), L, dtype=torch.long)
        ys = torch.full((len(batch), L), -100, dtype=torch.long)
        segs = torch.zeros(len(batch), L, dtype=torch.long)
        for b, r in enumerate(batch):
            t = 0
            for s, (x, y) in enumerate(r):
                xs[b, t : t + len(x)] = torch.from_numpy(x)
                ys[b, t : t + len(x)] = torch.from_numpy(y)
                segs[b, t : t + len(x)] = s
                t += len(x)
            segs[b, t:] = len(r)  # the padding: a segment of its own, no target
        xs, ys, segs = xs.to(device), ys.to(device), segs.to(device)
        logits, _ = model(xs, segments=segs)
        nll = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), ys.view(-1), reduction="sum"
        )
        total += nll.item()
        count += int((ys != -100).sum())
    if count == 0:
        raise EvaluationError("no completion (target) token to score in these examples")
    loss = total / count
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "target_tokens": count,
        "skipped": skipped,
    }


def answer_of(ex: Example) -> tuple[list[int], list[int]] | None:
    """(prompt, answer): the example's last run of target tokens and every token before it;
    None when it has no target or no token before its answer."""
    where = np.flatnonzero(ex.targets)
    if len(where) == 0:
        return None
    end = int(where[-1]) + 1
    start = end
    while start > 0 and ex.targets[start - 1]:
        start -= 1
    if start == 0:
        return None
    return ex.ids[:start].tolist(), ex.ids[start:end].tolist()


@torch.no_grad()
def exact_match(model, examples: Sequence[Example]) -> dict[str, float]:
    """{"exact_match", "matched", "answered"}: greedy decoding (through the KV cache, as
    `generate`) of as many tokens as each example's answer, compared token for token."""
    from lmforge.generation import SamplingParams, generate_tokens

    matched = answered = 0
    for ex in examples:
        pa = answer_of(ex)
        if pa is None:
            continue
        prompt, answer = pa
        params = SamplingParams(max_new_tokens=len(answer), temperature=0.0, top_k=None)
        got = list(generate_tokens(model, prompt, params))
        answered += 1
        matched += got == answer
    if answered == 0:
        raise EvaluationError("no example with a prompt and an answer to compare")
    return {"exact_match": matched / answered, "matched": matched, "answered": answered}


def evaluate_sft(
    model, ds: Dataset, batch_size: int = 8, max_examples: int | None = None
) -> dict[str, float]:
    """Completion-only loss and perplexity and greedy exact match on an SFT val split."""
    t0 = time.perf_counter()
    examples = read_examples(ds, "val", max_examples)
    if not examples:
        raise EvaluationError(f"{ds.path}: its val split has no example")
    lo = completion_loss(model, examples, batch_size)
    em = exact_match(model, examples)
    return {
        "val_loss": lo["loss"],
        "val_perplexity": lo["perplexity"],
        "exact_match": em["exact_match"],
        "examples": len(examples),
        "matched": em["matched"],
        "answered": em["answered"],
        "skipped_too_long": lo["skipped"],
        "tokens": lo["target_tokens"],
        "seconds": time.perf_counter() - t0,
    }


SFT_LOGGED = ("exact_match", "matched", "answered")


def log_sft_figures(model_uri: str, tracking_uri: str | None, metrics: dict[str, float]) -> None:
    """Beside `registry.log_evaluation`'s loss and perplexity (which on SFT data are the
    completion-only ones): the exact match, as `evaluate.*` metrics on the version's run at
    its step and an `evaluate.exact_match` tag on the version."""
    from lmforge.tracking import store
    from lmforge.tracking.registry import get_version

    version = get_version(model_uri, tracking_uri)
    c = store.client(store.resolve_uri(tracking_uri))
    step = int(version.tags.get("step", 0))
    for key in SFT_LOGGED:
        c.log_metric(version.run_id, f"evaluate.{key}", float(metrics[key]), step=step)
    c.set_model_version_tag(
        version.name, version.version, "evaluate.exact_match", f"{metrics['exact_match']:.6f}"
    )


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: Path, data: str | Path, batch_size: int = 8, max_batches: int | None = None
) -> dict[str, float]:
    """{"val_loss", "val_perplexity", "tokens", "seconds"} over the val split. On an SFT
    dataset, `evaluate_sft`'s figures (completion-only loss, exact_match, ...) over its
    first `max_batches * batch_size` examples (all by default)."""
    from lmforge.checkpoint import TOKENIZER, load_model
    from lmforge.paths import resolve

    ds = Dataset(resolve(data))
    ds.require_tokenizer(checkpoint / TOKENIZER, str(checkpoint))
    model, _, cfg = load_model(checkpoint)
    if ds.data_format == "sft":
        limit = None if max_batches is None else max_batches * batch_size
        return evaluate_sft(model, ds, batch_size, limit)
    T = cfg.model.context_length
    if ds.tokens("val") < T + 1:
        raise EvaluationError(f"{ds.path}: its val split is shorter than one window ({T + 1})")
    stream = TokenStream(ds, "val", T, batch_size, rank=0, world=1, seed=0, shuffle=False)
    total, tokens, t0 = 0.0, 0, time.perf_counter()
    for i, (x, y) in enumerate(stream.one_pass()):
        if max_batches is not None and i >= max_batches:
            break
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        tokens += y.numel()
    val_loss = total / tokens
    return {
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 50.0)),
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
    }
