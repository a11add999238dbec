"""Mixtures: several prepared datasets read as one stream, mixed by token weight.

    data = open_data(cfg.data)              # a Dataset (data.path) or a Mixture (data.sources)
    stream = train_stream(data, T, B, rank, world, seed, document_mask, windows_per_step)
    stream.batches(); stream.state_dict(); stream.resume(positions); stream.step_metrics()
    for name, ds in val_sets(data): ...      # (None, ds) for one dataset

Every batch row is one window of T+1 tokens (T targets) of one source, so a source's share
of the windows is its share of the training tokens, whatever its documents' lengths. Which
source the next window comes from is a deterministic credit count (smooth weighted round
robin, a batch at a time): before each batch every source gains its weight x the batch's
windows (weights normalised to sum 1, at the batch's optimizer step: `data.schedule`), each
gives the whole windows it is owed and the most owed give the rest (`counts`). Over n
windows each source's count is within about one window of weight x n,
and every rank makes the same choices, so each rank's batch, and the step, has the same
composition. Each source is its own `TokenStream` over this worker's share of it: a source
that runs out starts its next epoch (and says so), the others go on.

The position is one dict per worker: the window count and credits (the same on every rank)
and each source's stream position. Resumed on the same workers it continues exactly;
on another number of workers each source's unread rest is dealt anew (`TokenStream.resume`),
and the choice of sources goes on where it stood.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge import storage
from lmforge.config import DataConfig
from lmforge.data.dataset import Dataset, DatasetError
from lmforge.data.stream import OpenShards, TokenStream


@dataclass(frozen=True)
class Source:
    name: str
    dataset: Dataset
    index: int  # in data.sources (for messages)


class Weights:
    """The mixture's normalised weights at an optimizer step: the sources' own weights, or
    the schedule's points, linear or stepwise between them."""

    def __init__(self, data: DataConfig) -> None:
        self.names = [s.label for s in data.sources]
        if data.schedule:
            self.points = [
                (p.step, [float(p.weights.get(n, 0.0)) for n in self.names]) for p in data.schedule
            ]
        else:
            self.points = [(0, [float(s.weight) for s in data.sources])]
        self.linear = data.schedule_interpolation == "linear"
        self._cache: tuple[int, list[float]] | None = None

    def at(self, step: int) -> list[float]:
        if self._cache and self._cache[0] == step:
            return self._cache[1]
        before = [p for p in self.points if p[0] <= step]
        if not before:
            w = self.points[0][1]
        else:
            i = len(before) - 1
            s0, w = self.points[i]
            if self.linear and i + 1 < len(self.points):
                s1, w1 = self.points[i + 1]
                f = (step - s0) / (s1 - s0)
                w = [a + (b - a) * f for a, b in zip(w, w1, strict=True)]
        total = sum(w)
        out = [x / total for x in w]
        self._cache = (step, out)
        return out

    def final(self) -> list[float]:
        """The weights of the last point on (what `val_loss` averages the sources by)."""
        return self.at(self.points[-1][0])


class Mixture:
    """The datasets of `data.sources`, opened and checked together: the same tokenizer, one
    kind of batch (SFT and text only with data.document_mask). It stands for a `Dataset`
    where the run needs one (the tokenizer, the vocab, the identity a checkpoint records)."""

    def __init__(self, data: DataConfig, resolve: Callable = storage.resolve) -> None:
        assert data.sources, "a mixture needs data.sources"
        self.config = data
        self.sources: list[Source] = []
        for i, s in enumerate(data.sources):
            try:
                ds = Dataset(resolve(s.path))
            except DatasetError as err:
                raise DatasetError(f"data.sources[{i}] ({s.label}): {err}") from None
            self.sources.append(Source(s.label, ds, i))
        self.weights = Weights(data)
        first = self.sources[0]
        for s in self.sources[1:]:
            if s.dataset.tokenizer_sha256 != first.dataset.tokenizer_sha256:
                raise DatasetError(
                    f"data.sources: {first.name} ({first.dataset.path}) and {s.name} "
                    f"({s.dataset.path}) were prepared with different tokenizers (sha256 "
                    f"{first.dataset.tokenizer_sha256[:12]}... vs "
                    f"{s.dataset.tokenizer_sha256[:12]}...); prepare them with the same "
                    "--tokenizer"
                )
        formats = {s.dataset.data_format: s.name for s in self.sources}
        if len(formats) > 1 and not data.document_mask:
            raise DatasetError(
                f"data.sources: {formats['sft']} is an SFT dataset and {formats['text']} is "
                "text; mixing them needs data.document_mask=true (attention and positions "
                "stay inside each document, as in an SFT batch)"
            )

    # -- what stands for a Dataset -------------------------------------------------------
    @property
    def first(self) -> Dataset:
        return self.sources[0].dataset

    @property
    def path(self) -> str:
        """How a checkpoint and the run's tags name the mixture."""
        return "mixture: " + ", ".join(f"{s.name}={s.dataset.path}" for s in self.sources)

    @property
    def paths(self) -> list[Path | storage.S3Path]:
        return [s.dataset.path for s in self.sources]

    @property
    def tokenizer_sha256(self) -> str:
        return self.first.tokenizer_sha256

    @property
    def tokenizer_path(self) -> Path:
        return self.first.tokenizer_path

    @property
    def vocab_size(self) -> int:
        return self.first.vocab_size

    @property
    def data_format(self) -> str:
        formats = {s.dataset.data_format for s in self.sources}
        return formats.pop() if len(formats) == 1 else "mixed"

    @property
    def template(self):
        """The template of the SFT sources' rows (the first's), for the checkpoints."""
        return next((s.dataset.template for s in self.sources if s.dataset.template), None)

    @property
    def eot_token(self) -> str | None:
        return self.first.eot_token

    @property
    def manifest_sha256(self) -> str:
        """One hash of every source's manifest, name and weights (and the schedule): two runs
        with this hash read the same mixture."""
        return hashlib.sha256(self.describe().encode()).hexdigest()

    def describe(self) -> str:
        """The mixture as JSON: each source's name, path, manifest hash, and the weights."""
        c = self.config
        return json.dumps(
            {
                "sources": [
                    {
                        "name": s.name,
                        "path": str(s.dataset.path),
                        "manifest_sha256": s.dataset.manifest_sha256,
                        "weight": c.sources[s.index].weight,
                    }
                    for s in self.sources
                ],
                "schedule": [p.model_dump() for p in c.schedule] if c.schedule else None,
                "schedule_interpolation": c.schedule_interpolation,
            },
            indent=1,
        )

    def check_shards(self) -> None:
        for s in self.sources:
            s.dataset.check_shards()

    def require_tokenizer(self, tokenizer_file: Path, owner: str) -> None:
        self.first.require_tokenizer(tokenizer_file, owner)


def open_data(data: DataConfig, resolve: Callable = storage.resolve) -> Dataset | Mixture:
    """data.path's dataset, or data.sources' mixture."""
    return Mixture(data, resolve) if data.sources else Dataset(resolve(data.path))


def datasets_of(data: Dataset | Mixture) -> list[tuple[str | None, Dataset]]:
    """(name, dataset) of every source; (None, dataset) for a single dataset."""
    if isinstance(data, Mixture):
        return [(s.name, s.dataset) for s in data.sources]
    return [(None, data)]


val_sets = datasets_of  # each source is evaluated on its own val split


def val_weights(data: Dataset | Mixture) -> list[float]:
    """What the run's `val_loss` weighs each val set by: a mixture's final weights."""
    return data.weights.final() if isinstance(data, Mixture) else [1.0]


class MixtureStream:
    """One worker's batches of a mixture (the module's docstring says how they are mixed);
    the interface of a `TokenStream` the trainer uses."""

    def __init__(
        self,
        mixture: Mixture,
        context_length: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        document_mask: bool = False,
        windows_per_step: int = 1,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.names = [s.name for s in mixture.sources]
        self.streams = [
            TokenStream(s.dataset, "train", context_length, batch_size, rank, world, seed=seed,
                        document_mask=document_mask)  # SFT and text: refused without it
            for s in mixture.sources
        ]  # fmt: skip
        self.weights = mixture.weights
        self._scheduled = bool(mixture.config.schedule)  # else the weights never change
        self._w = self.weights.at(0)
        self.T, self.batch_size, self.world = context_length, batch_size, world
        self.windows_per_step = windows_per_step
        self.windows = 0  # windows this worker has taken (the same count on every rank)
        self.credit = [0.0] * len(self.names)
        self._handed = [0] * len(self.names)  # windows given, before the current block
        self._reported = [0] * len(self.names)  # ... as of the last `step_metrics`
        self._k = 0  # batches of the current block handed out
        self.say = say or (lambda line: None)
        self._block: tuple | None = None  # the block being handed out (`batches`)
        self.block = max(1, min(BLOCK, BLOCK_TOKENS // (batch_size * context_length)))

    # -- the choice of sources ----------------------------------------------------------
    def counts(self, n: int) -> list[int]:
        """How many of the next `n` windows (a batch: all of one step) each source gives;
        moves the choice on. Each source's credit is the windows it is owed (its weights'
        share so far minus what it gave): a batch gives each the whole windows it is owed,
        the rest to the most owed (largest remainder; ties: the first source), so no credit
        strays past about one window. A weight-0 source keeps its credit."""
        credit, out, rest, left = self.credit, [], [], n
        # Hot (once a batch, ~2 us): int() is floor here (math.floor is slower), and the
        # weights are looked up only when a schedule can change them.
        w = self.weights.at(self.windows // self.windows_per_step) if self._scheduled else self._w
        for i, wi in enumerate(w):
            if wi > 0:
                owed = credit[i] + n * wi
                k = int(owed) if owed > 0 else 0
                out.append(k)
                credit[i] = owed
                left -= k
                rest.append((k - owed, i))  # most owed first when sorted
            else:
                out.append(0)
        rest.sort()
        if 0 < left <= len(rest):  # the usual case: one pass of the loop below
            for _, i in rest[:left]:
                out[i] += 1
            left = 0
        while left > 0:
            for _, i in rest[:left]:
                out[i] += 1
                left -= 1
        while left < 0:
            for _, i in reversed(rest):
                if left < 0 and out[i] > 0:
                    out[i] -= 1
                    left += 1
        for _, i in rest:
            credit[i] -= out[i]
        self.windows += n
        return out

    def _plan(self, batches: int, B: int) -> tuple[list, list, list]:
        """The next `batches` batches' counts, the choice state after each (windows, credit:
        what `state_dict` saves within a block) and each source's windows handed after each."""
        plan, choices, handed = [], [], []
        total = [0] * len(self.credit)
        for _ in range(batches):
            c = self.counts(B)
            plan.append(c)
            choices.append((self.windows, list(self.credit)))
            total = [a + b for a, b in zip(total, c)]  # noqa: B905 - same length: hot
            handed.append(total)
        return plan, choices, handed

    # -- the TokenStream interface ------------------------------------------------------
    def batches(self) -> Iterator[tuple[torch.Tensor, ...]]:
        """Batches from the current position, forever. They are cut a block at a time
        (`self.block` batches): the block's choices first, then each source's windows for
        all of them in one take, put in batch order with one copy; a batch is then a slice
        (per-batch work in Python made a 3-source mixture 0.5x one source at context 64;
        bench/bench_mixture.py). `state_dict` stays the position of the batches handed out."""
        cursors = [s.cursor() for s in self.streams]
        epochs = [s.epoch for s in self.streams]
        B, from_numpy = self.batch_size, torch.from_numpy
        self._close_block()  # a generator before this one may have stopped mid-block
        while True:
            start = [s.state_dict() for s in self.streams]
            plan, choices, handed = self._plan(self.block, B)
            xs, ys = [], []  # each source's windows of the block: (channels, rows, T) pieces
            for i, cursor in enumerate(cursors):
                need = sum(c[i] for c in plan)
                x, y = (cursor.take(need)[:2]) if need else ([], [])
                xs.append(x)
                ys.append(y)
                if self.streams[i].epoch != epochs[i]:
                    epochs[i] = self.streams[i].epoch
                    self.say(
                        f"data: source {self.names[i]} ran out; it starts its epoch "
                        f"{epochs[i]} (its next pass, reshuffled), the others go on"
                    )
            x, y = _in_batch_order(xs, ys, plan, B)
            self._block = (start, plan, choices, handed, self._handed)
            masked = self.streams[0].masked
            for k in range(self.block):
                self._k = k + 1  # batches of this block handed out
                a, b = k * B, (k + 1) * B  # numpy slices: a torch index costs more
                if masked:  # channels as TokenStream.tensors
                    yield from_numpy(x[0, a:b]), from_numpy(y[2, a:b]), from_numpy(x[1, a:b])
                else:
                    yield from_numpy(x[0, a:b]), from_numpy(y[0, a:b])
            self._close_block()

    def _close_block(self) -> None:
        """Count the handed-out batches of the current block as given; no block now."""
        self._handed, self._block = self.handed_out(), None

    def handed_out(self) -> list[int]:
        """Windows each source has given (this process, since the stream was made)."""
        if self._block is None:
            return list(self._handed)
        before, done = self._block[4], self._block[3][self._k - 1]
        return [a + b for a, b in zip(before, done, strict=True)]

    def step_metrics(self) -> dict[str, float]:
        """Each source's training tokens (all workers) since the last call: a step's."""
        now = self.handed_out()
        out = {
            f"data/{name}/tokens": float((n - m) * self.T * self.world)
            for name, n, m in zip(self.names, now, self._reported, strict=True)
        }
        self._reported = now
        return out

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches handed out: within a block, each source's is its
        block start moved on by the windows handed out (re-read: only at checkpoints)."""
        sources = [s.state_dict() for s in self.streams]
        windows, credit = self.windows, list(self.credit)
        if self._block is not None and self._k < self.block:
            start, _, choices, handed, _ = self._block
            windows, credit = choices[self._k - 1][0], list(choices[self._k - 1][1])
            for i, stream in enumerate(self.streams):
                sources[i] = _moved_on(stream, start[i], handed[self._k - 1][i])
        return {
            "mixture": {"windows": windows, "credit": credit},
            "sources": dict(zip(self.names, sources, strict=True)),
        }

    def resume(self, positions: list[dict[str, Any]]) -> None:
        """Continue from every worker's saved position (another number of workers: each
        source's unread rest dealt anew; the choice of sources is the same on every rank)."""
        for p in positions:
            if "mixture" not in p or set(p["sources"]) != set(self.names):
                raise DatasetError(
                    "resume: the checkpoint's data position is not of this mixture (sources "
                    f"{sorted(p.get('sources', {})) or 'none: one dataset'}, now "
                    f"{sorted(self.names)}); resume with the data config it was trained with"
                )
        mix = positions[0]["mixture"]
        self.windows = int(mix["windows"])
        self.credit = [float(c) for c in mix["credit"]]
        self._close_block()
        for name, stream in zip(self.names, self.streams, strict=True):
            stream.resume([p["sources"][name] for p in positions])


# Tokens cut at once (`MixtureStream.batches`), at most BLOCK batches: enough batches to
# spread the per-block Python over, few enough that the block's arrays stay small. At
# context 1024 x 8 rows a block of 16 batches (2 x 1 MiB arrays) streamed at 0.69-0.84x of
# one source, 8 batches at 0.92-1.03x. At context 64 x 8 (the choice of sources planned a
# block at a time, `_plan`), 16 batches gave 0.83-0.93x, 64 gave 0.99-1.05x, 128 alike
# (bench/bench_mixture.py's data, 2026-12-07).
BLOCK_TOKENS = 65_536
BLOCK = 64


def _in_batch_order(
    xs: list[list[np.ndarray]], ys: list[list[np.ndarray]], plan: list[list[int]], B: int
) -> tuple[np.ndarray, np.ndarray]:
    """The block's inputs and targets, each one int64 array (channels, BLOCK*B, T) of the
    sources' windows (each source's a list of (channels, rows, T) pieces), batch k's rows at
    k*B: each source's next plan[k][i] windows, source by source. Short windows: one
    gather each, by one index (Python per segment costs more than the copies); long ones:
    each segment cast into place (one copy)."""
    some = next(p[0] for p in xs if p)
    T = some.shape[2]
    if T < LONG_WINDOW:
        counts = np.asarray(plan, dtype=np.intp)  # (batches, sources)
        first = np.concatenate([[0], np.cumsum(counts.sum(axis=0))[:-1]])  # a source's rows
        before = np.cumsum(counts, axis=0) - counts  # its rows given by earlier batches
        start = (first[None, :] + before).ravel()  # each (batch, source) segment's first row
        length = counts.ravel()
        out_start = np.cumsum(length) - length
        index = np.repeat(start - out_start, length) + np.arange(length.sum())
        return tuple(
            np.concatenate([p for ps in parts for p in ps], axis=1, dtype=np.int64)[:, index]
            for parts in (xs, ys)
        )
    return _copied_in_order(xs, plan, B), _copied_in_order(ys, plan, B)


def _copied_in_order(parts: list[list[np.ndarray]], plan: list[list[int]], B: int) -> np.ndarray:
    some = next(p[0] for p in parts if p)
    C, T = some.shape[0], some.shape[2]
    out = np.empty((C, len(plan) * B, T), dtype=np.int64)
    at = [[0, 0] for _ in parts]  # per source: its piece, the row in it
    row = 0
    for c in plan:
        for i, n in enumerate(c):
            while n:
                piece, r = at[i]
                src = parts[i][piece]
                take = min(n, src.shape[1] - r)
                out[:, row : row + take] = src[:, r : r + take]
                row, n = row + take, n - take
                at[i] = [piece + 1, 0] if r + take == src.shape[1] else [piece, r + take]
    return out


LONG_WINDOW = 256  # tokens: from here `_in_batch_order` copies segment by segment


def _moved_on(stream: TokenStream, start: dict[str, Any], n: int) -> dict[str, Any]:
    """The position of `stream` `n` windows after `start` (read again from its shards)."""
    if n == 0:
        return start
    replay = copy.copy(stream)
    replay._files = OpenShards()  # its own: the stream's stay open
    replay.load_state_dict(start)
    replay.cursor().take(n)
    replay._files.close()
    return replay.state_dict()


def train_stream(
    data: Dataset | Mixture,
    context_length: int,
    batch_size: int,
    rank: int,
    world: int,
    seed: int,
    document_mask: bool,
    windows_per_step: int,
    say: Callable[[str], None] | None = None,
) -> TokenStream | MixtureStream:
    """The training stream of a dataset or a mixture."""
    if isinstance(data, Mixture):
        return MixtureStream(
            data, context_length, batch_size, rank, world, seed, document_mask,
            windows_per_step, say,
        )  # fmt: skip
    return TokenStream(
        data, "train", context_length, batch_size, rank, world, seed=seed,
        document_mask=document_mask,
    )  # fmt: skip
