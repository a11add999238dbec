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

Resumed on another number of workers (`resume`), the unread rest of every old worker's
epoch is cut into pieces (a row group from a token on) and dealt round-robin to the new
workers; that pass is their epoch, spelled out in the position as `"pieces"`, and the
epochs after it are dealt as usual. No token is a target twice; only the edges of the new
passes (a first token, a tail shorter than a window) go unread.

Masked batches: for an SFT dataset, and for text with `document_mask`, a batch is
`(x, y, segments)` instead of `(x, y)`, all LongTensor (B, T). `segments[b, t]` numbers
the examples (documents) of row b from 0 on, non-decreasing: a new one starts after the
last token of an example (an SFT row) or after each eos (text), so the model keeps
attention inside a segment and restarts positions there. In an SFT batch `y` is -100
(cross-entropy's ignore_index) where the token is not a target (the row's `targets`
mask) and where `x` is the last token of an example (the next example's first token is
not predicted from another example). Text keeps every target. Positions and resume are
the same token offsets as for plain batches: the masks are read with the tokens.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from lmforge.data.dataset import Dataset, DatasetError, Unit, open_shard

OPEN_FILES = 8  # shards a stream keeps open (a ParquetFile re-reads the footer when opened)


class OpenShards:
    """The shards a stream reads, kept open (opening a ParquetFile re-reads its footer), at
    most OPEN_FILES of them: the oldest is closed first, so file handles stay bounded."""

    def __init__(self) -> None:
        self._files: dict[Path, pq.ParquetFile] = {}  # oldest first

    def open(self, path: Path) -> pq.ParquetFile:
        """The open shard at `path` (opened now if it is not)."""
        pf = self._files.get(path)
        if pf is None:
            pf = open_shard(path)
            if len(self._files) >= OPEN_FILES:
                self._files.pop(next(iter(self._files))).close()
            self._files[path] = pf
        return pf

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        for pf in self._files.values():
            pf.close()
        self._files.clear()


def check_feeds(path, units: Sequence, split: str, world: int) -> None:
    """A train split needs a row group (unit) for each of `world` workers; one line if not."""
    if split == "train" and len(units) < world:
        raise DatasetError(
            f"{path}: {len(units)} train row groups cannot feed {world} workers; "
            "prepare with a smaller --rows-per-group or use fewer workers"
        )


Piece = tuple[int, int]  # (index of a unit in the split, its first token to read)


def worker_units(units: Sequence, rank: int, world: int, seed: int, epoch: int) -> list:
    """This worker's units for an epoch: a seeded shuffle dealt round-robin."""
    order = list(units)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order[rank::world]


def redeal(
    positions: list[dict], unit_tokens: list[int], seed: int, world: int
) -> list[dict[str, Any]]:
    """The positions of `world` workers that take over from `len(positions)` others.

    Every old worker's unread tokens (the rest of its epoch, and its whole share of any
    epoch up to the furthest one that a worker ahead of it has begun) are cut into pieces
    and dealt round-robin; that pass is the new workers' epoch, the later ones as usual.
    No token is a target twice; the first token of each new pass and the tail after its
    last whole window go unread, as at any epoch's end.
    """
    old_world, last = len(positions), max(int(p["epoch"]) for p in positions)
    units = range(len(unit_tokens))

    def share(rank: int, epoch: int) -> list[Piece]:
        return [(i, 0) for i in worker_units(units, rank, old_world, seed, epoch)]

    rest: list[Piece] = []
    for rank, p in enumerate(positions):
        epoch, offset = int(p["epoch"]), int(p["offset"])
        dealt = p.get("pieces")  # a worker that was itself dealt its pass
        current = share(rank, epoch) if dealt is None else [(i, t) for i, t in dealt]
        # Token `offset` was the last target read (windows overlap by one): from the next.
        rest += _after(current, offset + 1 if offset else 0, unit_tokens)
        for later in range(epoch + 1, last + 1):
            rest += share(rank, later)
    return [{"epoch": last, "offset": 0, "pieces": rest[r::world]} for r in range(world)]


def _after(pieces: list[Piece], offset: int, unit_tokens: list[int]) -> list[Piece]:
    """The pieces of a pass from its token `offset` on."""
    out, pos = [], 0
    for i, start in pieces:
        n = unit_tokens[i] - start
        if pos + n > offset:
            out.append((i, start + max(0, offset - pos)))
        pos += n
    return out


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
        document_mask: bool = False,
    ) -> None:
        self.units = dataset.units(split)
        self.sft = dataset.data_format in ("sft", "preference")  # rows with a target mask
        self.masked = self.sft or document_mask  # batches carry segments (and labels)
        self.eot = dataset.manifest["tokenizer"].get("eot_id")
        if self.masked and not self.sft and self.eot is None:
            raise DatasetError(f"{dataset.path}: document_mask needs an eos id in the manifest")
        self.split = split
        self.T = context_length
        self.batch_size = batch_size
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        if not self.units or sum(u.tokens for u in self.units) == 0:
            raise DatasetError(f"{dataset.path}: the {split} split is empty")
        check_feeds(dataset.path, self.units, split, world)
        self.epoch, self.offset = 0, 0
        self.pieces: list[Piece] | None = None  # epoch `pieces_epoch` spelled out (`redeal`)
        self.pieces_epoch = -1
        self._files = OpenShards()

    def my_units(self, epoch: int) -> list[Unit]:
        if len(self.units) < self.world:  # a small val split: every worker reads all of it
            return list(self.units)
        if not self.shuffle:
            return self.units[self.rank :: self.world]
        return worker_units(self.units, self.rank, self.world, self.seed, epoch)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "offset": self.offset}
        if self.pieces is not None and self.epoch == self.pieces_epoch:
            state["pieces"] = [list(p) for p in self.pieces]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        pieces = state.get("pieces")
        self.pieces = None if pieces is None else [(int(i), int(t)) for i, t in pieces]
        self.pieces_epoch = self.epoch

    def step_metrics(self) -> dict[str, float]:
        """Per-step data metrics (a mixture's tokens per source); one dataset has none."""
        return {}

    def resume(self, positions: list[dict[str, Any]]) -> None:
        """Continue from every worker's saved position; saved by another number of workers,
        their unread rest is dealt anew (`redeal`)."""
        if len(positions) != self.world:
            tokens = [u.tokens for u in self.units]
            positions = redeal(positions, tokens, self.seed, self.world)
        self.load_state_dict(positions[self.rank])

    def _pass(self, epoch: int) -> list[tuple[Unit, int]]:
        """(unit, first token) for this worker's pass over an epoch."""
        if self.pieces is not None and epoch == self.pieces_epoch:
            return [(self.units[i], start) for i, start in self.pieces]
        return [(u, 0) for u in self.my_units(epoch)]

    def windows(self) -> Iterator[np.ndarray]:
        """Windows of T+1 tokens, forever, starting at the saved position (masked: a (3, T+1)
        array of tokens, targets and example ends)."""
        for epoch, offset, run in self._runs():
            for i in range(self._n_windows(run)):
                self.epoch, self.offset = epoch, offset + (i + 1) * self.T
                yield run[..., i * self.T : (i + 1) * self.T + 1].astype(np.int64)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) LongTensor batches of shape (batch_size, T), forever; the position moves
        past a batch's windows when the batch is handed out."""
        return self._assemble(self._runs(), partial=False, track=True)

    def one_pass(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches over this worker's share of the split once (the last may be short)."""
        runs = (
            (0, off, run) for off, run in self._epoch_runs([(u, 0) for u in self.my_units(0)], 0)
        )
        return self._assemble(runs, partial=True, track=False)

    def _n_windows(self, run: np.ndarray) -> int:
        return (run.shape[-1] - 1) // self.T

    def _assemble(
        self, runs, partial: bool, track: bool
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Cut runs into batches with whole-array slices (`Cursor`): one int64 copy per
        batch (profile: the per-window loop + np.stack made the stream 0.2x a raw pyarrow
        scan at context 64)."""
        cursor = Cursor(self, runs, track)
        while True:
            xs, ys, short = cursor.take(self.batch_size)
            if short and (not partial or short == self.batch_size):
                return
            yield self.tensors(xs, ys)

    def cursor(self) -> Cursor:
        """Windows from the saved position on, taken a few at a time (a mixture takes each
        batch's windows from several streams); the position moves as they are taken."""
        return Cursor(self, self._runs(), track=True)

    def tensors(self, xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
        """A batch of the parts `Cursor.take` cut (of this stream or another of its kind):
        (x, y), or (x, y, segments) for masked batches."""
        x = xs[0] if len(xs) == 1 else np.concatenate(xs, axis=1)
        y = ys[0] if len(ys) == 1 else np.concatenate(ys, axis=1)
        x, y = torch.from_numpy(x.astype(np.int64)), torch.from_numpy(y.astype(np.int64))
        if self.masked:  # channels: x = (tokens, segments, -), y = (-, -, labels)
            return x[0], y[2], x[1]
        return x[0], y[0]

    def _masked(self, part: np.ndarray, take: int) -> np.ndarray:
        """(tokens, targets, ends) of `take` windows -> (tokens, segments, labels), each
        T*take + 1 long, so the x / y slices of the caller pick inputs, segments, labels:
        segments at x's positions (per window from 0), labels at y's."""
        T = self.T
        tokens, targets, ends = part[0], part[1].astype(bool), part[2]
        e = ends[:-1].reshape(take, T)
        seg = np.cumsum(e, axis=1) - e  # a segment starts after an end: exclusive cumsum
        segments = np.append(seg.reshape(-1), 0)
        labels = tokens.copy()
        if self.sft:
            keep = targets.copy()
            keep[1:] &= ends[:-1] == 0  # never predict an example's first token
            labels[~keep] = -100
        return np.stack([tokens, segments, labels])

    def _runs(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, offset, run) forever from the saved position: `run` holds the windows
        that start at token `offset` of that epoch's stream, as n*T + 1 tokens."""
        epoch, offset = self.epoch, self.offset
        while True:
            pieces = self._pass(epoch)
            total = sum(u.tokens - start for u, start in pieces)
            dealt = self.pieces is not None and epoch == self.pieces_epoch
            if total <= self.T and not dealt:  # a dealt rest may be short: on to the next
                raise DatasetError(
                    f"worker {self.rank}'s share of the {self.split} split has {total} tokens, "
                    f"not enough for one window of {self.T + 1}; use a smaller context_length"
                )
            for off, run in self._epoch_runs(pieces, offset):
                yield epoch, off, run
            epoch, offset = epoch + 1, 0

    def _epoch_runs(
        self, pieces: list[tuple[Unit, int]], offset: int
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, run) over one epoch's pieces from `offset`, one row group read at a
        time; the tokens after the last whole window of the epoch are dropped."""
        buf = np.zeros((3, 0) if self.masked else 0, dtype=np.int64)
        pos = 0  # stream offset of buf[0]
        for unit, start in pieces:
            n = unit.tokens - start
            if pos + n <= offset:  # entirely before the resume point: skip unread
                pos += n
                continue
            tokens = self._read(unit)[..., start:]
            buf = np.concatenate([buf, tokens], axis=-1) if buf.shape[-1] else tokens
            if pos < offset:
                buf, pos = buf[..., offset - pos :], offset
            n = self._n_windows(buf)
            if n > 0:
                yield pos, buf[..., : n * self.T + 1]
                buf, pos = buf[..., n * self.T :], pos + n * self.T

    def _read(self, unit: Unit) -> np.ndarray:
        pf = self._files.open(unit.file)
        if not self.masked:
            return _read_unit(pf, unit)
        if self.sft:  # the row ends are the examples' ends
            tokens, targets, offsets = _read_unit(pf, unit, with_targets=True)
            ends = np.zeros(len(tokens), dtype=np.int64)
            ends[offsets[1:] - 1] = 1
            return np.stack([tokens.astype(np.int64), targets.astype(np.int64), ends])
        tokens = _read_unit(pf, unit).astype(np.int64)
        return np.stack([tokens, np.ones_like(tokens), (tokens == self.eot).astype(np.int64)])


class Cursor:
    """Windows of a stream's runs taken n at a time: a run of n windows is n*T + 1
    consecutive tokens, so its x rows are run[:-1] and its y rows run[1:], each reshaped to
    (n, T) -- no Python per window. `track`: the stream's position follows what is taken."""

    def __init__(self, stream: TokenStream, runs, track: bool) -> None:
        self.stream, self.runs, self.track = stream, runs, track
        self.run: np.ndarray | None = None
        self.row = self.n = self.epoch = self.offset = 0

    def take(self, need: int) -> tuple[list[np.ndarray], list[np.ndarray], int]:
        """The x and y parts of the next `need` windows, and how many were missing (the
        runs ended: only for a single pass)."""
        s, T = self.stream, self.stream.T
        xs, ys = [], []
        while need:
            if self.row == self.n:
                nxt = next(self.runs, None)
                if nxt is None:
                    break
                self.epoch, self.offset, self.run = nxt
                self.row, self.n = 0, s._n_windows(self.run)
                continue
            take = min(need, self.n - self.row)
            part = self.run[..., self.row * T : (self.row + take) * T + 1]
            if s.masked:
                part = s._masked(part, take)
            xs.append(part[..., :-1].reshape(-1, take, T))
            ys.append(part[..., 1:].reshape(-1, take, T))
            self.row, need = self.row + take, need - take
            if self.track:
                s.epoch, s.offset = self.epoch, self.offset + self.row * T
        return xs, ys, need


def _read_unit(pf: pq.ParquetFile, unit: Unit, with_targets: bool = False):
    """A row group's tokens in the dtype the shard stores them in (the int64 copy is made
    once per batch); `with_targets`: (tokens, targets, the rows' offsets)."""
    try:
        columns = ["tokens", "targets"] if with_targets else ["tokens"]
        table = pf.read_row_group(unit.row_group, columns=columns)
    except Exception as err:  # pyarrow's errors for corrupt or truncated files vary
        raise DatasetError(
            f"{unit.file}: cannot read row group {unit.row_group}, a corrupt shard ({err}); "
            "prepare the dataset again"
        ) from None
    col = table.column(0).combine_chunks()
    tokens = col.flatten().to_numpy()
    if len(tokens) != unit.tokens:
        raise DatasetError(
            f"{unit.file}: row group {unit.row_group} has {len(tokens)} tokens, "
            f"the manifest says {unit.tokens}"
        )
    if not with_targets:
        return tokens
    mask = table.column(1).combine_chunks()
    targets = mask.flatten().to_numpy(zero_copy_only=False)
    if len(targets) != len(tokens):
        raise DatasetError(f"{unit.file}: row group {unit.row_group}: targets not aligned")
    offsets = col.offsets.to_numpy()
    return tokens, targets, offsets - offsets[0]
