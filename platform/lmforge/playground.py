"""Generation for people at a web page: a registered version, a prompt, pieces of text.

    loaded = load("models:/tiny@best")
    prompt = fit_prompt(loaded, "ROMEO:", max_new_tokens=100)
    for piece in stream(loaded, prompt, SamplingParams(max_new_tokens=100, seed=0)): ...

The dashboard caches `load` per (URI, tracking URI) so a model is read once. A prompt
longer than the context keeps its last tokens and says so (`Prompt.notice`) instead of
failing; an empty prompt starts from the end-of-text token (an unconditional sample).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge import models
from lmforge.config import Config
from lmforge.generation import SamplingParams, stream_ids
from lmforge.models import LanguageModel
from lmforge.tokenizer import eot_id


@dataclass
class Loaded:
    uri: str
    version: str
    checkpoint: Path
    model: LanguageModel
    tokenizer: object
    config: Config

    @property
    def context_length(self) -> int:
        return self.config.model.context_length


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    notice: str | None = None  # why the prompt was changed, for the page to show


def load(model_uri: str, tracking_uri: str | None = None) -> Loaded:
    """A registered version, fetched once into the local cache, loaded on the CPU."""
    from lmforge.checkpoint import load_model
    from lmforge.tracking.registry import fetch_checkpoint, get_version

    version = get_version(model_uri, tracking_uri)
    ckpt = fetch_checkpoint(f"models:/{version.name}/{version.version}", tracking_uri)
    model, tok, cfg = load_model(ckpt)
    return Loaded(model_uri, str(version.version), ckpt, model, tok, cfg)


def fit_prompt(loaded: Loaded, text: str, max_new_tokens: int) -> Prompt:
    """The prompt's token ids, cut to leave room in the context for at least one new token."""
    tok = loaded.tokenizer
    ids = tok.encode(text, add_special_tokens=False).ids if text else []
    if not ids:
        return Prompt([eot_id(tok)], "empty prompt: sampling from the start of a document")
    if not models.of(loaded.model).context_limited:  # a recurrent state takes any length
        return Prompt(ids)
    room = loaded.context_length - 1
    if len(ids) <= room:
        return Prompt(ids)
    return Prompt(
        ids[-room:],
        f"the prompt has {len(ids):,} tokens but the model's context is "
        f"{loaded.context_length}: kept its last {room} tokens",
    )


def stream(loaded: Loaded, prompt: Prompt, params: SamplingParams) -> Iterator[str]:
    """The continuation as text pieces, stopping at the end-of-text token."""
    params = dataclasses.replace(params, stop_token=eot_id(loaded.tokenizer))
    yield from stream_ids(loaded.model, loaded.tokenizer, prompt.ids, params)
