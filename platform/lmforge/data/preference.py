"""Preference pairs: JSONL rows -> the chosen and the rejected conversation of each pair.

    for where, chosen, rejected in read_pairs("pairs.jsonl"):   # where = "pairs.jsonl:12"
        ...  # two message lists sharing the prompt; each ends with its assistant answer

A row is TRL's preference format, plain or conversational:

    {"prompt": "2+2?", "chosen": "4", "rejected": "5"}
    {"prompt": [{"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"}

A conversational answer may be a string, one message, or a list of messages (TRL's
datasets hold a one-message list). `prepare --format preference` renders both
conversations with the template (`lmforge.data.sft.encode`: only the answer's tokens are
targets) and writes them as two consecutive rows, chosen first, so a pair is never split
across row groups, workers or a re-sharded resume (`lmforge.preference.stream`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lmforge.data.sft import SFTDataError, read_jsonl
from lmforge.templates import ROLES

FIELDS = ("prompt", "chosen", "rejected")


def read_pairs(path: str | Path) -> Iterator[tuple[str, dict, dict]]:
    """(where, chosen, rejected) of each row, in file order; each side is
    `{"messages": [...], "answer_turns": n}` (its last n assistant turns are the answer)."""
    for where, row in read_jsonl(path):
        yield where, *check_pair(row, where)


def check_pair(row: object, where: str) -> tuple[dict, dict]:
    """The pair's two conversations, or an error naming the field that is wrong."""
    if not isinstance(row, dict):
        raise SFTDataError(f"{where}: a row is a JSON object, got {type(row).__name__}")
    for key in FIELDS:
        if key not in row:
            raise SFTDataError(
                f"{where}: missing field {key!r} (a preference row has prompt, chosen, rejected)"
            )
    prompt = _prompt(row["prompt"], where)
    chosen = _answer(row["chosen"], where, "chosen")
    rejected = _answer(row["rejected"], where, "rejected")
    return _side(prompt, chosen), _side(prompt, rejected)


def _side(prompt: list[dict], answer: list[dict]) -> dict:
    turns = sum(m["role"] == "assistant" for m in answer)
    return {"messages": prompt + answer, "answer_turns": turns}


def _prompt(value: object, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise SFTDataError(f"{where}: 'prompt' must be a string or a non-empty list of messages")
    return [_message(m, where, f"prompt[{i}]") for i, m in enumerate(value)]


def _answer(value: object, where: str, key: str) -> list[dict]:
    if isinstance(value, str):
        msgs = [{"role": "assistant", "content": value}]
    elif isinstance(value, dict):
        msgs = [_message(value, where, key)]
    elif isinstance(value, list) and value:
        msgs = [_message(m, where, f"{key}[{i}]") for i, m in enumerate(value)]
    else:
        raise SFTDataError(
            f"{where}: {key!r} must be a string, a message or a list of messages, "
            f"got {type(value).__name__}"
        )
    if msgs[-1]["role"] != "assistant":
        raise SFTDataError(f"{where}: {key!r} must end with an assistant message")
    if not msgs[-1]["content"].strip():
        raise SFTDataError(f"{where}: {key!r} is empty: nothing to prefer")
    return msgs


def _message(m: object, where: str, field: str) -> dict:
    if not isinstance(m, dict) or not {"role", "content"} <= m.keys():
        raise SFTDataError(f"{where}: {field} needs 'role' and 'content'")
    if m["role"] not in ROLES:
        raise SFTDataError(f"{where}: {field}.role is {m['role']!r} (one of {ROLES})")
    if not isinstance(m["content"], str):
        raise SFTDataError(f"{where}: {field}.content must be a string")
    return {"role": m["role"], "content": m["content"]}
