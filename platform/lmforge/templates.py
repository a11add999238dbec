"""Prompt templates: how a conversation becomes the exact text a model reads and is trained on.

    t = templates.get("instruct", eos_token="<|endoftext|>")
    t.render([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True)
    text, targets = t.render_with_targets(templates.to_messages(
        {"prompt": "Name a colour.", "completion": "Red."}))   # targets: (start, end) spans

Every template is a Jinja2 text over `messages` (a list of `{"role", "content"}`), rendered
the way transformers' `apply_chat_template` renders a Hugging Face `chat_template` (a
sandboxed `ImmutableSandboxedEnvironment` with `trim_blocks`/`lstrip_blocks`, `loopcontrols`,
a `tojson` that does not escape HTML, `raise_exception`, `strftime_now`; the special tokens
and `add_generation_prompt` as variables), so one code path serves the built-in templates,
a user's own Jinja2 file and an imported model's `chat_template`. Why not call
transformers: it is a test dependency only, and this is the small part of it we need.

Built in (`NAMES`): `plain` (prompt then completion, nothing between), `instruct`
(instruction / response), `chat` (a turn per role), `few-shot` (k worked examples before the
question) and `chain-of-thought` (a reasoning cue, then the model reasons and answers). Our
templates end every assistant turn with the tokenizer's end token, so a fine-tuned model
learns to stop.

Targets (the loss mask): the text of each assistant turn, found as what rendering that
turn adds after the generation prompt of the turns before it; the template must render
the earlier turns as a prefix of the later ones (every common chat template does, and a
template that does not is refused by name). The whitespace a template puts after a turn is
formatting, not target.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import UsageError

ROLES = ("system", "user", "assistant")
COT_CUE = "Let's think step by step."
# A newline right after a block tag is eaten by trim_blocks: those are written {{ '\n' }}.
# The special tokens transformers passes to a chat template (its `special_tokens_map`).
SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

_BUILT_IN = {
    "plain": (
        "{% for m in messages %}{% if m.role != 'system' %}{{ m.content }}{% endif %}"
        "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "instruct": (
        "{% for m in messages %}"
        "{% if m.role == 'system' %}{{ m.content }}\n\n"
        "{% elif m.role == 'user' %}### Instruction:\n{{ m.content }}\n\n### Response:\n"
        "{% else %}{{ m.content }}{{ eos_token }}\n\n{% endif %}"
        "{% endfor %}"
    ),
    "chat": (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}"
        "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "few-shot": (
        "{% for m in messages if m.role == 'system' %}{{ m.content }}\n\n{% endfor %}"
        "{% for ex in examples %}Q: {{ ex.prompt }}\nA: {{ ex.completion }}\n\n{% endfor %}"
        "{% for m in messages if m.role != 'system' %}"
        "{% if m.role == 'user' %}Q: {{ m.content }}\nA:"
        "{% else %} {{ m.content }}{{ eos_token }}\n\n{% endif %}"
        "{% endfor %}"
    ),
    "chain-of-thought": (
        "{% for m in messages %}"
        "{% if m.role == 'system' %}{{ m.content }}\n\n"
        "{% elif m.role == 'user' %}Q: {{ m.content }}\nA: {{ cue }}"
        "{% else %} {{ m.content }}{{ eos_token }}\n\n{% endif %}"
        "{% endfor %}"
    ),
}
NAMES = tuple(_BUILT_IN)


class TemplateError(UsageError):
    pass


@dataclass(frozen=True)
class Template:
    """A named Jinja2 prompt template and the variables it is rendered with."""

    name: str
    source: str
    variables: Mapping[str, Any] = field(default_factory=dict)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False):
        """The text the model sees; with `add_generation_prompt`, ready for its reply."""
        try:
            return _compile(self.source).render(
                messages=_plain(list(messages)),
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **_plain(dict(self.variables)),
            )
        except jinja2.TemplateError as err:
            raise TemplateError(f"template {self.name!r}: {err}") from None

    def render_with_targets(
        self, messages: Sequence[Mapping[str, Any]]
    ) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation and the (start, end) character spans of its assistant turns."""
        check_messages(messages, self.name)
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise TemplateError(
                    f"template {self.name!r}: turn {i} does not render as a continuation of the "
                    "turns before it, so its targets cannot be found"
                )
            end = len(upto.rstrip())
            if end > len(prompt):
                spans.append((len(prompt), end))
        return text, spans

    def describe(self) -> dict:
        """What is stored with a dataset and a registered version: enough to rebuild it."""
        return {"name": self.name, "source": self.source, "variables": dict(self.variables)}

    @classmethod
    def from_description(cls, d: Mapping[str, Any]) -> Template:
        return cls(d["name"], d["source"], dict(d.get("variables", {})))


def get(
    name: str,
    eos_token: str = "",
    examples: Sequence[Mapping[str, str]] = (),
    cue: str = COT_CUE,
) -> Template:
    """A built-in template; `examples` ({prompt, completion}) are few-shot's, `cue` is CoT's."""
    if name not in _BUILT_IN:
        raise TemplateError(f"unknown template {name!r} (built in: {', '.join(NAMES)})")
    if name == "few-shot" and not examples:
        raise TemplateError(
            "template 'few-shot' needs examples (a JSONL file of prompt/completion)"
        )
    variables: dict[str, Any] = {"eos_token": eos_token}
    if name == "few-shot":
        variables["examples"] = [
            {"prompt": e["prompt"], "completion": e["completion"]} for e in examples
        ]
    if name == "chain-of-thought":
        variables["cue"] = cue
    return Template(name, _BUILT_IN[name], variables)


def from_file(path: str | Path, eos_token: str = "") -> Template:
    """A user's own Jinja2 template file (rendered in the same sandbox)."""
    p = Path(path)
    if not p.is_file():
        raise TemplateError(f"{p}: template file not found")
    source = p.read_text()
    _compile_checked(source, str(p))
    return Template(p.stem, source, {"eos_token": eos_token})


def from_tokenizer_config(path: str | Path) -> Template | None:
    """The `chat_template` of a Hugging Face `tokenizer_config.json`, with its special tokens."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text())
    except ValueError as err:
        raise TemplateError(f"{p}: not JSON ({err})") from None
    source = cfg.get("chat_template")
    if isinstance(source, list):  # named templates: transformers uses "default"
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if not isinstance(source, str) or not source:
        return None
    _compile_checked(source, str(p))
    variables = {}
    for key in SPECIAL_TOKENS:
        value = cfg.get(key)
        if isinstance(value, dict):  # an AddedToken: {"content": "</s>", ...}
            value = value.get("content")
        if isinstance(value, str):
            variables[key] = value
    return Template("chat_template", source, variables)


TEMPLATE_FILE = "template.json"  # beside a dataset's manifest and in a checkpoint


def save(template: Template, folder: str | Path) -> None:
    Path(folder, TEMPLATE_FILE).write_text(json.dumps(template.describe(), indent=2))


def of_folder(folder: str | Path) -> Template | None:
    """The template a dataset or checkpoint was made with: its `template.json`, else the
    `chat_template` of the Hugging Face `tokenizer_config.json` beside it, else None."""
    p = Path(folder, TEMPLATE_FILE)
    if p.is_file():
        try:
            return Template.from_description(json.loads(p.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise TemplateError(f"{p}: not a template description ({err})") from None
    return from_tokenizer_config(Path(folder, "tokenizer_config.json"))


def trained_with(folder: str | Path) -> Template | None:
    """The template a checkpoint's model was trained with: its `template.json` (written
    when the run's dataset was an SFT one), else None (a chat_template is not implied)."""
    return of_folder(folder) if Path(folder, TEMPLATE_FILE).is_file() else None


def as_prompt(template: Template | None, prompt: str) -> str:
    """`prompt` as the text the model is given: the user's turn in `template`, ready for
    the reply (the format it was trained on); `prompt` itself without a template."""
    if template is None:
        return prompt
    return template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)


def to_messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """A data row as messages: {prompt, completion} -> user + assistant; {messages} as is."""
    if "messages" in row:
        return [dict(m) for m in row["messages"]]
    return [
        {"role": "user", "content": row["prompt"]},
        {"role": "assistant", "content": row["completion"]},
    ]


def check_messages(messages: Sequence[Mapping[str, Any]], where: str) -> None:
    """Each message a {role, content} with a known role and string content."""
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise TemplateError(f"{where}: message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise TemplateError(f"{where}: message {i} has role {m['role']!r} (one of {ROLES})")
        if not isinstance(m["content"], str):
            raise TemplateError(f"{where}: message {i}'s content is not a string")


def _compile_checked(source: str, where: str) -> None:
    try:
        _compile(source)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(f"{where}: Jinja2 syntax error at line {err.lineno}: {err}") from None


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


_ENV = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
)
_ENV.filters["tojson"] = _tojson
_ENV.globals["raise_exception"] = _raise
_ENV.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    # Jinja2 caches only templates loaded by name; from_string compiles each time (3 ms),
    # and SFT encoding renders each row three times.
    return _ENV.from_string(source)


def _plain(value: Any) -> Any:
    """Only plain JSON types reach a template (the sandbox's surface stays small)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"
