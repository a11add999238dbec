"""The dataset dir contract: `manifest.json` + `tokenizer.json` + `train/*.parquet` + `val/*`.

Each shard is a Parquet file with one column, `tokens` (list of uint16/uint32), holding
packed token sequences: documents joined by `<|endoftext|>` and cut into rows of
`seq_tokens` tokens. The manifest records every shard with its token count per row
group, so a reader can split work and seek to a token offset without reading data.
Shards carry page checksums (verified as they are read) and, in their schema metadata,
the sha256 of the tokenizer that made them (`SHARD_TOKENIZER_KEY`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.errors import LmforgeError
from lmforge.tokenizer import file_sha256

FORMAT = "lmforge-dataset/1"
MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
SPLITS = ("train", "val")
SHARD_TOKENIZER_KEY = b"lmforge.tokenizer_sha256"


class DatasetError(LmforgeError, ValueError):
    """A dataset dir that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Unit:
    """The smallest piece of a split that is read and assigned to a worker: one row group."""

    file: Path
    row_group: int
    tokens: int


class ShardWriter:
    """Packs token arrays into fixed-length rows and writes them as numbered shards."""

    def __init__(
        self,
        out_dir: Path,
        dtype: str,
        seq_tokens: int,
        rows_per_group: int,
        groups_per_shard: int,
        tokenizer_sha256: str,
    ) -> None:
        self.out_dir = out_dir
        self.tokenizer_sha256 = tokenizer_sha256
        self.dtype = np.dtype(dtype)
        self.seq_tokens = seq_tokens
        self.rows_per_group = rows_per_group
        self.groups_per_shard = groups_per_shard
        self.shards: list[dict[str, Any]] = []
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self._rows: list[np.ndarray] = []
        self._writer: pq.ParquetWriter | None = None
        self._groups: list[int] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, tokens: np.ndarray) -> None:
        self._pending.append(tokens.astype(self.dtype, copy=False))
        self._pending_len += len(tokens)
        if self._pending_len >= self.seq_tokens:
            buf = np.concatenate(self._pending)
            n_full = len(buf) // self.seq_tokens
            for i in range(n_full):
                self._push_row(buf[i * self.seq_tokens : (i + 1) * self.seq_tokens])
            rest = buf[n_full * self.seq_tokens :]
            self._pending, self._pending_len = [rest], len(rest)

    def close(self) -> dict[str, Any]:
        """Flush everything (the last row may be short) and return the split's manifest entry."""
        if self._pending_len:
            self._push_row(np.concatenate(self._pending))
            self._pending, self._pending_len = [], 0
        self._flush_group()
        self._close_shard()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "sequences": sum(s["sequences"] for s in self.shards),
            "shards": self.shards,
        }

    def _push_row(self, row: np.ndarray) -> None:
        self._rows.append(row.copy())
        if len(self._rows) == self.rows_per_group:
            self._flush_group()

    def _flush_group(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            name = f"shard-{len(self.shards):05d}.parquet"
            self.shards.append({"file": f"{self.out_dir.name}/{name}", "sequences": 0})
            schema = pa.schema(
                [("tokens", pa.list_(pa.from_numpy_dtype(self.dtype)))],
                metadata={SHARD_TOKENIZER_KEY: self.tokenizer_sha256},
            )
            self._writer = pq.ParquetWriter(self.out_dir / name, schema, write_page_checksum=True)
        lengths = np.fromiter((len(r) for r in self._rows), dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = pa.array(np.concatenate(self._rows))
        col = pa.ListArray.from_arrays(pa.array(offsets), values)
        self._writer.write_table(pa.table({"tokens": col}), row_group_size=len(self._rows))
        self._groups.append(int(lengths.sum()))
        self.shards[-1]["sequences"] += len(self._rows)
        self._rows = []
        if len(self._groups) == self.groups_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        shard = self.shards[-1]
        shard["row_group_tokens"] = self._groups
        shard["tokens"] = sum(self._groups)
        shard["sha256"] = file_sha256(self.out_dir.parent / shard["file"])
        self._groups = []


class Dataset:
    """A prepared dataset dir, checked on open: manifest, tokenizer hash, shards present."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise DatasetError(
                f"{self.path}: dataset dir not found (make one with lmforge prepare)"
            )
        if not mpath.is_file():
            raise DatasetError(f"{mpath}: no manifest; is this a dir made by lmforge prepare?")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{mpath}: corrupt manifest ({err})") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            raise DatasetError(f"{mpath}: not an {FORMAT} manifest")
        tok = self.path / TOKENIZER
        if not tok.is_file():
            raise DatasetError(f"{tok}: tokenizer missing from the dataset dir")
        try:
            if file_sha256(tok) != self.tokenizer_sha256:
                raise DatasetError(f"{tok}: tokenizer differs from the one the manifest records")
            for split in SPLITS:
                for shard in self.manifest["splits"][split]["shards"]:
                    if not (self.path / shard["file"]).is_file():
                        raise DatasetError(f"{self.path / shard['file']}: shard listed but missing")
                    if len(shard["row_group_tokens"]) < 1:
                        raise DatasetError(f"{mpath}: shard {shard['file']} has no row groups")
            self.vocab_size  # noqa: B018 - must be present
        except (KeyError, TypeError) as err:
            raise DatasetError(f"{mpath}: corrupt manifest (missing {err})") from None

    def check_shards(self) -> None:
        """Read every shard's footer (not its data) and check it against the manifest: a
        truncated or corrupt shard, or one tokenized with another tokenizer, is named."""
        for split in SPLITS:
            for shard in self.manifest["splits"][split]["shards"]:
                check_shard(self.path / shard["file"], shard, self.tokenizer_sha256)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @functools.cached_property
    def manifest_sha256(self) -> str:
        return file_sha256(self.path / MANIFEST)

    def tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"])

    def units(self, split: str) -> list[Unit]:
        """Every row group of a split, in manifest order."""
        return [
            Unit(self.path / shard["file"], i, n)
            for shard in self.manifest["splits"][split]["shards"]
            for i, n in enumerate(shard["row_group_tokens"])
        ]


def open_shard(path: Path) -> pq.ParquetFile:
    """A shard opened for reading, its page checksums verified as pages are read."""
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except Exception as err:  # pyarrow's errors for corrupt or truncated files vary
        raise DatasetError(
            f"{path}: cannot read it as Parquet, a truncated or corrupt shard ({err}); "
            "prepare the dataset again"
        ) from None


def check_shard(path: Path, entry: dict[str, Any], tokenizer_sha256: str) -> None:
    """One shard's footer against its manifest entry and the dataset's tokenizer."""
    with open_shard(path) as pf:
        meta = pf.metadata
        # Shards from before lmforge recorded it carry no tokenizer hash: nothing to compare.
        made_with = (pf.schema_arrow.metadata or {}).get(SHARD_TOKENIZER_KEY)
        if made_with is not None and made_with.decode() != tokenizer_sha256:
            raise DatasetError(
                f"{path}: tokenized with tokenizer sha256 {made_with.decode()[:12]}..., not "
                f"the manifest's {tokenizer_sha256[:12]}...; a shard from another dataset?"
            )
        groups = entry["row_group_tokens"]
        if meta.num_row_groups != len(groups):
            raise DatasetError(
                f"{path}: {meta.num_row_groups} row groups, the manifest lists {len(groups)}"
            )
        for i, tokens in enumerate(groups):
            found = meta.row_group(i).column(0).num_values  # the list's values: its tokens
            if found != tokens:
                raise DatasetError(
                    f"{path}: row group {i} has {found} tokens, the manifest says {tokens}"
                )
