"""A worker's preference pairs, packed whole into fixed windows.

    stream = PairStream(dataset, "train", context_length=256, batch_size=4, rank, world, seed)
    for batch in stream.batches(): ...      # PairBatch: x, labels, segments, seq, pair_ids

A preference dataset (`prepare --format preference`) holds each pair as two consecutive
rows of one row group, chosen first. As for text, each epoch the row groups (units) are
shuffled with `seed + epoch` and dealt round-robin (`lmforge.data.stream.worker_units`), so
a pair belongs to exactly one worker. A micro-batch is `batch_size` windows of
`context_length` positions; sequences are laid in them one after another (a sequence of
L tokens takes L - 1 positions: its last token predicts nothing), each its own segment
(attention and positions restart, `models.attention.segment_layout`), and a pair is placed
only when both of its sequences fit in this micro-batch, else it opens the next one: a
pair's two answers are always in one forward pass. The rest of a window is padding (no
target).

The position is `{"epoch", "unit", "pair"}`: the next pair to read in this worker's pass
(a pass is a list of (unit, first pair)). Resumed on another number of workers (`redeal`),
the unread rest of every old worker's passes is dealt anew in whole pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.data.dataset import Dataset, DatasetError
from lmforge.data.stream import OpenShards, _read_unit, check_feeds, worker_units

FORMAT = "preference"


@dataclass
class PairBatch:
    """One micro-batch of packed pairs (all (B, T) LongTensors but `pair_ids`)."""

    x: torch.Tensor  # input tokens
    labels: torch.Tensor  # the token each position predicts, -100 where none is taken
    segments: torch.Tensor  # sequence number within the window, from 0 (padding: its own)
    seq: torch.Tensor  # 2i / 2i + 1: pair i's chosen / rejected answer; -1: not a target
    pair_ids: torch.Tensor  # (P,) each pair's index in its split (`PairStream.n_pairs`)

    @property
    def n_pairs(self) -> int:
        return len(self.pair_ids)

    def to(self, device) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.x, self.labels, self.segments,
                                                   self.seq, self.pair_ids)))  # fmt: skip


def unit_pairs(dataset: Dataset, split: str) -> list[int]:
    """How many pairs each unit (row group) of `split` holds, in `Dataset.units` order."""
    per_group = int(dataset.manifest["preference"]["pairs_per_group"])
    out = []
    for shard in dataset.manifest["splits"][split]["shards"]:
        groups, pairs = len(shard["row_group_tokens"]), int(shard["sequences"]) // 2
        out += [per_group] * (groups - 1) + [pairs - per_group * (groups - 1)]
    return out


def redeal(
    positions: list[dict[str, Any]], n_units: int, seed: int, world: int
) -> list[dict[str, Any]]:
    """The positions of `world` workers taking over from `len(positions)` others: the unread
    rest of every old worker's pass (and of their later epochs up to the furthest begun),
    in whole pairs, dealt round-robin as the new workers' pass."""
    old_world, last = len(positions), max(int(p["epoch"]) for p in positions)
    rest: list[list[int]] = []
    for rank, p in enumerate(positions):
        epoch = int(p["epoch"])
        for e in range(epoch, last + 1):
            dealt = p.get("pieces") if e == epoch else None
            pieces = (
                [list(x) for x in dealt] if dealt is not None
                else [[i, 0] for i in worker_units(range(n_units), rank, old_world, seed, e)]
            )  # fmt: skip
            if e == epoch:
                k, j = int(p["unit"]), int(p["pair"])
                pieces = pieces[k:]
                if pieces:
                    pieces[0] = [pieces[0][0], pieces[0][1] + j]
            rest += pieces
    return [{"epoch": last, "unit": 0, "pair": 0, "pieces": rest[r::world]} for r in range(world)]


class PairStream:
    def __init__(
        self,
        dataset: Dataset,
        split: str,
        context_length: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
    ) -> None:
        if dataset.data_format != FORMAT:
            raise DatasetError(
                f"{dataset.path}: a {dataset.data_format} dataset; preference training reads "
                "pairs (lmforge prepare --format preference)"
            )
        self.dataset, self.split = dataset, split
        self.units = dataset.units(split)
        self.pairs = unit_pairs(dataset, split)
        self.first = np.concatenate([[0], np.cumsum(self.pairs)]).astype(np.int64)
        self.n_pairs = int(self.first[-1])
        self.T, self.batch_size = context_length, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        if self.n_pairs == 0:
            raise DatasetError(f"{dataset.path}: the {split} split has no pairs")
        check_feeds(dataset.path, self.units, split, world)
        self.epoch, self.unit, self.pair = 0, 0, 0
        self.pieces: list[list[int]] | None = None  # epoch `pieces_epoch`'s pass (`redeal`)
        self.pieces_epoch = -1
        self._files = OpenShards()

    # -- position ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"epoch": self.epoch, "unit": self.unit, "pair": self.pair}
        if self.pieces is not None and self.epoch == self.pieces_epoch:
            state["pieces"] = [list(p) for p in self.pieces]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.unit, self.pair = (int(state[k]) for k in ("epoch", "unit", "pair"))
        pieces = state.get("pieces")
        self.pieces = None if pieces is None else [[int(i), int(j)] for i, j in pieces]
        self.pieces_epoch = self.epoch

    def resume(self, positions: list[dict[str, Any]]) -> None:
        if len(positions) != self.world:
            positions = redeal(positions, len(self.units), self.seed, self.world)
        self.load_state_dict(positions[self.rank])

    def step_metrics(self) -> dict[str, float]:
        return {}

    # -- passes -----------------------------------------------------------------------
    def _pass(self, epoch: int) -> list[list[int]]:
        if self.pieces is not None and epoch == self.pieces_epoch:
            return self.pieces
        return [[i, 0] for i in worker_units(range(len(self.units)), self.rank, self.world,
                                             self.seed, epoch)]  # fmt: skip

    def share(self) -> list[list[int]]:
        """This worker's units of a one-off pass (evaluation, the reference's pass): every
        `world`-th unit, or all of them when there are fewer units than workers."""
        units = range(len(self.units))
        mine = units if len(self.units) < self.world else units[self.rank :: self.world]
        return [[i, 0] for i in mine]

    def _pairs_of(self, pieces: list[list[int]], k0: int = 0, j0: int = 0):
        """(k, j, pair id, chosen, rejected) from piece k0's pair j0 on."""
        for k in range(k0, len(pieces)):
            i, start = pieces[k]
            tokens, targets, offsets = self._read(i)
            for j in range(start + (j0 if k == k0 else 0), self.pairs[i]):
                sides = [_side(tokens, targets, offsets, 2 * j + s) for s in (0, 1)]
                yield k, j, int(self.first[i] + j), sides

    def _forever(self):
        """(position after this pair, pair id, sides) from the saved position, forever."""
        epoch, k0, j0 = self.epoch, self.unit, self.pair
        while True:
            pieces = self._pass(epoch)
            for k, j, pid, sides in self._pairs_of(pieces, k0, j0):
                yield (epoch, k, j + 1), pid, sides
            epoch, k0, j0 = epoch + 1, 0, 0

    def batches(self) -> Iterator[PairBatch]:
        """Micro-batches forever; the position moves past a batch's pairs as it is handed out."""
        for batch, after in self._pack(self._forever()):
            self.epoch, self.unit, self.pair = after
            yield batch

    def one_pass(self) -> Iterator[PairBatch]:
        """Micro-batches over `share()` once (the last may hold fewer pairs)."""
        pairs = ((None, pid, sides) for _, _, pid, sides in self._pairs_of(self.share()))
        for batch, _ in self._pack(pairs):
            yield batch

    def _pack(self, pairs) -> Iterator[tuple[PairBatch, Any]]:
        B, T = self.batch_size, self.T
        placed: list[tuple[int, int, np.ndarray, np.ndarray]] = []  # (window, start, x, y)
        ids: list[int] = []
        w = t = 0
        after = None
        for pos, pid, sides in pairs:
            for s in sides:
                if len(s[0]) > T:
                    raise DatasetError(
                        f"{self.dataset.path}: a {self.split} answer takes {len(s[0]) + 1} "
                        f"tokens with its prompt, more than model.context_length {T} + 1; "
                        f"prepare with --seq-tokens {T} or less"
                    )
            spots, w2, t2 = _place([len(s[0]) for s in sides], w, t, B, T)
            if spots is None:  # does not fit: this batch is done, the pair opens the next
                if ids:
                    yield self._tensors(placed, ids), after
                placed, ids = [], []
                spots, w2, t2 = _place([len(s[0]) for s in sides], 0, 0, B, T)
                if spots is None:
                    raise DatasetError(
                        f"{self.dataset.path}: a pair takes more than the {B} window(s) of "
                        f"{T} of a micro-batch; raise train.micro_batch_size"
                    )
            for (win, start), (x, y) in zip(spots, sides, strict=True):
                placed.append((win, start, x, y))
            ids.append(pid)
            w, t, after = w2, t2, pos
        if ids:
            yield self._tensors(placed, ids), after

    def empty(self) -> PairBatch:
        """A micro-batch with no pair (a worker with a shorter share keeps in step)."""
        return self._tensors([], [])

    def _tensors(self, placed, ids) -> PairBatch:
        B, T = self.batch_size, self.T
        x = np.zeros((B, T), np.int64)
        labels = np.full((B, T), -100, np.int64)
        segments = np.zeros((B, T), np.int64)
        seq = np.full((B, T), -1, np.int64)
        ends = np.zeros(B, np.int64)
        count = np.zeros(B, np.int64)
        for n, (win, start, xs, ys) in enumerate(placed):
            end = start + len(xs)
            x[win, start:end], labels[win, start:end] = xs, ys
            segments[win, start:end] = count[win]
            seq[win, start:end] = np.where(ys >= 0, n, -1)
            count[win] += 1
            ends[win] = end
        for win in range(B):  # the padding after the last sequence: a segment of its own
            segments[win, ends[win] :] = count[win]
        tensors = (torch.from_numpy(a) for a in (x, labels, segments, seq))
        return PairBatch(*tensors, torch.tensor(ids, dtype=torch.int64))

    def _read(self, i: int):
        unit = self.units[i]
        return _read_unit(self._files.open(unit.file), unit, with_targets=True)


def _side(tokens, targets, offsets, row: int) -> tuple[np.ndarray, np.ndarray]:
    """Row `row` as (inputs, labels): its tokens but the last, and the next token where it
    is a target (-100 elsewhere)."""
    a, b = int(offsets[row]), int(offsets[row + 1])
    ids = tokens[a:b].astype(np.int64)
    keep = targets[a + 1 : b].astype(bool)
    return ids[:-1], np.where(keep, ids[1:], -100)


def _place(lengths: list[int], w: int, t: int, B: int, T: int):
    """Where sequences of `lengths` go from window w, position t on: ([(window, start)],
    next w, next t), or (None, w, t) when they do not all fit in the B windows."""
    spots = []
    for n in lengths:
        if t + n > T:
            w, t = w + 1, 0
        if w >= B:
            return None, w, t
        spots.append((w, t))
        t += n
    return spots, w, t
