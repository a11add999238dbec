"""Sampling text from a trained model: temperature, top-k, top-p, repetition penalty,
`n` samples in one batch, stop tokens and strings, log-probabilities, KV cache, streaming.

    for token_id in generate_tokens(model, prompt_ids, SamplingParams(max_new_tokens=50)):
        ...
    for step in generate_steps(model, prompt_ids, SamplingParams(n=4, logprobs=5)):
        step[i].token, step[i].logprob, step[i].top     # None once sample i has stopped
    samples = complete_samples(model, tokenizer, prompt_ids, params)   # [Sample(text, ...)]

The `n` samples of a prompt share one forward pass per token (a batch of n rows of the
same prompt, one cache). Log-probabilities are the model's own distribution
(`log_softmax` of its logits, before temperature, top-k/top-p and the repetition
penalty), as an API's `logprobs` report them; `top` is the `logprobs` most likely tokens.
The repetition penalty is CTRL's (Keskar et al. 2019, as transformers applies it): the
logit of every token already in the sequence, prompt included, is divided by the
penalty when positive and multiplied by it when negative. The presence and frequency
penalties are OpenAI's (additive, over the tokens generated so far, not the prompt's, as
vLLM applies them): a token's logit minus `frequency_penalty` times its count, minus
`presence_penalty` once it has appeared.

The CLI, the dashboard playground and the registry's pyfunc model all call this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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
    n: int = 1  # samples of the prompt, generated together in one batch
    repetition_penalty: float = 1.0  # 1: off; > 1 discourages repeats
    presence_penalty: float = 0.0  # OpenAI's, -2..2: > 0 discourages any generated token again
    frequency_penalty: float = 0.0  # OpenAI's, -2..2: > 0 discourages each by its count
    stop: tuple[str, ...] = ()  # strings that end a sample (not part of its text)
    logprobs: int | None = None  # report each token's log-prob and this many alternatives

    def __post_init__(self) -> None:
        if self.n < 1:
            raise UsageError(f"n must be >= 1 (got {self.n})")
        if self.repetition_penalty <= 0:
            raise UsageError(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UsageError(f"{name} must be in [-2, 2] (got {getattr(self, name)})")
        if self.logprobs is not None and self.logprobs < 0:
            raise UsageError(f"logprobs must be >= 0 (got {self.logprobs})")
        if any(not s for s in self.stop):
            raise UsageError("a stop string must not be empty")
        if self.max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0 (got {self.temperature})")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"top_k must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1] (got {self.top_p})")


@dataclass(frozen=True)
class TokenChoice:
    token: int
    logprob: float | None = None  # under the model's distribution; None unless asked
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens and their log-probs


@dataclass
class Sample:
    text: str
    tokens: list[TokenChoice] = field(default_factory=list)
    finish: str = "length"  # "length", "stop_token" or "stop_string"


def penalize_repeats(logits: torch.Tensor, seq: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty on (B, V) logits for the (B, L) tokens seen so far."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, seq)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, seq, seen)


def penalize_counts(
    logits: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's additive penalties on (B, V) logits for the (B, G) tokens generated so far."""
    if (presence == 0 and frequency == 0) or generated.size(1) == 0:
        return logits
    ones = torch.ones_like(generated, dtype=logits.dtype)
    counts = torch.zeros_like(logits).scatter_add_(1, generated, ones)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


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
    """Yield the first sample's new token ids one at a time, stopping at `params.stop_token`."""
    for step in generate_steps(model, prompt_ids, params, use_cache):
        if step[0] is None:
            return
        yield step[0].token


@torch.no_grad()
def generate_steps(
    model: LanguageModel, prompt_ids: list[int], params: SamplingParams, use_cache: bool = True
) -> Iterator[list[TokenChoice | None]]:
    """Yield, per new position, each of the `params.n` samples' token (None once stopped).

    A prompt longer than the window keeps its last window-1 tokens (with a warning); the
    window is the cache's capacity (the context for a KV cache, unbounded for a recurrent
    state, which takes any prompt whole and is never refilled), or the context without one.
    When the cache fills up, it is rebuilt from the last three quarters of the context, so
    long generations go on at a small cost instead of failing. Past a full context the two
    paths differ, by design: with the cache, a token sees the tokens since the last refill
    (3/4 to all of a context); without it (`use_cache=False`), always the last context.
    An architecture without a cache generates the second way. A sample that stopped stays
    in the batch (its row is computed and ignored) until every sample has stopped.
    """
    if not prompt_ids:
        raise UsageError("the prompt is empty: give at least one token")
    model.eval()
    n = params.n
    new_cache = models.of(model).new_cache
    use_cache = use_cache and new_cache is not None
    ctx = model.cfg.context_length
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = new_cache(model, n, device, dtype) if use_cache else None
    window = cache.capacity if cache is not None else ctx  # the most tokens one pass sees
    if len(prompt_ids) > window - 1:
        keep = int(window - 1)
        log.warning("prompt has %d tokens; keeping the last %d (context)", len(prompt_ids), keep)
        prompt_ids = prompt_ids[-keep:]
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    seq = torch.tensor([prompt_ids] * n, dtype=torch.long, device=device)  # (n, L)
    pending = seq
    alive = [True] * n
    for _ in range(params.max_new_tokens):
        if use_cache:
            if cache.length + pending.size(1) > cache.capacity:  # full: refill, recent tokens
                cache = new_cache(model, n, device, dtype)
                pending = seq[:, -(3 * ctx // 4) :]
            logits, _ = model(pending, cache=cache)
        else:
            logits, _ = model(seq[:, -ctx:])
        nxt, step = sample_step(logits[:, -1, :], seq, params, generator, len(prompt_ids))
        seq = torch.cat([seq, nxt], dim=1)
        pending = nxt
        for i, choice in enumerate(step):
            if alive[i] and params.stop_token is not None and choice.token == params.stop_token:
                alive[i] = False
        if not any(alive):
            return
        yield [c if a else None for c, a in zip(step, alive, strict=True)]


def sample_step(
    logits: torch.Tensor,
    seq: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    prompt_len: int = 0,
) -> tuple[torch.Tensor, list[TokenChoice]]:
    """One position of a prompt's samples: from the last logits (n, V) and the tokens so far
    (n, L; the first `prompt_len` the prompt's), the next tokens (n, 1) and each row's
    TokenChoice. `generate_steps` and the server's running batch (lmforge.serving) both
    pick every token here."""
    logits = logits.float()
    steered = penalize_repeats(logits, seq, params.repetition_penalty)
    steered = penalize_counts(
        steered, seq[:, prompt_len:], params.presence_penalty, params.frequency_penalty
    )
    nxt = sample_next(steered, params, generator)
    return nxt, _choices(logits, nxt, params.logprobs)


def _choices(logits: torch.Tensor, nxt: torch.Tensor, k: int | None) -> list[TokenChoice]:
    """Each row's chosen token with, when `k` is set, its log-prob and the top-k alternatives."""
    tokens = nxt.view(-1).tolist()
    if k is None:
        return [TokenChoice(t) for t in tokens]
    logp = torch.log_softmax(logits, dim=-1)
    chosen = logp.gather(1, nxt).view(-1).tolist()
    top_v, top_i = logp.topk(min(k, logp.size(-1)), dim=-1)
    return [
        TokenChoice(t, lp, tuple(zip(ti, tv, strict=True)))
        for t, lp, ti, tv in zip(tokens, chosen, top_i.tolist(), top_v.tolist(), strict=True)
    ]


class _Detokenizer:
    """One sample's text as its tokens come: whole characters only, cut at a stop string.

    A byte-level BPE token can end inside a multi-byte character, and text that could be
    the start of a stop string may still become one: both are held back until known.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.shown = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._show(text[: min(hits)])
        hold = max(
            (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
        )
        return self._show(text[: len(text) - hold])

    def flush(self) -> str:
        return "" if self.stopped else self._show(self.tokenizer.decode(self.ids))

    def _show(self, text: str) -> str:
        piece, self.shown = text[len(self.shown) :], text
        return piece


@dataclass(frozen=True)
class Piece:
    """New text of one sample; its last piece carries `finish` (why it ended)."""

    index: int  # which of the n samples
    text: str
    token: TokenChoice | None = None  # the token that made it; None on a closing piece
    finish: str | None = None  # "length", "stop_token", "stop_string" on the last piece


class PieceMaker:
    """Each step's tokens of a prompt's `params.n` samples -> their new text (`Piece`s),
    ending a sample at the stop token (a None choice), a stop string or the end of the
    steps (`close`). `stream_samples` and the server's running batch share it."""

    def __init__(self, tokenizer, params: SamplingParams) -> None:
        self.detok = [_Detokenizer(tokenizer, params.stop) for _ in range(params.n)]
        self.finish: list[str | None] = [None] * params.n

    @property
    def done(self) -> bool:
        return all(self.finish)

    def step(self, step: list[TokenChoice | None]) -> Iterator[Piece]:
        for i, choice in enumerate(step):
            if self.finish[i] is not None:
                continue
            if choice is None:
                self.finish[i] = "stop_token"
                yield Piece(i, self.detok[i].flush(), None, self.finish[i])
                continue
            text = self.detok[i].push(choice.token)
            if self.detok[i].stopped:
                self.finish[i] = "stop_string"
            yield Piece(i, text, choice, self.finish[i])

    def close(self, reason: str) -> Iterator[Piece]:
        """The closing piece of every sample still going, ended for `reason`."""
        for i, d in enumerate(self.detok):
            if self.finish[i] is None:
                self.finish[i] = reason
                yield Piece(i, d.flush(), None, reason)


def stream_samples(
    model: LanguageModel, tokenizer, ids: list[int], params: SamplingParams
) -> Iterator[Piece]:
    """Each of the `params.n` samples' text as it grows, ending at the stop token, a stop
    string (not part of the text) or `max_new_tokens`."""
    pieces = PieceMaker(tokenizer, params)
    steps = 0
    for step in generate_steps(model, ids, params):
        steps += 1
        yield from pieces.step(step)
        if pieces.done:
            return
    # generate_steps ends early only when every sample has met the stop token.
    yield from pieces.close("length" if steps == params.max_new_tokens else "stop_token")


def complete_samples(
    model: LanguageModel,
    tokenizer,
    ids: list[int],
    params: SamplingParams,
    on_piece: Callable[[Piece], None] | None = None,
) -> list[Sample]:
    """The `params.n` whole continuations of a prompt, with their tokens and why each ended
    (`on_piece` sees each piece as it comes, e.g. to stream one sample)."""
    samples = [Sample("") for _ in range(params.n)]
    for piece in stream_samples(model, tokenizer, ids, params):
        if on_piece is not None:
            on_piece(piece)
        s = samples[piece.index]
        s.text += piece.text
        if piece.token is not None:
            s.tokens.append(piece.token)
        if piece.finish is not None:
            s.finish = piece.finish
    return samples


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
    """`stream_text` for a prompt already encoded (e.g. cut to fit the context): the first
    sample's text, ending before a stop string."""
    for piece in stream_samples(model, tokenizer, ids, params):
        if piece.index == 0 and piece.text:
            yield piece.text


def complete(model: LanguageModel, tokenizer, prompt: str, params: SamplingParams) -> str:
    """The whole continuation of `prompt` at once."""
    return "".join(stream_text(model, tokenizer, prompt, params))
