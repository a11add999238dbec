"""Find the raw text files of a corpus and read them as documents.

Supported: `.txt` (one document a file), `.jsonl` (one document a line, in a `text`
field) and `.parquet` (one document a row, in a `text` column); folders are searched
recursively for those. Every error names the file (and line) at fault.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from lmforge.errors import LmforgeError

SUFFIXES = (".txt", ".jsonl", ".parquet")


class CorpusError(LmforgeError, ValueError):
    """Raw input that cannot be prepared; the message names the file."""


def discover(inputs: list[str | Path]) -> list[Path]:
    """All corpus files under `inputs`, sorted, so the order never depends on the disk."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if not p.exists():
            raise CorpusError(f"{p}: no such file or folder")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise CorpusError(f"{p}: no {'/'.join(SUFFIXES)} files in this folder")
            files.extend(found)
        elif p.suffix in SUFFIXES:
            files.append(p)
        else:
            raise CorpusError(f"{p}: unsupported file type (expected {', '.join(SUFFIXES)})")
    return sorted(set(f.resolve() for f in files))


def read_documents(path: Path) -> Iterator[tuple[str, str]]:
    """Yield `(key, text)` for each document of one file; keys are stable and unique."""
    try:
        if path.suffix == ".txt":
            yield str(path), _decode(path.read_bytes(), path)
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path)
        else:
            yield from _read_parquet(path)
    except OSError as err:
        raise CorpusError(f"{path}: cannot read ({err.strerror or err})") from None


def _decode(data: bytes, where: Path | str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{where}: not UTF-8 text (bad byte at offset {err.start})") from None


def _read_jsonl(path: Path) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(_decode(line, where))
            except json.JSONDecodeError as err:
                raise CorpusError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or "text" not in row:
                raise CorpusError(f"{where}: no 'text' field")
            if not isinstance(row["text"], str):
                raise CorpusError(f"{where}: 'text' is not a string")
            yield f"{path}:{n}", row["text"]


def _read_parquet(path: Path) -> Iterator[tuple[str, str]]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises ArrowInvalid and friends
        raise CorpusError(f"{path}: not a readable Parquet file ({err})") from None
    if "text" not in pf.schema_arrow.names:
        raise CorpusError(f"{path}: no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise CorpusError(f"{path}: row {row}: 'text' is not a string")
            yield f"{path}#{row}", text
