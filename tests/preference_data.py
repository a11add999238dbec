"""Preference datasets for the tests, made without Ray: the rows are read and encoded as
`prepare --format preference` does (`lmforge.data.preference`, `sft.encode`), in this
process instead of by Ray tasks, and written by the product's `split_and_write_pairs`."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge import templates
from lmforge.data import preference, sft
from lmforge.data.dataset import Dataset
from lmforge.data.prepare import PrepareOptions, split_and_write_pairs
from lmforge.tokenizer import EOT, eot_token, train_tokenizer


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs_dataset(out: Path, rows_file: Path, template: str = "instruct", tok=None,
                  vocab_size: int = 300, **opts) -> tuple[Dataset, dict]:  # fmt: skip
    """The dataset `prepare --format preference --template TEMPLATE` makes of `rows_file`
    (a tokenizer trained on the rendered rows unless `tok` is given)."""
    opts = {"seq_tokens": 64, "rows_per_group": 3, "val_fraction": 0.1, **opts}
    o = PrepareOptions(format="preference", template=template, **opts)
    pairs = list(preference.read_pairs(rows_file))
    if tok is None:
        t = templates.get(template, eos_token=EOT)
        tok = train_tokenizer((t.render(s["messages"]) for _, c, r in pairs for s in (c, r)),
                              vocab_size)  # fmt: skip
    t = templates.get(template, eos_token=eot_token(tok) or "")
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    examples = (
        sft.encode(tok, t, s["messages"], o.seq_tokens, o.prompt_policy, s["answer_turns"])
        for _, c, r in pairs
        for s in (c, r)
    )
    m = split_and_write_pairs(examples, out, tok, o, [{"path": str(rows_file)}], t)
    return Dataset(out), m
