"""Writes a split's shards: token arrays packed into fixed-length rows, row groups of
`rows_per_group` rows, `groups_per_shard` groups per numbered Parquet file.

The layout is the dataset dir contract of `lmforge.data.dataset`, which reads it back:
each shard records the tokenizer's sha256 in its schema metadata and page checksums, and
`close()` returns the split's manifest entry (per shard: rows, tokens per row group, file
sha256) for `manifest.json`.

An SFT split (`targets=True`) is written one example a row instead (`add_example`): a
`tokens` column and, aligned with it, a `targets` column (list of bool, True where the
token is a loss target); the manifest's counts are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.data.dataset import SHARD_TOKENIZER_KEY
from lmforge.tokenizer import file_sha256


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
        targets: bool = False,
    ) -> None:
        self.out_dir = out_dir
        self.tokenizer_sha256 = tokenizer_sha256
        self.dtype = np.dtype(dtype)
        self.seq_tokens = seq_tokens
        self.rows_per_group = rows_per_group
        self.groups_per_shard = groups_per_shard
        self.targets = targets
        self._row_targets: list[np.ndarray] = []
        self._n_targets = 0
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

    def add_example(self, tokens: np.ndarray, targets: np.ndarray) -> None:
        """One SFT example as its own row, with its target mask (no packing)."""
        assert self.targets and len(tokens) == len(targets)
        self._row_targets.append(np.asarray(targets, dtype=bool))
        self._n_targets += int(self._row_targets[-1].sum())
        self._push_row(tokens.astype(self.dtype, copy=False))

    def close(self) -> dict[str, Any]:
        """Flush everything (the last row may be short) and return the split's manifest entry."""
        if self._pending_len:
            self._push_row(np.concatenate(self._pending))
            self._pending, self._pending_len = [], 0
        self._flush_group()
        self._close_shard()
        entry = {
            "tokens": sum(s["tokens"] for s in self.shards),
            "sequences": sum(s["sequences"] for s in self.shards),
            "shards": self.shards,
        }
        if self.targets:
            entry["target_tokens"] = self._n_targets
        return entry

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
            fields = [("tokens", pa.list_(pa.from_numpy_dtype(self.dtype)))]
            if self.targets:
                fields.append(("targets", pa.list_(pa.bool_())))
            schema = pa.schema(fields, metadata={SHARD_TOKENIZER_KEY: self.tokenizer_sha256})
            self._writer = pq.ParquetWriter(self.out_dir / name, schema, write_page_checksum=True)
        lengths = np.fromiter((len(r) for r in self._rows), dtype=np.int32)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        values = pa.array(np.concatenate(self._rows))
        col = pa.ListArray.from_arrays(pa.array(offsets), values)
        columns = {"tokens": col}
        if self.targets:
            mask = pa.array(np.concatenate(self._row_targets))
            columns["targets"] = pa.ListArray.from_arrays(pa.array(offsets), mask)
            self._row_targets = []
        self._writer.write_table(pa.table(columns), row_group_size=len(self._rows))
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
