"""Start a training run on Ray: validate everything local first, then `TorchTrainer.fit()`.

The CLI (`lmforge train`), `jobs/train.py` (for `ray job submit`) and the dashboard all
call `run_training`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import checkpoint as ckpt_io
from lmforge import paths
from lmforge.config import Config, ConfigError
from lmforge.data.dataset import Dataset

log = logging.getLogger(__name__)

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    metrics: dict[str, Any]


def storage_dir(cfg: Config) -> Path:
    if paths.is_uri(cfg.run.storage_path):
        raise ConfigError(
            f"run.storage_path={cfg.run.storage_path}: remote storage is not supported yet; "
            "use a shared filesystem path"
        )
    return paths.resolve(cfg.run.storage_path)


def resolve_run(cfg: Config, resume: bool | str) -> Config:
    """Pick the run name and check that starting (or resuming) it makes sense."""
    storage = storage_dir(cfg)
    name = cfg.run.name
    if isinstance(resume, str):  # a run name or a run dir
        p = Path(resume).expanduser()
        if p.is_dir() and (p / SNAPSHOT).exists():
            storage, name = p.resolve().parent, p.resolve().name
        else:
            name = resume
    elif resume and name is None:
        runs = sorted(
            (d for d in storage.glob("*") if (d / SNAPSHOT).exists()),
            key=lambda d: (d / SNAPSHOT).stat().st_mtime,
        )
        if not runs:
            raise ConfigError(f"--resume: no run with a checkpoint under {storage}")
        name = runs[-1].name
    if name is None:
        name = time.strftime("run-%Y%m%d-%H%M%S")
    run_dir = storage / name
    has_ckpt = (run_dir / SNAPSHOT).exists()
    if resume and not has_ckpt:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from")
    if not resume and has_ckpt:
        raise ConfigError(
            f"run.name={name}: {run_dir} already has checkpoints; pass --resume to continue "
            "it, or choose another run.name"
        )
    return cfg.model_copy(
        update={"run": cfg.run.model_copy(update={"name": name, "storage_path": str(storage)})}
    )


def check_dataset(cfg: Config) -> Config:
    """Open the dataset (clear errors before Ray starts); pin its absolute path and vocab.

    The path is made absolute here so every worker reads the dataset the driver checked,
    whatever LMFORGE_HOME each of them has.
    """
    if paths.is_uri(cfg.data.path):
        raise ConfigError(
            f"data.path={cfg.data.path}: remote datasets are not supported yet; "
            "use a path on storage every node mounts"
        )
    ds = Dataset(paths.resolve(cfg.data.path))
    if cfg.model.vocab_size not in (None, ds.vocab_size):
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but the dataset's tokenizer has "
            f"{ds.vocab_size}; remove model.vocab_size or use a matching dataset"
        )
    world, need = cfg.scaling.num_workers, cfg.model.context_length + 1
    train_units = ds.units("train")
    if len(train_units) < world:
        raise ConfigError(
            f"scaling.num_workers={world}: {ds.path} has only {len(train_units)} train row "
            "groups to share; prepare it with a smaller --rows-per-group or use fewer workers"
        )
    if sum(u.tokens for u in train_units) // world < need:
        raise ConfigError(f"model.context_length={need - 1}: too long for {ds.path}'s train split")
    if sum(u.tokens for u in ds.units("val")) < need:
        raise ConfigError(
            f"data.path={ds.path}: its val split has fewer than model.context_length+1={need} "
            "tokens; prepare it with a larger --val-fraction"
        )
    model = cfg.model.model_copy(update={"vocab_size": ds.vocab_size})
    data = cfg.data.model_copy(update={"path": str(ds.path.resolve())})
    return cfg.model_copy(update={"model": model, "data": data})


def check_resume_fits(cfg: Config) -> None:
    """A resumed run must keep the model, tokenizer and sharding of its checkpoints."""
    latest = ckpt_io.latest_in_run(Path(cfg.run.storage_path) / cfg.run.name)
    if latest is None:
        return
    old = ckpt_io.read_config(latest)
    if old.model != cfg.model:
        diff = [
            f"model.{k}={getattr(cfg.model, k)} (checkpoint: {getattr(old.model, k)})"
            for k in type(cfg.model).model_fields
            if getattr(cfg.model, k) != getattr(old.model, k)
        ]
        raise ConfigError(
            f"{latest}: the config's model does not fit the checkpoint: {', '.join(diff)}"
        )
    state = ckpt_io.read_state(latest)
    # DeepSpeed's optimizer state is partitioned per rank: it loads only into the same layout.
    if (cfg.scaling.num_workers, cfg.zero.stage) != (state["world_size"], old.zero.stage):
        raise ConfigError(
            f"{latest}: saved with scaling.num_workers={state['world_size']} and "
            f"zero.stage={old.zero.stage}; resume with the same values"
        )
    if state["dataset"]["tokenizer_sha256"] != Dataset(cfg.data.path).tokenizer_sha256:
        raise ConfigError(
            f"data.path={cfg.data.path}: its tokenizer differs from the one checkpoint "
            f"{latest} was trained with"
        )


def run_training(cfg: Config, resume: bool | str = False) -> TrainResult:
    """Validate, connect to Ray, train; returns where the checkpoints are."""
    cfg = check_dataset(resolve_run(cfg, resume))
    if resume:
        check_resume_fits(cfg)

    from lmforge.cluster import connect

    where = connect()  # before importing ray.train: it sets how Ray finds the cluster

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from lmforge.training.loop import train_loop

    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    log.info("run %s on %s; checkpoints under %s", cfg.run.name, where, run_dir)
    s = cfg.scaling
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            # Ray Train's per-report INFO lines would drown our progress lines in the job log.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
    )
    result = trainer.fit()
    checkpoint = Path(result.checkpoint.path) if result.checkpoint else None
    return TrainResult(run_dir=run_dir, checkpoint=checkpoint, metrics=result.metrics or {})
