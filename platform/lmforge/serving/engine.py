"""Continuous batching: one model (a base and any number of its LoRA adapters) decoding
every running request together, requests joining and leaving between decode steps.

    engine = Engine(model, max_batch=8)             # model: a base, adapters added by name
    engine.start()                                  # a thread runs the decode loop
    engine.submit(Job(ids, params, adapter="a1", emit=on_piece))  # on_piece(Piece) per piece

Each request's `params.n` samples take `n` rows of a `SlotCache` (its own KV cache slots).
A new request's prompt runs alone through a `KVCache` of its own (the prefill), its first
tokens are picked, and its rows join the running batch; then every step feeds each row's
last token, one forward for all rows, and each request picks its rows' next tokens with
`generation.sample_step` and turns them into text with `generation.PieceMaker`: the code
`lmforge generate` runs, so a request's greedy (or seeded) output is generate's. A request
whose samples all ended leaves at once, its rows taken by the last ones. The rows of a batch
may belong to different adapters: peft's mixed-batch forward (`adapter_names`, "__base__"
for the base) applies each row's own.

A row that reaches the context ends with finish "length" (generate would go on by
refilling its cache from the recent tokens; a server reports the context instead). A
recurrent model (lstm) batches the same way, its slots holding each row's state
(`Architecture.new_slots`) and no context to reach; an architecture with no cache at all
would run each request alone with `generation.stream_samples`, one at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lmforge import models
from lmforge.generation import Piece, PieceMaker, SamplingParams, sample_step, stream_samples
from lmforge.models.attention import SlotCache

log = logging.getLogger(__name__)
BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass
class Job:
    """One request: its prompt ids, sampling parameters (stop_token set), adapter (None:
    the base) and where its pieces go (`emit`, called from the engine's thread; a piece with
    index -1 and finish "error" carries an error's text)."""

    ids: list[int]
    params: SamplingParams
    emit: Callable[[Piece], None]
    tokenizer: object
    adapter: str | None = None
    cancelled: bool = False
    # set by the engine
    rows: list[int] = field(default_factory=list)
    seq: torch.Tensor | None = None  # (n, L) every row's tokens so far
    pieces: PieceMaker | None = None
    generator: torch.Generator | None = None
    alive: list[bool] = field(default_factory=list)
    steps: int = 0


class Engine:
    """The decode loop of one replica (see the module docstring)."""

    def __init__(self, model, max_batch: int = 8) -> None:
        self.model = model.eval()
        self.max_batch = max_batch
        arch = models.of(model)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.slots = None  # the running batch's cache: a slot a row
        if arch.new_slots is not None:  # a recurrent state's (lstm)
            self.slots = arch.new_slots(model, max_batch, self.device, self.dtype)
        elif arch.new_cache is not None and arch.context_limited:  # attention's KV cache
            proto = arch.new_cache(model, 1, self.device, self.dtype)
            layers, _, heads, length, head_dim = len(proto.k), *proto.k[0].shape
            self.slots = SlotCache(
                layers, max_batch, heads, length, head_dim, self.device, self.dtype
            )
        self.batched = self.slots is not None
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.row_adapters: list[str] = []  # each row's adapter, read by the LoRA hooks
        self._hooks = _adapter_hooks(model, self)
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.idle = True  # the loop waits for work (a job it took is in neither queue)
        self.steps = 0  # decode steps run, for tests and stats
        self.max_rows_seen = 0

    # -- the interface ----------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        if job.params.n > self.max_batch:
            raise ValueError(
                f"n={job.params.n} is more than the replica's --max-batch {self.max_batch}"
            )
        with self._wake:
            self.waiting.append(job)
            self._wake.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self.waiting or self.running or self._stop):
                    self.idle = True
                    self._wake.wait()
                self.idle = False
                if self._stop:
                    return
            try:
                self.step()
            except Exception as err:  # a bug: fail every request in flight, keep serving
                log.exception("engine step failed")
                for job in [*self.running, *self.waiting]:
                    job.emit(Piece(-1, f"{type(err).__name__}: {err}", None, "error"))
                self.running.clear()
                self.waiting.clear()
                if self.slots is not None:
                    self.slots.rows = 0

    # -- one iteration: admit, decode, retire -------------------------------------------------
    @torch.no_grad()
    def step(self) -> None:
        """Admit waiting requests that fit, then one decode step for every running row."""
        if not self.batched:
            job = self._next_waiting()
            if job is not None:
                self._run_alone(job)
            return
        while self.waiting and self._rows() + self.waiting[0].params.n <= self.max_batch:
            job = self._next_waiting()
            if job is not None:
                self._prefill(job)
        if self.running:
            self._decode()

    def _next_waiting(self) -> Job | None:
        with self._wake:
            job = self.waiting.popleft() if self.waiting else None
        if job is not None and job.cancelled:
            return None
        return job

    def _rows(self) -> int:
        return sum(len(j.rows) for j in self.running)

    def _prefill(self, job: Job) -> None:
        p = job.params
        cache = models.of(self.model).new_cache(self.model, 1, self.device, self.dtype)
        ids = torch.tensor([job.ids], dtype=torch.long, device=self.device)
        self.row_adapters[:] = [job.adapter or BASE]
        logits, _ = self.model(ids, cache=cache)
        job.seq = ids.expand(p.n, -1)
        job.pieces = PieceMaker(job.tokenizer, p)
        job.alive = [True] * p.n
        if p.seed is not None:
            job.generator = torch.Generator(device=self.device).manual_seed(p.seed)
        if p.max_new_tokens == 0:
            return self._finish(job, "length")
        first = self._rows()
        job.rows = list(range(first, first + p.n))
        for r in job.rows:
            self.slots.put(r, cache)
        self.running.append(job)
        self._pick(job, logits[:, -1, :].expand(p.n, -1))

    def _decode(self) -> None:
        rows = self._rows()
        self.max_rows_seen = max(self.max_rows_seen, rows)
        last = torch.empty(rows, 1, dtype=torch.long, device=self.device)
        self.row_adapters[:] = [BASE] * rows
        for job in self.running:
            last[job.rows] = job.seq[:, -1:]
            for r in job.rows:
                self.row_adapters[r] = job.adapter or BASE
        self.slots.use(rows)
        logits, _ = self.model(last, cache=self.slots)
        self.steps += 1
        # Rows move when a job leaves: each job's logits are taken at this step's rows.
        for job, at in [(j, list(j.rows)) for j in self.running]:
            self._pick(job, logits[at, -1, :])

    def _pick(self, job: Job, logits: torch.Tensor) -> None:
        """The job's next tokens from its rows' logits; it leaves the batch when done."""
        p = job.params
        if job.cancelled:
            return self._leave(job)
        nxt, step = sample_step(logits, job.seq, p, job.generator, len(job.ids))
        job.seq = torch.cat([job.seq, nxt], dim=1)
        job.steps += 1
        for i, choice in enumerate(step):
            if job.alive[i] and p.stop_token is not None and choice.token == p.stop_token:
                job.alive[i] = False
        if not any(job.alive):  # as generate_steps: every sample met the stop token
            return self._finish(job, "stop_token")
        for piece in job.pieces.step(
            [c if a else None for c, a in zip(step, job.alive, strict=True)]
        ):
            job.emit(piece)
        if job.pieces.done:
            return self._leave(job)
        # The next step writes the last token at position len-1: the context must hold it.
        if job.steps >= p.max_new_tokens or job.seq.size(1) > self.slots.capacity:
            self._finish(job, "length")

    def _finish(self, job: Job, reason: str) -> None:
        for piece in job.pieces.close(reason):
            job.emit(piece)
        self._leave(job)

    def _leave(self, job: Job) -> None:
        """Take the job's rows out; the last rows move into them so rows stay contiguous."""
        if job not in self.running:
            return
        self.running.remove(job)
        freed = sorted(job.rows)
        job.rows = []
        total = self._rows()  # rows still in use, to be packed into 0..total-1
        owners = {r: j for j in self.running for r in j.rows}
        holes = [r for r in freed if r < total]
        movers = sorted((r for r in owners if r >= total), reverse=True)
        for hole, src in zip(holes, movers, strict=True):
            self.slots.move(src, hole)
            owner = owners[src]
            owner.rows[owner.rows.index(src)] = hole

    def _run_alone(self, job: Job) -> None:
        """A model without a KV cache: the request runs by itself, as `lmforge generate`."""
        for piece in stream_samples(self.model, job.tokenizer, job.ids, job.params):
            if job.cancelled:
                return
            job.emit(piece)


def _adapter_hooks(model, engine: Engine) -> list:
    """Forward pre-hooks giving every LoRA layer its rows' adapters (peft's mixed batch)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []

    def hook(module, args, kwargs):
        kwargs["adapter_names"] = list(engine.row_adapters)
        return args, kwargs

    return [
        m.register_forward_pre_hook(hook, with_kwargs=True)
        for m in model.modules()
        if isinstance(m, LoraLayer)
    ]


def wait_idle(engine: Engine, timeout_s: float = 30) -> None:
    """Until nothing runs or waits (tests). `idle`, not the queues alone: a job being
    admitted has left `waiting` and not yet joined `running`."""
    deadline = time.monotonic() + timeout_s
    while not engine.idle or engine.waiting:
        if time.monotonic() > deadline:
            raise TimeoutError("engine still busy")
        time.sleep(0.01)
