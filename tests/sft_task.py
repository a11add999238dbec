"""A generated fine-tuning task shared by the SFT tests (issue 15): copy the prompt's last
word. `copy_rows` gives its JSONL rows (the dashboard's browser test uploads them);
`copy_datasets` prepares them, without Ray, into an SFT dataset and, for the same training
examples with no loss mask, a text dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmforge.checkpoint import TOKENIZER
from lmforge.data import sft
from lmforge.data.dataset import Dataset
from lmforge.data.prepare import (
    PrepareOptions,
    resolve_template,
    split_and_write,
    split_and_write_sft,
)
from lmforge.evaluate import read_examples
from lmforge.tokenizer import EOT, eot_token, train_tokenizer

# 34 short words, each a single BPE token once the tokenizer has seen the rows.
WORDS = ["red", "blue", "green", "gold", "pink", "grey", "cyan", "teal", "lime", "navy", "plum",
         "rose", "sand", "mint", "jade", "ruby", "oak", "elm", "ash", "fir", "yew", "bay", "fig",
         "kiwi", "pear", "date", "sky", "sea", "sun", "moon", "star", "rain", "snow", "wind"]  # fmt: skip


def copy_rows(n: int, seed: int, repeat: int = 1) -> list[dict[str, str]]:
    """{"prompt": "w1 w2 ... wk =", "completion": " wk"} rows of 3-8 words from `WORDS`
    (`repeat`: the last word that many times, " wk wk wk wk": an answer long enough for
    BLEU's 4-grams)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), int(rng.integers(3, 9)))]
        rows.append({"prompt": " ".join(words) + " =", "completion": f" {words[-1]}" * repeat})
    return rows


def copy_datasets(
    root: Path, n: int = 2000, seed: int = 0, repeat: int = 1
) -> tuple[Dataset, Dataset]:
    """(sft, text) under `root`: `n` copy rows as `lmforge prepare --format sft --template
    plain --vocab-size 512 --seq-tokens 32 --val-fraction 0.1 --rows-per-group 16` makes
    them (the same reading, tokenizer training, encoding and writing; the rows encoded in
    this process where prepare has Ray Data tasks do it), and the SFT train split's examples
    as plain text documents with every token a target (`prepare --format text` with the SFT
    dataset's tokenizer, 64-token rows)."""
    root.mkdir(parents=True, exist_ok=True)
    rows_file = root / "copy.jsonl"
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in copy_rows(n, seed, repeat)))
    opts = PrepareOptions(format="sft", template="plain", vocab_size=512, seq_tokens=32,
                          val_fraction=0.1, rows_per_group=16)  # fmt: skip
    rows = [messages for _, messages in sft.read_rows(rows_file)]
    out = root / "sft"
    out.mkdir()
    template, _ = resolve_template(opts.template, EOT)
    tok = train_tokenizer((template.render(m) for m in rows), opts.vocab_size)
    tok.save(str(out / TOKENIZER))
    template, _ = resolve_template(opts.template, eot_token(tok) or "")
    examples = (sft.encode(tok, template, m, opts.seq_tokens, opts.prompt_policy) for m in rows)
    source = [{"path": str(rows_file), "bytes": rows_file.stat().st_size}]
    split_and_write_sft(examples, out, tok, opts, source, template)
    ds = Dataset(out)

    text = root / "text"
    text.mkdir()
    tok.save(str(text / TOKENIZER))
    docs = (ex.ids for ex in read_examples(ds, "train"))  # each ends with the eos
    text_opts = PrepareOptions(seq_tokens=64, val_fraction=0.1, rows_per_group=4)
    split_and_write(docs, text, tok, text_opts, sources=[])
    return ds, Dataset(text)
