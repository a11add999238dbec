"""The session port: what the worker loop needs from whatever runs it.

    session.info                      rank, world size, device (`dist.DistInfo`)
    with session.restore_point() as resume:   the checkpoint to continue from, or None
    session.report(metrics)           progress for the orchestrator (a barrier across ranks)
    session.report(metrics, ckpt_dir) ... and a checkpoint dir to persist into the run dir
    session.node()                    where this rank runs: {"node_id", "address"}

`RaySession` (`ray_session.py`) is the product's: Ray Train started the workers, persists
the checkpoints and restarts a failed worker group from the latest one. `LocalSession`
(`local_session.py`) runs the same `Trainer` on N gloo ranks in plain processes, without
Ray: how the loop is tested, and how a config is tried on a laptop (`lmforge train --local`).

A checkpoint dir handed to `report` is named as it will be in the run dir
(`checkpoint_NNNNNNNN`); `report` returns once this rank's files are persisted there.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lmforge import checkpoint as ckpt_io
from lmforge import dist, storage
from lmforge.config import Config
from lmforge.training import engine_state

if TYPE_CHECKING:
    from lmforge.tracking.tracker import TrackingSettings


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker receives from the launcher: the typed part of its `LaunchPlan`
    that a worker reads (the dataset is reopened there from `config.data.path`)."""

    config: Config
    run_dir: str  # a local path or s3:// URI
    init_from: str | None  # the run dir's copy of the --init-from weights
    tracking: TrackingSettings | None  # None: no MLflow
    launched_at: float  # unix time the launcher started the workers (the startup line)


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a (re)started worker group continues from, read once, before the
    engine is built (a resume on another number of workers builds it to load a universal
    checkpoint)."""

    local: Path  # its files, on this worker
    persisted: Path | storage.S3Path  # where it is kept: the run dir's checkpoint_NNNNNNNN
    state: ckpt_io.TrainerState

    @classmethod
    def open(cls, local: Path, persisted: Path | storage.S3Path) -> ResumePoint:
        if why := ckpt_io.incomplete(local):  # recorded only once all ranks copied it
            raise ckpt_io.CheckpointError(f"{local}: an incomplete checkpoint ({why})")
        return cls(local, persisted, ckpt_io.read_state(local))

    def resharded(self, world: int) -> bool:
        """Saved by another number of workers, with per-rank (ZeRO 1-3) engine state."""
        return self.state.world_size != world and engine_state.is_partitioned(self.local)


class Session(Protocol):
    """The orchestrator of one worker, as the `Trainer` sees it."""

    info: dist.DistInfo

    def restore_point(self) -> AbstractContextManager[ResumePoint | None]:
        """The checkpoint to resume from (its files stay readable inside the block)."""
        ...

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        """Hand over this step's metrics and, optionally, a checkpoint dir to persist.
        Every rank calls it at the same steps."""
        ...

    def node(self) -> dict[str, str]:
        """{"node_id", "address"} of the node this rank runs on."""
        ...
