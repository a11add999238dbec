"""Start a training run on Ray: validate everything local first, then `TorchTrainer.fit()`.

The CLI (`lmforge train`), `jobs/train.py` (for `ray job submit`) and the dashboard all
call `run_training`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lmforge
from lmforge import checkpoint as ckpt_io
from lmforge import paths
from lmforge.config import Config, ConfigError
from lmforge.data.dataset import Dataset
from lmforge.errors import first_line
from lmforge.tokenizer import file_sha256

log = logging.getLogger(__name__)

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    metrics: dict[str, Any]
    mlflow_run_id: str | None = None


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
    ds.check_shards()  # footers only: a truncated or foreign shard is named before Ray starts
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
    if cfg.zero.stage != old.zero.stage:
        raise ConfigError(
            f"{latest}: saved with zero.stage={old.zero.stage}; resume with the same value"
        )
    if cfg.scaling.num_workers != state["world_size"]:
        t = cfg.train
        log.warning(
            "resuming %s, saved by %d workers, on scaling.num_workers=%d: the optimizer state "
            "is re-partitioned, the rest of the epoch re-dealt, and a step is now %d "
            "sequences (was %d)",
            latest, state["world_size"], cfg.scaling.num_workers,
            t.micro_batch_size * t.grad_accum_steps * cfg.scaling.num_workers,
            t.micro_batch_size * t.grad_accum_steps * state["world_size"],
        )  # fmt: skip
    if state["dataset"]["tokenizer_sha256"] != Dataset(cfg.data.path).tokenizer_sha256:
        raise ConfigError(
            f"data.path={cfg.data.path}: its tokenizer differs from the one checkpoint "
            f"{latest} was trained with"
        )


def resolve_resume(resume: bool | str, tracking_uri: str | None) -> bool | str:
    """`--resume models:/NAME/VERSION` -> the run dir of the run that registered it."""
    if not (isinstance(resume, str) and resume.startswith("models:/")):
        return resume
    from lmforge.tracking import registry

    version = registry.get_version(resume, tracking_uri)
    run_dir = version.tags.get("run_dir")
    if not run_dir:
        raise ConfigError(f"--resume {resume}: the version has no run_dir tag to resume from")
    log.info("resuming %s: the run that made it, %s", resume, run_dir)
    return run_dir


def prepare_init(cfg: Config, init_from: str | None) -> tuple[Config, Path | None]:
    """`--init-from`: a registered version or checkpoint dir whose weights start a new run.

    The model's shape comes from the checkpoint (fine-tuning keeps the architecture); its
    tokenizer must be the dataset's. The servable files are copied into the run dir, where
    every worker can read them.
    """
    if not init_from:
        return cfg, None
    from lmforge.tracking import registry

    if registry.is_model_uri(init_from):
        src = registry.fetch_checkpoint(init_from, cfg.tracking.tracking_uri)
    else:
        src = ckpt_io.resolve_checkpoint(init_from)
    old = ckpt_io.read_config(src)
    if file_sha256(src / ckpt_io.TOKENIZER) != Dataset(cfg.data.path).tokenizer_sha256:
        raise ConfigError(
            f"--init-from {init_from}: its tokenizer differs from data.path={cfg.data.path}'s; "
            f"prepare the data with --tokenizer {src / ckpt_io.TOKENIZER}"
        )
    if old.model.model_dump(exclude={"dropout"}) != cfg.model.model_dump(exclude={"dropout"}):
        log.info("--init-from: the model shape comes from the checkpoint (%s)", old.model)
    model = old.model.model_copy(update={"dropout": cfg.model.dropout})
    cfg = cfg.model_copy(update={"model": model})
    dst = Path(cfg.run.storage_path) / cfg.run.name / "init_from"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ckpt_io.SERVABLE:
        shutil.copyfile(src / name, dst / name)
    (dst / "SOURCE").write_text(f"{init_from}\n")
    return cfg, dst


def _git_commit() -> str | None:
    """The commit of the code being run: LMFORGE_GIT_COMMIT (set it for `ray job submit`,
    whose working dir has no .git), else `git rev-parse HEAD` in the working dir."""
    if os.environ.get("LMFORGE_GIT_COMMIT"):
        return os.environ["LMFORGE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _ray_tags(where: str) -> dict[str, str]:
    import ray

    tags = {"ray.address": where, "ray.job_id": ray.get_runtime_context().get_job_id()}
    # Set by Ray's job supervisor for `ray job submit` / JobSubmissionClient entrypoints.
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if job_config:
        try:
            sub = json.loads(job_config).get("metadata", {}).get("job_submission_id")
        except (json.JSONDecodeError, AttributeError):
            sub = None
        if sub:
            tags["ray.submission_id"] = sub
    return tags


def tracking_settings(cfg: Config, where: str, init_from: str | None) -> dict[str, Any] | None:
    """What rank 0 needs to log the run (None when tracking is off)."""
    if not cfg.tracking.enabled:
        return None
    from lmforge.tracking import store
    from lmforge.tracking.tracker import RUN_DIR_TAG, TrackingSettings, flatten

    ds = Dataset(cfg.data.path)
    run_dir = str(Path(cfg.run.storage_path) / cfg.run.name)
    tags = {
        RUN_DIR_TAG: run_dir,
        "lmforge.version": lmforge.__version__,
        "dataset.path": str(ds.path),
        "dataset.manifest_sha256": ds.manifest_sha256,
        **_ray_tags(where),
    }
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    if init_from:
        tags["lmforge.init_from"] = init_from
    settings = TrackingSettings(
        uri=cfg.tracking.tracking_uri or store.resolve_uri(),
        experiment=cfg.tracking.experiment,
        registered_model=cfg.registered_model,
        run_name=cfg.run.name,
        run_dir=run_dir,
        tags=tags,
        params=flatten(cfg.to_dict()),
        artifacts={
            "config.yaml": cfg.to_yaml(),
            "dataset/manifest.json": (ds.path / "manifest.json").read_text(),
        },
    )
    return asdict(settings)


def pin_tracking_uri(cfg: Config) -> Config:
    """Resolve the tracking URI once on the driver, so every worker uses the same store."""
    if not cfg.tracking.enabled:
        return cfg
    from lmforge.tracking import store

    uri = store.resolve_uri(cfg.tracking.tracking_uri)
    try:  # creates the store and experiment once, here, not in several processes at once
        if not store.reachable(uri):
            raise ConnectionError("no answer to its health check")
        store.ensure_experiment(store.client(uri), cfg.tracking.experiment, uri)
    except Exception as err:  # tracking trouble never stops training
        log.warning(
            "MLflow at %s: %s; training goes on and rank 0 keeps retrying "
            "(start it with `lmforge tracking up`, or set tracking.tracking_uri)",
            uri,
            first_line(err),
        )
    return cfg.model_copy(
        update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": uri})}
    )


def run_training(
    cfg: Config, resume: bool | str = False, init_from: str | None = None
) -> TrainResult:
    """Validate, connect to Ray, train; returns where the checkpoints are."""
    if resume and init_from:
        raise ConfigError("--resume and --init-from exclude each other")
    resume = resolve_resume(resume, cfg.tracking.tracking_uri)
    cfg = pin_tracking_uri(check_dataset(resolve_run(cfg, resume)))
    if resume:
        check_resume_fits(cfg)
    cfg, init_dir = prepare_init(cfg, init_from)

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
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": str(run_dir),
            "init_from": str(init_dir) if init_dir else None,
            "tracking": tracking_settings(cfg, where, init_from),
            "launched_at": time.time(),  # for the startup breakdown rank 0 prints
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=cfg.run.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            # A dead worker (or node) restarts the worker group, which resumes from the
            # latest checkpoint Ray has persisted (`ray.train.get_checkpoint()`).
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            # Ray Train's per-report INFO lines would drown our progress lines in the job log.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
    )
    result = trainer.fit()
    checkpoint = Path(result.checkpoint.path) if result.checkpoint else None
    return TrainResult(
        run_dir=run_dir,
        checkpoint=checkpoint,
        metrics=result.metrics or {},
        mlflow_run_id=_tracked_run_id(cfg, run_dir),
    )


def _tracked_run_id(cfg: Config, run_dir: Path) -> str | None:
    if not cfg.tracking.enabled:
        return None
    from lmforge.tracking import store
    from lmforge.tracking.tracker import find_run_id

    if not store.reachable(cfg.tracking.tracking_uri):
        return None
    try:
        return find_run_id(cfg.tracking.tracking_uri, cfg.tracking.experiment, str(run_dir))
    except Exception as err:  # the run trained; only the lookup failed
        log.warning("could not look up the MLflow run (%s)", err)
        return None
