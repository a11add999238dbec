"""Byte-level BPE tokenizer (GPT-2 style) from Hugging Face `tokenizers`.

Byte-level means every UTF-8 string, in any script, encodes and decodes back exactly;
no normalizer runs, so nothing is lost. `<|endoftext|>` separates documents.

A tokenizer imported with a Hugging Face model (`lmforge import-hf`) keeps its own end
token: the `eos_token` of the `tokenizer_config.json` beside its `tokenizer.json`, else
the first of END_TOKENS it has (`</s>` for Llama 2 and Mistral, `<|end_of_text|>` for
Llama 3). `eot_id` is that token's id: where generation stops and what separates documents.

Those files travel with `tokenizer.json` wherever it goes (`copy_tokenizer`: a dataset dir,
a checkpoint, a registered version), and a process that gets the tokenizer as text (a
prepare task) gets them too (`read_tokenizer_files` / `tokenizer_from_files`), so an eos
named only in `tokenizer_config.json` (Llama-3-Instruct's `<|eot_id|>`) ends every document.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge.errors import UsageError

EOT = "<|endoftext|>"
END_TOKENS = (EOT, "<|end_of_text|>", "</s>")  # GPT-2 (and Qwen2), Llama 3, Llama 2 / Mistral
TOKENIZER = "tokenizer.json"  # its file's name in a dataset dir, a checkpoint, a version
TOKENIZER_CONFIG = "tokenizer_config.json"  # transformers' file beside tokenizer.json
SPECIAL_TOKENS_MAP = "special_tokens_map.json"  # its older file, also beside it
TOKENIZER_EXTRAS = (TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP)  # kept wherever tokenizer.json goes


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
    """A `tokenizer.json` with the end token its `tokenizer_config.json` (or
    `special_tokens_map.json`) beside it names."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as err:  # tokenizers raises a bare Exception on bad JSON
        raise UsageError(f"{p}: not a Hugging Face tokenizer.json ({err})") from None
    for name in TOKENIZER_EXTRAS:  # tokenizer_config.json's eos wins, as in transformers
        eos = configured_eos(p.parent / name)
        if eos is not None:
            if tok.token_to_id(eos) is None:
                raise UsageError(f"{p.parent / name}: eos_token {eos!r} is not in {p}")
            tok._lmforge_eos = eos  # read by eot_id
            return tok
    if eot_id(tok) is None:
        raise UsageError(f"{p}: tokenizer has no end-of-text token (one of {END_TOKENS})")
    return tok


def configured_eos(tokenizer_config: Path) -> str | None:
    """The `eos_token` a transformers `tokenizer_config.json` (or `special_tokens_map.json`)
    names, if the file is there."""
    if not tokenizer_config.is_file():
        return None
    try:
        eos = json.loads(tokenizer_config.read_text()).get("eos_token")
    except (ValueError, AttributeError) as err:
        raise UsageError(f"{tokenizer_config}: not a JSON object ({err})") from None
    if isinstance(eos, dict):  # {"content": "</s>", ...}, an AddedToken
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


def tokenizer_files(path: str | Path) -> list[Path]:
    """`tokenizer.json` at `path` and the transformers files beside it that exist."""
    p = Path(path)
    return [p, *(f for name in TOKENIZER_EXTRAS if (f := p.parent / name).is_file())]


def copy_tokenizer(path: str | Path, into: Path) -> None:
    """Copy the tokenizer at `path` (a tokenizer.json, by any name) into the dir `into` as
    `tokenizer.json`, with its tokenizer_config.json / special_tokens_map.json."""
    src = tokenizer_files(path)
    shutil.copyfile(src[0], into / TOKENIZER)
    for f in src[1:]:
        shutil.copyfile(f, into / f.name)


def read_tokenizer_files(path: str | Path) -> dict[str, str]:
    """The text of the tokenizer at `path` and of its transformers files, by file name
    (`tokenizer.json` for the first), for a process that does not see this filesystem."""
    src = tokenizer_files(path)
    return {TOKENIZER: src[0].read_text(), **{f.name: f.read_text() for f in src[1:]}}


def tokenizer_from_files(files: dict[str, str]) -> Tokenizer:
    """`read_tokenizer_files`' output as the tokenizer `load_tokenizer` gives (same eos)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lmforge-tok-") as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
        return load_tokenizer(Path(tmp) / TOKENIZER)


def eot_token(tok: Tokenizer) -> str | None:
    """The end-of-text token: `load_tokenizer`'s eos_token, else the first of END_TOKENS."""
    configured = getattr(tok, "_lmforge_eos", None)
    if configured is not None:
        return configured
    return next((t for t in END_TOKENS if tok.token_to_id(t) is not None), None)


def eot_id(tok: Tokenizer) -> int | None:
    token = eot_token(tok)
    return None if token is None else tok.token_to_id(token)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a local file or of an object in S3 (a `storage.S3Path`)."""
    from lmforge import storage

    h = hashlib.sha256()
    with storage.open_bytes(path) if storage.is_remote(path) else open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
