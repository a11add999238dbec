"""Instruction rows: read with errors naming file:line, encoded with a completion-only mask."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge import templates
from lmforge.data import sft
from lmforge.data.sft import SFTDataError
from lmforge.tokenizer import EOT, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    text = "### Instruction:\nName a colour.\n\n### Response:\nRed, blue or green. Q: A:"
    return train_tokenizer([text] * 30, vocab_size=320)


def split(tok, ex):
    """(the decoded target tokens, the decoded context tokens)."""
    ids = ex.ids.tolist()
    return (
        tok.decode(
            [i for i, t in zip(ids, ex.targets, strict=True) if t], skip_special_tokens=False
        ),
        tok.decode([i for i, t in zip(ids, ex.targets, strict=True) if not t]),
    )


@pytest.mark.parametrize("name", ["plain", "instruct", "chat", "few-shot", "chain-of-thought"])
def test_only_completion_tokens_are_targets(tok, name):
    t = templates.get(name, eos_token=EOT, examples=[{"prompt": "Sky?", "completion": "Blue."}])
    row = {"prompt": "Name a colour.", "completion": "Red, blue or green."}
    ex = sft.encode(tok, t, templates.to_messages(row), max_tokens=1000)
    targets, context = split(tok, ex)
    assert targets.strip() == "Red, blue or green." + EOT
    assert "Name a colour." in context and "Red" not in context
    assert ex.ids.dtype == np.int64 and len(ex.ids) == len(ex.targets)


def test_multi_turn_targets_every_reply(tok):
    t = templates.get("chat", eos_token=EOT)
    msgs = [
        {"role": "user", "content": "A colour?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Blue."},
    ]
    targets, context = split(tok, sft.encode(tok, t, msgs, max_tokens=1000))
    assert targets == f"Red.{EOT}Blue.{EOT}"
    assert "A colour?" in context and "Another?" in context


def test_length_policies(tok):
    t = templates.get("instruct", eos_token=EOT)
    msgs = templates.to_messages({"prompt": "Name a colour. " * 20, "completion": "Red."})
    full = sft.encode(tok, t, msgs, max_tokens=10_000)
    n_target = int(full.targets.sum())
    assert sft.encode(tok, t, msgs, max_tokens=len(full.ids) - 1, policy="drop") is None
    cut = sft.encode(tok, t, msgs, max_tokens=n_target + 5, policy="cut-prompt")
    assert len(cut.ids) == n_target + 5 and cut.cut == len(full.ids) - n_target - 5
    np.testing.assert_array_equal(cut.ids, full.ids[cut.cut :])  # the oldest tokens went
    assert cut.targets.sum() == n_target
    # Not even the completion fits: dropped under either policy.
    assert sft.encode(tok, t, msgs, max_tokens=n_target - 1, policy="cut-prompt") is None
    with pytest.raises(SFTDataError, match="unknown length policy 'trim'"):
        sft.encode(tok, t, msgs, max_tokens=10, policy="trim")


def test_rows_and_their_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    rows = [
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ]
    good.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = list(sft.read_rows(good))
    assert [w for w, _ in got] == [f"{good}:1", f"{good}:2"]
    assert (
        got[0][1][1] == {"role": "assistant", "content": "c"} and got[1][1] == rows[1]["messages"]
    )

    cases = {
        '{"prompt": "p"}': "missing field 'completion'",
        '{"prompt": 3, "completion": "c"}': "'prompt' must be a string, got int",
        '{"prompt": "p", "completion": "  "}': "empty completion",
        '{"messages": []}': "'messages' must be a non-empty list",
        '{"messages": [{"role": "user", "content": "u"}]}': "no assistant message",
        '{"messages": [{"role": "bot", "content": "u"}]}': "messages\\[0\\].role is 'bot'",
        '{"messages": [{"role": "user"}]}': "messages\\[0\\] needs 'role' and 'content'",
        "[1, 2]": "a row is a JSON object, got list",
        "{oops": "not JSON",
    }
    for line, message in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(rows[0]) + "\n" + line + "\n")
        with pytest.raises(SFTDataError, match=f"bad.jsonl:2: {message}"):
            list(sft.read_rows(bad))
    with pytest.raises(SFTDataError, match="missing.jsonl: file not found"):
        list(sft.read_rows(tmp_path / "missing.jsonl"))
