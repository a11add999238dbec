"""The dataset dir contract: `manifest.json` + `tokenizer.json` + `train/*.parquet` + `val/*`.

`tokenizer.json` may have the `tokenizer_config.json` / `special_tokens_map.json` of the
tokenizer it was prepared with beside it (the manifest lists them): they name its eos.

Each shard is a Parquet file with one column, `tokens` (list of uint16/uint32), holding
packed token sequences: documents joined by `<|endoftext|>` and cut into rows of
`seq_tokens` tokens. The manifest records every shard with its token count per row
group, so a reader can split work and seek to a token offset without reading data.
Shards carry page checksums (verified as they are read) and, in their schema metadata,
the sha256 of the tokenizer that made them (`SHARD_TOKENIZER_KEY`).

An SFT dataset (`"data_format": "sft"` in the manifest, made by `prepare --format sft`)
holds one example a row, each ending with the eos, and a second column `targets` (list of
bool, aligned with `tokens`: True where the token is a loss target, i.e. a completion
token); the manifest's `sft` section records the template, the mask and the rows read,
dropped and cut, and `template.json` (`lmforge.templates`) sits beside the manifest.

This module reads and checks a dataset dir; `lmforge.data.writer` writes its shards.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from lmforge import storage
from lmforge.errors import LmforgeError
from lmforge.storage import S3Path
from lmforge.templates import TEMPLATE_FILE, Template
from lmforge.tokenizer import TOKENIZER, eot_token, file_sha256, load_tokenizer

FORMAT = "lmforge-dataset/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
SHARD_TOKENIZER_KEY = b"lmforge.tokenizer_sha256"


class DatasetError(LmforgeError, ValueError):
    """A dataset dir that cannot be used; the message names the file."""


@dataclass(frozen=True)
class Unit:
    """The smallest piece of a split that is read and assigned to a worker: one row group."""

    file: Path | S3Path
    row_group: int
    tokens: int


class Dataset:
    """A prepared dataset dir, checked on open: manifest, tokenizer hash, shards present.
    `path` may be an `S3Path` (`storage.resolve("s3://...")`): shards are then read from S3."""

    def __init__(self, path: str | Path | S3Path) -> None:
        self.path = path if isinstance(path, S3Path) else Path(path)
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
            for name in self.manifest["tokenizer"].get("files", []):  # its eos is named there
                if not (self.path / name).is_file():
                    raise DatasetError(f"{self.path / name}: tokenizer file listed but missing")
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
        """A local file (a dataset in S3: a copy of its tokenizer files, made once)."""
        extras = tuple(self.manifest["tokenizer"].get("files", []))
        return storage.local_file(self.path / TOKENIZER, extras)

    @property
    def data_format(self) -> str:
        """`text` (packed documents) or `sft` (one example a row, with a target mask)."""
        return self.manifest.get("data_format", "text")

    @functools.cached_property
    def template(self) -> Template | None:
        """The template an SFT dataset's rows were rendered with (its `template.json`)."""
        p = self.path / TEMPLATE_FILE
        if not p.is_file():
            return None
        try:
            return Template.from_description(json.loads(p.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{p}: not a template description ({err})") from None

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @functools.cached_property
    def eot_token(self) -> str | None:
        """The token that ends every document: the eos of the dataset's tokenizer files
        (`tokenizer_config.json` beside `tokenizer.json`, else the first known end token)."""
        return eot_token(load_tokenizer(self.tokenizer_path))

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

    def require_tokenizer(self, tokenizer_file: Path, owner: str) -> None:
        """Refuse a model (`owner`: a checkpoint, a version) whose tokenizer is not this
        dataset's: a loss over other token ids means nothing, and documents ended by another
        token than the model's eos teach it to end text with the wrong one. The identity is
        `tokenizer.json` and the eos its `tokenizer_config.json` names."""
        if file_sha256(tokenizer_file) != self.tokenizer_sha256:
            raise DatasetError(
                f"{self.path}: prepared with another tokenizer than {owner}'s; prepare the "
                f"data with --tokenizer {tokenizer_file}"
            )
        theirs = eot_token(load_tokenizer(tokenizer_file))
        if theirs != self.eot_token:
            raise DatasetError(
                f"{self.path}: its documents end with {self.eot_token!r}, {owner}'s tokenizer "
                f"ends text with {theirs!r} (its tokenizer_config.json); prepare the data "
                f"with --tokenizer {tokenizer_file}"
            )


def open_shard(path: Path | S3Path) -> pq.ParquetFile:
    """A shard opened for reading, its page checksums verified as pages are read (from S3:
    only the footer and the row groups read are fetched)."""
    try:
        if isinstance(path, S3Path):
            return pq.ParquetFile(path.key, filesystem=path.fs, page_checksum_verification=True)
        return pq.ParquetFile(path, page_checksum_verification=True)
    except Exception as err:  # pyarrow's errors for corrupt or truncated files vary
        raise DatasetError(
            f"{path}: cannot read it as Parquet, a truncated or corrupt shard ({err}); "
            "prepare the dataset again"
        ) from None


def check_shard(path: Path | S3Path, entry: dict[str, Any], tokenizer_sha256: str) -> None:
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
