"""Sampling text from a trained model: temperature, top-k, top-p, KV cache, streaming.

    for token_id in generate_tokens(model, prompt_ids, SamplingParams(max_new_tokens=50)):
        ...

The CLI, the dashboard playground and the registry's pyfunc model all call `generate_tokens`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lmforge import models
from lmforge.errors import UsageError
from lmforge.models import LanguageModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 100
    temperature: float = 0.8  # 0 means greedy
    top_k: int | None = 50
    top_p: float | None = None
    seed: int | None = None
    stop_token: int | None = None  # usually the tokenizer's end-of-text id

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] (got {self.top_p})")


def sample_next(
    logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pick the next token for each row of `logits` (B, V) -> (B, 1)."""
    logits = logits.float()
    if p.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / p.temperature
    if p.top_k is not None and p.top_k < logits.size(-1):
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= p.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate_tokens(
    model: LanguageModel, prompt_ids: list[int], params: SamplingParams, use_cache: bool = True
) -> Iterator[int]:
    """Yield new token ids one at a time (batch 1), stopping at `params.stop_token`.

    A prompt longer than the window keeps its last window-1 tokens (with a warning); the
    window is the cache's capacity (the context for a KV cache, unbounded for a recurrent
    state, which takes any prompt whole and is never refilled), or the context without one.
    When the cache fills up, it is rebuilt from the last three quarters of the context, so
    long generations go on at a small cost instead of failing. Past a full context the two
    paths differ, by design: with the cache, a token sees the tokens since the last refill
    (3/4 to all of a context); without it (`use_cache=False`), always the last context.
    An architecture without a cache generates the second way.
    """
    if not prompt_ids:
        raise UsageError("the prompt is empty: give at least one token")
    model.eval()
    new_cache = models.of(model).new_cache
    use_cache = use_cache and new_cache is not None
    ctx = model.cfg.context_length
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = new_cache(model, 1, device, dtype) if use_cache else None
    window = cache.capacity if cache is not None else ctx  # the most tokens one pass sees
    if len(prompt_ids) > window - 1:
        keep = int(window - 1)
        log.warning("prompt has %d tokens; keeping the last %d (context)", len(prompt_ids), keep)
        prompt_ids = prompt_ids[-keep:]
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seq = list(prompt_ids)
    pending = torch.tensor([seq], dtype=torch.long, device=device)
    for _ in range(params.max_new_tokens):
        if use_cache:
            if cache.length + pending.size(1) > cache.capacity:  # full: refill, recent tokens
                cache = new_cache(model, 1, device, dtype)
                pending = torch.tensor([seq[-(3 * ctx // 4) :]], dtype=torch.long, device=device)
            logits, _ = model(pending, cache=cache)
        else:
            logits, _ = model(torch.tensor([seq[-ctx:]], dtype=torch.long, device=device))
        nxt = sample_next(logits[:, -1, :], params, generator)
        token = int(nxt.item())
        if params.stop_token is not None and token == params.stop_token:
            return
        seq.append(token)
        pending = nxt.view(1, 1)
        yield token


def stream_text(
    model: LanguageModel, tokenizer, prompt: str, params: SamplingParams
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, as soon as each one is whole.

    A byte-level BPE token can end inside a multi-byte character; such a piece is held back
    until the character is complete, so a caller can print every piece as it comes.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    yield from stream_ids(model, tokenizer, ids, params)


def stream_ids(
    model: LanguageModel, tokenizer, ids: list[int], params: SamplingParams
) -> Iterator[str]:
    """`stream_text` for a prompt already encoded (e.g. cut to fit the context)."""
    out: list[int] = []
    shown = ""
    for token in generate_tokens(model, ids, params):
        out.append(token)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):
            yield text[len(shown) :]
            shown = text
    rest = tokenizer.decode(out)[len(shown) :]
    if rest:
        yield rest


def complete(model: LanguageModel, tokenizer, prompt: str, params: SamplingParams) -> str:
    """The whole continuation of `prompt` at once."""
    return "".join(stream_text(model, tokenizer, prompt, params))
