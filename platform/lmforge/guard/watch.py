"""The guard: what triggers it, where it rolls back to, what it skips and records.

A trigger is a synced step whose loss or grad norm is NaN/inf (`nonfinite`), or whose loss
is above `spike.factor` x the median of the last `spike.window` sound steps. On a trigger
at step S the guard either stops the run (`nonfinite: stop`, or `max_rollbacks` used up)
with a `GuardStop` that says why and where, or rolls back: to the newest checkpoint of the
run before S whose loss and val loss were finite, skipping (`skip_batches`) the data read
from that checkpoint to S -- the stream goes on from where it stood at S -- and scaling the
LR by `lr_scale_after`. A rollback is recorded in `guard.json` in the run dir (the steps,
the skipped token range, every rank's stream position after it): a run resumed from the
checkpoint it rolled back to skips the same window; later checkpoints carry the count and
the skips in their trainer state. Each event is one job-log line, one point of the MLflow
metric `guard/rollbacks` and one tag `guard/event/<n>` (the Runs page draws it as a banner).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmforge import checkpoint as ckpt_io
from lmforge import dist, storage
from lmforge.config import GuardConfig
from lmforge.errors import LmforgeError

RECORD = "guard.json"  # in the run dir: the rollbacks so far
EVENT_TAG = "guard/event/"  # + the event's number: its JSON
STOP_TAG = "guard/stopped"


class GuardStop(LmforgeError):
    """The guard stopped the run; the message says why and where."""


@dataclass(frozen=True)
class Event:
    """A synced step that triggered the guard."""

    step: int
    reason: str  # "non-finite loss", "loss spike" ...
    detail: str  # the numbers


class Rewindable(Protocol):
    """What the guard needs of the trainer to roll it back."""

    step: int
    tokens_per_step: int

    def data_positions(self) -> list[dict[str, Any]]:
        """Every rank's stream position (a collective)."""
        ...

    def rewind(
        self, checkpoint: Path | None, positions: list[dict[str, Any]] | None, lr_scale: float
    ) -> None:
        """Load `checkpoint`'s engine and trainer state (None: keep them); the stream from
        `positions` (None: the checkpoint's own); the LR times `lr_scale` from now on."""
        ...


class Guard:
    def __init__(
        self,
        cfg: GuardConfig | None,
        run_dir: str | Path,
        info: dist.DistInfo,
        tracker,
        say: Callable[[str], None],
    ) -> None:
        self.cfg, self.run_dir, self.info = cfg, storage.resolve(str(run_dir)), info
        self.tracker, self.say = tracker, say
        self.recent: deque[float] = deque(maxlen=cfg.spike.window if cfg and cfg.spike else 1)
        self.rollbacks: list[dict[str, Any]] = []  # this run's, oldest first
        self.stopped: str | None = None  # why the guard stopped the run

    @property
    def active(self) -> bool:
        return self.cfg is not None

    # -- what triggers it ---------------------------------------------------------------
    def observe(self, steps: list[dict[str, float]]) -> Event | None:
        """The first synced step (every rank has the same numbers) that triggers the guard."""
        if self.cfg is None:
            return None
        for m in steps:
            loss, grad = m["loss"], m["grad_norm"]
            # A grad norm DeepSpeed did not report is NaN in the metrics: only inf counts; a
            # NaN gradient makes the next step's loss NaN anyway.
            if self.cfg.nonfinite != "off" and not (math.isfinite(loss) and grad != math.inf):
                return Event(int(m["step"]), "non-finite loss", f"loss {loss}, grad norm {grad}")
            spike = self.cfg.spike
            if spike and len(self.recent) == spike.window:
                median = statistics.median(self.recent)
                if loss > spike.factor * median:
                    return Event(
                        int(m["step"]), "loss spike",
                        f"loss {loss:.4f} > {spike.factor:g} x {median:.4f}, the median of "
                        f"the last {spike.window} steps",
                    )  # fmt: skip
            if math.isfinite(loss):
                self.recent.append(loss)
        return None

    # -- what it does -------------------------------------------------------------------
    def act(self, event: Event, trainer: Rewindable) -> None:
        """Roll `trainer` back past `event`, or raise `GuardStop`. Collective."""
        cfg = self.cfg
        assert cfg is not None
        where = f"{event.reason} at step {event.step} ({event.detail})"
        if cfg.nonfinite == "stop":
            self._stop(f"guard: {where}; train.guard.nonfinite=stop", event)
        if len(self.rollbacks) >= cfg.max_rollbacks:
            self._stop(
                f"guard: {where}, after {len(self.rollbacks)} rollback(s) "
                f"(train.guard.max_rollbacks={cfg.max_rollbacks}); the run stops here",
                event,
            )
        target = self.sound_checkpoint(event.step)
        if target is None:
            self._stop(
                f"guard: {where}; no sound checkpoint before it to roll back to (lower "
                "train.checkpoint_every)",
                event,
            )
        state = ckpt_io.read_state(target)  # saved by another number of workers: re-sharded
        positions = trainer.data_positions()  # where the stream stands after step S
        # the run's token count (a checkpoint of another number of workers: from its own)
        tokens = [
            state.tokens_seen,
            state.tokens_seen + (event.step - state.step) * trainer.tokens_per_step,
        ]
        record = {
            "n": len(self.rollbacks) + 1,
            "step": event.step,
            "reason": event.reason,
            "detail": event.detail,
            "rolled_back_to": state.step,
            "checkpoint": str(target),
            # the steps after the checkpoint up to the trigger, in the run's token count
            "skipped_tokens": tokens if cfg.skip_batches else None,
            "positions": positions if cfg.skip_batches else None,
            "lr_scale": cfg.lr_scale_after,
        }
        self.rollbacks.append(record)
        self._write_record()
        with _local(target) as local:
            trainer.rewind(local, positions if cfg.skip_batches else None, cfg.lr_scale_after)
        self.recent.clear()
        skipped = (
            f"skipping the data of steps {state.step + 1}..{event.step} (tokens "
            f"{tokens[0]:,}..{tokens[1]:,})"
            if cfg.skip_batches
            else "reading the same data again"
        )
        lr = f", LR x {cfg.lr_scale_after:g}" if cfg.lr_scale_after != 1 else ""
        self.say(
            f"guard: {where}; rollback {record['n']}/{cfg.max_rollbacks} to the checkpoint of "
            f"step {state.step}, {skipped}{lr}"
        )
        self.tracker.log_metrics(event.step, {"guard/rollbacks": float(record["n"])})
        self.tracker.set_tags({f"{EVENT_TAG}{record['n']}": json.dumps(_public(record))})

    def _stop(self, message: str, event: Event) -> None:
        """Say why and where, record it for the launcher (`raise_if_stopped`: the job ends
        non-zero with this line), and end the workers with `GuardStop`; `run_worker` ends
        them without an error, so Ray Train does not restart them to diverge again."""
        self.say(message)
        self.tracker.set_tags({STOP_TAG: message[:5000]})
        self.stopped = message
        self._write_record()
        raise GuardStop(message)

    def sound_checkpoint(self, before: int) -> Path | storage.S3Path | None:
        """The newest complete checkpoint of the run before step `before` whose loss and
        val loss were finite."""
        found = []
        for d in self.run_dir.glob("checkpoint_*"):
            try:
                step = int(d.name.rsplit("_", 1)[1])
            except ValueError:
                continue
            if step < before:
                found.append((step, d))
        for _, d in sorted(found, reverse=True):
            if ckpt_io.incomplete(d) is not None:
                continue
            m = ckpt_io.read_state(d).metrics
            if all(_finite(m.get(k, 0.0)) for k in ("loss", "val_loss")):
                return d
        return None

    # -- the record -----------------------------------------------------------------------
    def _write_record(self) -> None:
        if self.info.is_main:
            tmp = self.run_dir / (RECORD + ".tmp")
            record = {"rollbacks": self.rollbacks, "stopped": self.stopped}
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            if isinstance(tmp, Path):
                tmp.replace(self.run_dir / RECORD)
            else:  # S3: no rename; one PUT is atomic
                (self.run_dir / RECORD).write_text(tmp.read_text())
        dist.barrier(self.info)

    def state(self) -> dict[str, Any]:
        """What a checkpoint's trainer state records of the guard."""
        return {"rollbacks": [_public(r) for r in self.rollbacks]} if self.rollbacks else {}

    def on_resume(self, trainer: Rewindable, step: int, saved: dict[str, Any]) -> None:
        """Resumed from the checkpoint of `step`: the rollbacks so far count (from the run's
        record, else the checkpoint's), and one that rolled back to this very checkpoint
        skips its window again."""
        record = self.run_dir / RECORD
        old = json.loads(record.read_text()) if record.is_file() else None
        dist.barrier(self.info)  # every rank has read it before rank 0 may change it
        if old is not None:
            self.rollbacks = old["rollbacks"]
            if old.get("stopped") and self.info.is_main:  # resumed: not stopped any more
                (self.run_dir / RECORD).write_text(
                    json.dumps({"rollbacks": self.rollbacks, "stopped": None}, indent=1) + "\n"
                )
        else:
            self.rollbacks = list(saved.get("rollbacks", []))
        again = [r for r in self.rollbacks if r["rolled_back_to"] == step and r.get("positions")]
        if not again:
            return
        r = again[-1]
        trainer.rewind(None, r["positions"], r["lr_scale"])
        self.say(
            f"guard: resumed at step {step}, where rollback {r['n']} went back to: skipping "
            f"the data of steps {step + 1}..{r['step']} again"
        )


@contextlib.contextmanager
def _local(checkpoint: Path | storage.S3Path):
    """The checkpoint's files on this worker: itself, or (S3) a copy in a temp dir, each
    rank its own, removed once loaded."""
    if isinstance(checkpoint, Path):
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-rollback-") as tmp:
        yield storage.download_dir(checkpoint, Path(tmp) / checkpoint.name)


def raise_if_stopped(run_dir) -> None:
    """The launcher's end of a run: `GuardStop` with the guard's message if it stopped it."""
    record = storage.resolve(str(run_dir)) / RECORD
    if record.is_file() and (message := json.loads(record.read_text()).get("stopped")):
        raise GuardStop(message)


def _public(record: dict[str, Any]) -> dict[str, Any]:
    """A rollback without the stream positions (for tags and trainer states)."""
    return {k: v for k, v in record.items() if k != "positions"}


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return True  # no grad norm known (None): nothing to judge
