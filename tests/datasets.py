"""Datasets for the tests, made without Ray: the pieces `lmforge prepare` uses (its
tokenizer training, readers and packer), but tokenized in this process instead of by Ray
Data. The integration tests prepare theirs through the real `prepare`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.checkpoint import TOKENIZER
from lmforge.data.dataset import Dataset
from lmforge.data.prepare import PrepareOptions, split_and_write
from lmforge.data.readers import read_documents
from lmforge.tokenizer import eot_id, train_tokenizer
from tests.conftest import CORPUS

PLAYS = ["twelfth_night.txt", "as_you_like_it.txt", "henry_v.txt"]


def plays_dataset(out: Path, vocab_size: int = 512, seq_tokens: int = 128) -> Dataset:
    """Three plays, a 512-token vocab, 128-token rows in groups of 4 (many row groups for 2
    workers): the integration tests' `dataset`, prepared in-process."""
    docs = [doc for play in PLAYS for doc in read_documents(CORPUS / play)]
    tok = train_tokenizer((text for _, text in docs), vocab_size)
    out.mkdir(parents=True)
    tok.save(str(out / TOKENIZER))
    eot = eot_id(tok)
    ids = (
        np.append(np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32), eot)
        for _, text in docs
    )
    opts = PrepareOptions(vocab_size=vocab_size, seq_tokens=seq_tokens, rows_per_group=4)
    split_and_write(ids, out, tok, opts, sources=[])
    return Dataset(out)


def plays_mixture(root: Path, vocab_size: int = 512, seq_tokens: int = 128) -> list[Dataset]:
    """Each play its own dataset, all prepared with one tokenizer (trained on the three):
    the sources of a mixture."""
    docs = {play: list(read_documents(CORPUS / play)) for play in PLAYS}
    tok = train_tokenizer((text for d in docs.values() for _, text in d), vocab_size)
    eot = eot_id(tok)
    out = []
    for play, play_docs in docs.items():
        path = root / play.removesuffix(".txt")
        path.mkdir(parents=True)
        tok.save(str(path / TOKENIZER))
        ids = (
            np.append(np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32), eot)
            for _, text in play_docs
        )
        opts = PrepareOptions(vocab_size=vocab_size, seq_tokens=seq_tokens, rows_per_group=4)
        split_and_write(ids, path, tok, opts, sources=[])
        out.append(Dataset(path))
    return out
