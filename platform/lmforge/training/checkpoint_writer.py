"""The one checkpoint writer: a training run's checkpoint dir, every rank's part of it.

    state = write(out, engine, info, content)   # collective: every rank calls it

What a checkpoint holds and how it is read is `lmforge.checkpoint` (the format and the
loader); this module writes it from a live DeepSpeed engine: each rank saves its engine
shard, the weights are gathered to rank 0, which writes the servable files (or a LoRA
run's adapters), the trainer state and, last, the seal (`files.json`, listing every rank's
files). Persisting the dir into the run dir is the session's (`Session.report`); what
happens after that (registration, evaluation) subscribes to `CheckpointSubscriber`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lmforge import checkpoint as ckpt_io
from lmforge import dist, faults
from lmforge.config import Config
from lmforge.data.dataset import Dataset
from lmforge.training.engine_state import consolidated_weights


@dataclass(frozen=True)
class Content:
    """What a checkpoint of one step records besides the engine."""

    cfg: Config
    dataset: Dataset
    step: int
    tokens_seen: int
    position: dict[str, Any]  # this rank's data stream position
    metrics: dict[str, float]  # of this step
    evals: list[dict[str, float]]  # the run's evaluations so far
    base: ckpt_io.BaseRef | None = None  # a LoRA run's base (rank 0)
    guard: dict[str, Any] | None = None  # the guard's rollbacks so far (`Guard.state`)


def write(out: Path, engine, info: dist.DistInfo, content: Content) -> ckpt_io.TrainerState | None:
    """Write this rank's part of the checkpoint into `out`; rank 0 writes the servable
    files, the trainer state and the seal. Returns the trainer state on rank 0, else None."""
    lora = content.cfg.train.lora is not None
    engine.save_checkpoint(
        str(out / ckpt_io.ENGINE_DIR), tag=ckpt_io.ENGINE_TAG,
        exclude_frozen_parameters=lora,  # the base is in base.json's folder
    )  # fmt: skip
    faults.maybe_kill("checkpoint", content.step, info.rank)
    weights = consolidated_weights(engine, info, trainable_only=lora)
    # Each rank's data position, and the engine files it adds to the checkpoint dir.
    ranks = dist.all_gather_object((content.position, ckpt_io.file_sizes(out)), info)
    if not info.is_main:
        return None
    ds = content.dataset
    state = ckpt_io.TrainerState(
        step=content.step,
        tokens_seen=content.tokens_seen,
        world_size=info.world,
        data=[position for position, _ in ranks],
        dataset=ckpt_io.DatasetIdentity(str(ds.path), ds.manifest_sha256, ds.tokenizer_sha256),
        metrics=dict(content.metrics),
        evals=list(content.evals),
        guard=dict(content.guard or {}),
    )
    if lora:
        from lmforge.lora import saved_names

        ckpt_io.save_adapter(
            out, saved_names(weights), content.cfg, ds.tokenizer_path, state, content.base
        )
    else:
        ckpt_io.save_servable(out, weights, content.cfg, ds.tokenizer_path, state)
    ckpt_io.save_template(out, ds.template)  # how prompts look
    ckpt_io.seal(out, [files for _, files in ranks[1:]])
    return state


class CheckpointSubscriber(Protocol):
    """What is told about each checkpoint: `stage` while its dir is still this worker's
    (before the session persists it; Ray may delete it from the run dir later, under
    `run.checkpoints_to_keep`), `persisted` once every rank's files are in the run dir.
    Called on every rank; `Tracker` (rank 0) registers it, `NullTracker` does nothing."""

    def stage(self, checkpoint: Path, step: int) -> Any: ...

    def register(self, staged: Any, checkpoint: Path, state: ckpt_io.TrainerState) -> None: ...
