"""Stream one worker's share of a dataset split as (inputs, targets) batches.

Each epoch the split's row groups (units) are shuffled with `seed + epoch` and dealt
round-robin to the workers, so the shares are disjoint and together cover the split. A
worker reads its units one row group at a time (memory does not grow with the corpus),
joins their tokens into one stream and cuts it into windows of `context_length + 1`
tokens that overlap by one token: window i is stream[i*T : i*T + T + 1], so every token
is a target exactly once. The stream never ends; it moves on to the next epoch.

Its position is `{"epoch", "offset"}` (the token offset of the next window in this
worker's stream for that epoch): cheap to save in a checkpoint and exact to resume from,
since the manifest knows every row group's token count.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from lmforge.data.dataset import Dataset, DatasetError, Unit


def worker_units(units: list[Unit], rank: int, world: int, seed: int, epoch: int) -> list[Unit]:
    """This worker's units for an epoch: a seeded shuffle dealt round-robin."""
    order = list(units)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world]


class TokenStream:
    def __init__(
        self,
        dataset: Dataset,
        split: str,
        context_length: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.units = dataset.units(split)
        self.split = split
        self.T = context_length
        self.batch_size = batch_size
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        if not self.units or sum(u.tokens for u in self.units) == 0:
            raise DatasetError(f"{dataset.path}: the {split} split is empty")
        if len(self.units) < world and split == "train":
            raise DatasetError(
                f"{dataset.path}: {len(self.units)} train row groups cannot feed {world} workers; "
                "prepare with a smaller --rows-per-group or use fewer workers"
            )
        self.epoch, self.offset = 0, 0

    def my_units(self, epoch: int) -> list[Unit]:
        if len(self.units) < self.world:  # a small val split: every worker reads all of it
            return list(self.units)
        if not self.shuffle:
            return self.units[self.rank :: self.world]
        return worker_units(self.units, self.rank, self.world, self.seed, epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def windows(self) -> Iterator[np.ndarray]:
        """Windows of T+1 tokens, forever, starting at the saved position."""
        while True:
            units = self.my_units(self.epoch)
            total = sum(u.tokens for u in units)
            if total <= self.T:
                raise DatasetError(
                    f"worker {self.rank}'s share of the {self.split} split has {total} tokens, "
                    f"not enough for one window of {self.T + 1}; use a smaller context_length"
                )
            for window in self._epoch_windows(units, self.offset):
                self.offset += self.T
                yield window
            self.epoch, self.offset = self.epoch + 1, 0

    def _epoch_windows(self, units: list[Unit], offset: int) -> Iterator[np.ndarray]:
        buf = np.zeros(0, dtype=np.int64)
        pos = 0  # stream offset of buf[0]
        for unit in units:
            if pos + unit.tokens <= offset:  # entirely before the resume point: skip unread
                pos += unit.tokens
                continue
            tokens = _read_unit(unit)
            buf = np.concatenate([buf, tokens]) if len(buf) else tokens
            if pos < offset:
                buf, pos = buf[offset - pos :], offset
            while len(buf) >= self.T + 1:
                yield buf[: self.T + 1]
                buf, pos = buf[self.T :], pos + self.T

    def one_pass(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches over this worker's share of the split once (the last may be short)."""
        it = self._epoch_windows(self.my_units(0), 0)
        while block := [w for _, w in zip(range(self.batch_size), it, strict=False)]:
            block = torch.from_numpy(np.stack(block))
            yield block[:, :-1], block[:, 1:]

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) LongTensor batches of shape (batch_size, T)."""
        it = self.windows()
        while True:
            block = torch.from_numpy(np.stack([next(it) for _ in range(self.batch_size)]))
            yield block[:, :-1], block[:, 1:]


def _read_unit(unit: Unit) -> np.ndarray:
    try:
        table = pq.ParquetFile(unit.file).read_row_group(unit.row_group, columns=["tokens"])
    except Exception as err:  # pyarrow's errors for corrupt or truncated files vary
        raise DatasetError(f"{unit.file}: cannot read row group {unit.row_group} ({err})") from None
    col = table.column(0).combine_chunks()
    tokens = col.flatten().to_numpy().astype(np.int64)
    if len(tokens) != unit.tokens:
        raise DatasetError(
            f"{unit.file}: row group {unit.row_group} has {len(tokens)} tokens, "
            f"the manifest says {unit.tokens}"
        )
    return tokens
