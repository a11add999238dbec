"""Start a training run on Ray: build the launch plan (every check), then `TorchTrainer.fit()`.

The CLI (`lmforge train`), `jobs/train.py` (for `ray job submit`, `lmforge submit`) and the
dashboard all call `run_training`. `run_training(..., local=True)` runs the same plan on
plain local processes instead (`local_session`, no Ray): `lmforge train --local`, and the
tests of the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import checkpoint as ckpt_io
from lmforge import guard, raycompat, storage
from lmforge.config import Config, ConfigError
from lmforge.data.mixture import datasets_of
from lmforge.paths import is_uri
from lmforge.perf import FAST_BF16_FLAGS, cpu_flags
from lmforge.tracking import store
from lmforge.training import placement
from lmforge.training.plan import LaunchPlan, build_plan, stage_init
from lmforge.training.session import WorkerPlan

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path | None
    metrics: dict[str, Any]
    mlflow_run_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # every report (local runs)


def run_training(
    cfg: Config,
    resume: bool | str = False,
    init_from: str | None = None,
    local: bool = False,
    *,
    tags: dict[str, str] | None = None,
    register: bool = True,
    callbacks: list | None = None,
    on_eval_scores=None,
    outlived: bool = False,
) -> TrainResult:
    """Plan, connect to Ray (`local`: no Ray, local processes), train; returns where the
    checkpoints are.

    For a caller that runs jobs as parts of something bigger (a sweep's trials,
    `lmforge.sweeps`): `tags` go on the MLflow run too, `register=False` registers no
    checkpoint, `callbacks` are Ray Train `UserCallback`s of the run (Ray only),
    `on_eval_scores(step, scores)` gets each checkpoint's evaluation scores (`eval.*`),
    `outlived=True` says this process goes on after the run (`raycompat.torch_trainer_class`)."""
    plan = build_plan(cfg, resume, init_from)
    warn_slow_bf16(plan.config)
    evals = eval_settings(plan)  # task files and probes checked before anything starts
    if local:
        from lmforge.training import local_session

        local_session.check(plan.config)
        stage_init(plan)
        log.info("run %s on local processes; checkpoints under %s", plan.run_dir.name, plan.run_dir)
        validator = None
        if evals is not None:  # what Ray Train's checkpoint validation does on Ray
            from lmforge.evaluation.checkpoints import LocalValidator

            validator = LocalValidator(plan.run_dir, evals, on_scores=on_eval_scores)
        try:
            reports = local_session.run(worker_plan(plan))
        finally:
            if validator is not None:
                validator.close()
        guard.raise_if_stopped(plan.run_dir)  # the run's guard stopped it: say why, non-zero
        return result_of(plan, reports[-1] if reports else {}, reports)
    stage_init(plan)

    from lmforge.cluster import connect

    raycompat.check_version()  # lmforge reaches into Ray internals written for one version
    where = connect()  # before importing ray.train: it sets how Ray finds the cluster
    nodes = alive_node_resources()
    check_cluster(plan.config, nodes)  # before any worker starts
    skip_preemption_watcher(nodes)

    from lmforge.tracking import run_setup

    if plan.tags is not None:
        plan = dataclasses.replace(
            plan, tags={**plan.tags, **run_setup.ray_tags(where), **(tags or {})}
        )
    log.info("run %s on %s; checkpoints under %s", plan.run_dir.name, where, plan.run_dir)
    if plan.config.scaling.elastic:
        log.info(elastic_note(plan.config))
    metrics = (
        trainer(plan, evals, callbacks, register, on_eval_scores, outlived).fit().metrics or {}
    )
    guard.raise_if_stopped(plan.run_dir)
    return result_of(plan, metrics)


def slow_bf16_warning(cfg: Config, flags: set[str]) -> str | None:
    """One line when `precision: bf16` trains on CPUs whose `flags` lack avx512_bf16 and
    AMX (bf16 matmuls then run on fallback kernels, ~0.3x of fp32 here); None otherwise
    (a GPU run, fp32, a CPU with either flag, or flags unknown)."""
    if cfg.train.precision != "bf16" or cfg.scaling.use_gpu or not flags:
        return None
    if any(f in flags for f in FAST_BF16_FLAGS):
        return None
    return (
        "train.precision=bf16 on a CPU without avx512_bf16 or amx_bf16 (this machine's "
        "/proc/cpuinfo flags): bf16 matmuls run on slow fallback kernels, so this run will be "
        "slower than fp32 (about 0.3x measured); use train.precision=fp32 on this CPU"
    )


def warn_slow_bf16(cfg: Config) -> None:
    line = slow_bf16_warning(cfg, cpu_flags())
    if line:
        log.warning(line)


def eval_settings(plan: LaunchPlan):
    """The run's checkpoint evaluation (`eval.*`: `lmforge.evaluation.checkpoints`), every
    task file and the probes checked now; None when the config asks for none."""
    if not plan.config.eval.enabled:
        return None
    from lmforge.evaluation.checkpoints import settings_of
    from lmforge.tracking import run_setup

    tracking = None
    if plan.tags is not None:
        tracking = run_setup.settings(plan.config, plan.dataset, plan.run_dir, plan.tags)
        if tracking is not None:
            tracking = dataclasses.replace(tracking, uri=store.resolve_uri(tracking.uri))
    return settings_of(plan.config, tracking)


def result_of(
    plan: LaunchPlan, metrics: dict[str, Any], history: list[dict[str, Any]] | None = None
) -> TrainResult:
    """What a finished run left: its latest recorded checkpoint, last metrics, MLflow run."""
    from lmforge.tracking import run_setup

    return TrainResult(
        run_dir=plan.run_dir,
        checkpoint=ckpt_io.latest_in_run(plan.run_dir),
        metrics=metrics,
        mlflow_run_id=run_setup.tracked_run_id(plan.config, plan.run_dir),
        history=history or [],
    )


def alive_node_resources() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected cluster."""
    import ray

    return [n.get("Resources") or {} for n in ray.nodes() if n.get("Alive")]


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def skip_preemption_watcher(nodes: list[dict[str, float]]) -> None:
    """No Ray Train PreemptionWatcher on a one-node cluster: RAY_TRAIN_ENABLE_PREEMPTION_WATCHER=0
    in this driver's environment, which Ray Train hands to its controller.

    The watcher is one more actor process per run, started by the controller while the
    workers import torch and DeepSpeed and build their engines, so on a 2-CPU machine it
    takes CPU from them (measured: see the commit). It lets a run react to a node that Ray
    is draining (a spot reclaim); with one node that node runs this driver too, so a drain
    ends the job either way: it costs nothing there. With more nodes it stays on (Ray's
    default); a value the user set is kept either way.
    """
    global _watcher_off_here
    if os.environ.get(PREEMPTION_WATCHER) is None or _watcher_off_here:
        _watcher_off_here = len(nodes) == 1
        if _watcher_off_here:
            os.environ[PREEMPTION_WATCHER] = "0"
        else:
            os.environ.pop(PREEMPTION_WATCHER, None)


_watcher_off_here = False  # this module set PREEMPTION_WATCHER (not the user)


def check_cluster(cfg: Config, nodes: list[dict[str, float]]) -> None:
    """Refuse a run that cannot work on these alive nodes (their resources), before it starts.

    Ray Train checkpoints to `storage_path` from every worker's node and reads it back on
    restore, so with more than one node it must be storage every node sees: a URI (s3://),
    or a local path declared shared (`run.shared_filesystem`, an NFS-style mount).
    """
    run = cfg.run
    if len(nodes) > 1 and not run.shared_filesystem and not is_uri(run.storage_path):
        raise ConfigError(
            f"run.storage_path={run.storage_path!r} is a local directory, but the Ray cluster "
            f"has {len(nodes)} nodes and multi-node checkpoints need storage every node sees: "
            "set run.storage_path to shared storage (s3://bucket/prefix), or, for a path "
            "mounted on every node (NFS), run.shared_filesystem=true"
        )
    # Workers that cannot all be placed: refused, or (an autoscaler) waited for, in one line.
    placement.check_placement(cfg, nodes, autoscaling=placement.autoscaler_configured)


def elastic_note(cfg: Config) -> str:
    """What an elastic run does to the batch, for the job log."""
    s, t = cfg.scaling, cfg.train
    per = t.micro_batch_size * t.grad_accum_steps
    return (
        f"elastic: {s.min_workers} to {s.max_workers} workers, as many as the cluster fits "
        f"(checked every {s.elastic_resize_interval_s:g} s); a step is {per} sequences a "
        f"worker, {per * s.min_workers} to {per * s.max_workers} in all: the global batch "
        "follows the worker count, and each resize resumes from the latest checkpoint"
    )


def worker_plan(plan: LaunchPlan, register: bool = True) -> WorkerPlan:
    """What every worker receives: typed, nothing read from globals."""
    from lmforge.tracking import run_setup

    tracking = (
        run_setup.settings(plan.config, plan.dataset, plan.run_dir, plan.tags)
        if plan.tags is not None
        else None
    )
    if tracking is not None and not register:
        tracking = dataclasses.replace(tracking, register_checkpoints=False)
    return WorkerPlan(
        config=plan.config,
        run_dir=str(plan.run_dir),
        init_from=str(plan.init_dir) if plan.init_dir else None,
        tracking=tracking,
        launched_at=time.time(),  # for the startup breakdown rank 0 prints
    )


def scaling_config(cfg: Config):
    """Ray Train's ScalingConfig of our scaling section; [min, max] workers: elastic."""
    import ray.train

    s = cfg.scaling
    return ray.train.ScalingConfig(
        num_workers=s.num_workers,  # (min, max): elastic, resized every interval
        elastic_resize_monitor_interval_s=s.elastic_resize_interval_s,
        use_gpu=s.use_gpu,
        resources_per_worker={"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})},
        placement_strategy=s.placement_strategy,
    )


def train_loop(config: dict[str, WorkerPlan]) -> None:
    """Each Ray Train worker's entry point: `ray_session.train_loop`, imported there.

    Ray pickles this function by reference, so the driver never imports the loop module
    (DeepSpeed and its accelerator detection: ~1.5 s of the driver's start on 2 loaded CPUs);
    the workers import it on the first call. `config` is {"plan": WorkerPlan}: Ray Train
    hands a worker function its one argument as a dict.
    """
    from lmforge.training.ray_session import train_loop as run

    run(config["plan"])


def trainer(
    plan: LaunchPlan,
    evals=None,
    callbacks: list | None = None,
    register: bool = True,
    on_eval_scores=None,
    outlived: bool = False,
):
    """The Ray Train `TorchTrainer` of a plan (Ray must be connected); `evals`: the
    checkpoint evaluation, as Ray Train's checkpoint validation (a Ray task per checkpoint,
    beside the workers: `lmforge.evaluation.checkpoints`); `callbacks`: Ray Train
    `UserCallback`s (a sweep's report to Tune); `register=False`: no version per checkpoint;
    `outlived`: the driver goes on after the run (`raycompat.torch_trainer_class`)."""
    import ray.train
    from ray.train.torch import TorchConfig

    TorchTrainer = raycompat.torch_trainer_class(outlived)  # noqa: N806  (lean: no extra actors)

    cfg, s = plan.config, plan.config.scaling
    storage_path, storage_filesystem = storage.ray_storage(plan.run_dir.parent)
    remote = storage.is_remote(plan.run_dir) or any(
        storage.is_remote(ds.path) for _, ds in datasets_of(plan.dataset)
    )
    # Rank 0 reaches an MLflow server with basic auth by the driver's MLFLOW_TRACKING_*
    # credentials, handed over like the AWS_* ones: through the runtime env, never the config.
    env_vars = {**(storage.runtime_env_vars() if remote else {}), **store.credential_env()}
    # The driver's LMFORGE_FAULT* (fault injection, faults.py) reach the workers too.
    env_vars |= {k: v for k, v in os.environ.items() if k.startswith("LMFORGE_FAULT")}
    return TorchTrainer(
        train_loop,
        train_loop_config={"plan": worker_plan(plan, register)},
        scaling_config=scaling_config(cfg),
        run_config=ray.train.RunConfig(
            name=plan.run_dir.name,
            # An S3 run dir: Ray Train writes through its pyarrow S3FileSystem.
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            # s3:// data or storage: the workers reach the store with the driver's AWS_*
            # variables (credentials too: through the runtime env, never the config).
            worker_runtime_env={"env_vars": env_vars} if env_vars else None,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            # A dead worker (or node) restarts the worker group, which resumes from the
            # latest checkpoint Ray has persisted (`ray.train.get_checkpoint()`).
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            # Ray Train's per-report INFO lines would drown our progress lines in the job log.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks or []),
        ),
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        validation_config=_validation_config(cfg, evals, on_eval_scores),
    )


def _validation_config(cfg: Config, evals, on_scores=None):
    if evals is None:
        return None
    from lmforge.evaluation.checkpoints import validation_config

    return validation_config(evals, cfg.eval.cpus, cfg.eval.max_retries, on_scores)
