"""Byte-level BPE tokenizer (GPT-2 style) from Hugging Face `tokenizers`.

Byte-level means every UTF-8 string, in any script, encodes and decodes back exactly;
no normalizer runs, so nothing is lost. `<|endoftext|>` separates documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.errors import UsageError

EOT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (256 bytes + merges + EOT)."""
    if vocab_size < 257:
        raise UsageError(f"vocab_size must be at least 257 (256 bytes + {EOT}); got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise UsageError(f"{p}: not a Hugging Face tokenizer.json ({err})") from None
    if tok.token_to_id(EOT) is None:
        raise UsageError(f"{p}: tokenizer has no {EOT} token")
    return tok


def eot_id(tok: Tokenizer) -> int:
    return tok.token_to_id(EOT)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
