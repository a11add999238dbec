"""Instruction data: JSONL rows -> template-rendered token ids with a per-token loss mask.

    for where, messages in read_rows("train.jsonl"):       # where = "train.jsonl:12"
        ex = encode(tok, template, messages, max_tokens=257, policy="drop")
        ex.ids, ex.targets          # int64 ids; True where the token is a completion token

A row is `{"prompt": str, "completion": str}` or `{"messages": [{"role", "content"}, ...]}`
(at least one assistant turn). The template (`lmforge.templates`) renders the row; the
tokens whose characters overlap an assistant turn are targets, every other token is
context only. A token that straddles the boundary (possible only where the template puts
nothing between prompt and completion, e.g. `plain`) counts as a target, so no completion
character goes unlearned.

A row longer than `max_tokens` follows `policy`: `drop` skips it (counted by the caller),
`cut-prompt` drops tokens from the start (the oldest context) as long as every target
token is kept, and drops the row when even that cannot fit it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmforge.errors import UsageError
from lmforge.templates import ROLES, Template, to_messages

POLICIES = ("drop", "cut-prompt")


class SFTDataError(UsageError):
    pass


@dataclass(frozen=True)
class Example:
    ids: np.ndarray  # int64 token ids
    targets: np.ndarray  # bool, True for completion (assistant) tokens
    cut: int = 0  # prompt tokens dropped from the start by `cut-prompt`


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """("file:line", the parsed row) of each non-blank line of a JSONL file."""
    p = Path(path)
    if not p.is_file():
        raise SFTDataError(f"{p}: file not found")
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                yield where, json.loads(line)
            except ValueError as err:
                raise SFTDataError(f"{where}: not JSON ({err})") from None


def read_rows(path: str | Path) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Each row of a JSONL file as messages, with "file:line" for error messages."""
    for where, row in read_jsonl(path):
        yield where, check_row(row, where)


def check_row(row: object, where: str) -> list[dict[str, str]]:
    """The row's messages, or an error naming the field that is wrong."""
    if not isinstance(row, dict):
        raise SFTDataError(f"{where}: a row is a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise SFTDataError(f"{where}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
                raise SFTDataError(f"{where}: messages[{i}] needs 'role' and 'content'")
            if m["role"] not in ROLES:
                raise SFTDataError(f"{where}: messages[{i}].role is {m['role']!r} (one of {ROLES})")
            if not isinstance(m["content"], str):
                raise SFTDataError(f"{where}: messages[{i}].content must be a string")
        replies = [m for m in msgs if m["role"] == "assistant"]
        if not replies:
            raise SFTDataError(f"{where}: no assistant message: nothing to train on")
        if not any(m["content"].strip() for m in replies):
            raise SFTDataError(f"{where}: every assistant message is empty")
        return to_messages(row)
    for key in ("prompt", "completion"):
        if key not in row:
            raise SFTDataError(
                f"{where}: missing field {key!r} (a row has prompt and completion, or messages)"
            )
        if not isinstance(row[key], str):
            raise SFTDataError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    if not row["completion"].strip():
        raise SFTDataError(f"{where}: empty completion")
    return to_messages(row)


def encode(
    tok: Tokenizer,
    template: Template,
    messages: list[dict[str, str]],
    max_tokens: int,
    policy: str = "drop",
    answer_turns: int = 0,
) -> Example | None:
    """Token ids and target mask of one row; None when `policy` drops it for length.
    `answer_turns` > 0: only the last that many assistant turns are targets (a preference
    pair's answer; the assistant turns of its prompt are context)."""
    if policy not in POLICIES:
        raise SFTDataError(f"unknown length policy {policy!r} (one of {POLICIES})")
    text, spans = template.render_with_targets(messages)
    if answer_turns:
        spans = spans[-answer_turns:]
    enc = tok.encode(text)
    ids = np.asarray(enc.ids, dtype=np.int64)
    targets = np.zeros(len(ids), dtype=bool)
    for i, (start, end) in enumerate(enc.offsets):
        targets[i] = any(start < b and end > a for a, b in spans)
    if len(ids) <= max_tokens:
        return Example(ids, targets)
    if policy == "drop":
        return None
    cut = len(ids) - max_tokens
    if targets[:cut].any():  # the oldest turns' targets would go: cannot cut the prompt only
        return None
    return Example(ids[cut:], targets[cut:], cut)
