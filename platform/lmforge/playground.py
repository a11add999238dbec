"""Generation for people at a web page: a registered version, a prompt, pieces of text.

    loaded = load("models:/tiny@best")
    prompt = fit_prompt(loaded, "ROMEO:", max_new_tokens=100)
    for piece in stream(loaded, prompt, SamplingParams(max_new_tokens=100, seed=0)): ...

The dashboard caches `load` per (URI, tracking URI) so a model is read once. A prompt
longer than the context keeps its last tokens and says so (`Prompt.notice`) instead of
failing; an empty prompt starts from the end-of-text token (an unconditional sample).

Chat and templated prompts: `template_choices(loaded)` lists the version's own template
(the one it was trained with, or an imported model's chat template) first, then the
built-ins; `render_prompt` gives the exact text the model will see (the page previews it).
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge import models, templates
from lmforge.config import Config
from lmforge.generation import Piece, SamplingParams, TokenChoice, stream_ids, stream_samples
from lmforge.models import LanguageModel
from lmforge.templates import Template
from lmforge.tokenizer import eot_id, eot_token

OWN = "the version's own"  # the template_choices key of the version's own template


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


def stream_pieces(loaded: Loaded, prompt: Prompt, params: SamplingParams) -> Iterator[Piece]:
    """Every sample's pieces (`params.n` of them, in one batch), ending at the end token."""
    params = dataclasses.replace(params, stop_token=eot_id(loaded.tokenizer))
    yield from stream_samples(loaded.model, loaded.tokenizer, prompt.ids, params)


def template_choices(loaded: Loaded) -> dict[str, Template | None]:
    """The templates a prompt can be written in: none (raw text), the version's own (if it
    has one) and the built-ins, with the tokenizer's end token and few-shot left empty."""
    eos = eot_token(loaded.tokenizer) or ""
    out: dict[str, Template | None] = {"none (raw text)": None}
    own = templates.of_folder(loaded.checkpoint)
    if own is not None:
        out[f"{OWN} ({own.name})"] = own
    for name in templates.NAMES:
        if name != "few-shot":  # needs examples: built by `with_examples`
            out[name] = templates.get(name, eos_token=eos)
    return out


def with_examples(loaded: Loaded, examples: Sequence[Mapping[str, str]]) -> Template:
    """The few-shot template with the page's examples."""
    return templates.get("few-shot", eos_token=eot_token(loaded.tokenizer) or "", examples=examples)


def render_prompt(
    template: Template | None, messages: Sequence[Mapping[str, str]], cue: str | None = None
) -> str:
    """The exact text the model is given: the conversation in `template`, ready for the
    assistant's reply, then `cue` (a chain-of-thought cue) if given. Without a template,
    the last message's content as it is."""
    text = messages[-1]["content"] if template is None else template.render(messages, True)
    return f"{text} {cue}" if cue else text


def token_html(tokenizer, tokens: Sequence[TokenChoice], prefix: str = "") -> str:
    """The tokens as HTML after `prefix` (unshaded), each shaded by its probability (red:
    unlikely, green: likely), its probability and alternatives in the tooltip; all escaped."""
    spans = [f'<span style="white-space:pre-wrap">{html.escape(prefix)}</span>'] if prefix else []
    for c in tokens:
        p = math.exp(c.logprob) if c.logprob is not None else 1.0
        hue = int(120 * p)  # 0 red .. 120 green
        alts = ", ".join(f"{tokenizer.decode([t])!r} {math.exp(v):.0%}" for t, v in c.top)
        tip = html.escape(f"p={p:.1%}  top: {alts}", quote=True)
        text = html.escape(tokenizer.decode([c.token]))
        spans.append(
            f'<span title="{tip}" style="background:hsl({hue},70%,82%);'
            f'white-space:pre-wrap">{text}</span>'
        )
    return "".join(spans)
