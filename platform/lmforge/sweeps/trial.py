"""One trial of a sweep: a whole lmforge training job, run from inside a Tune trial.

Ray Train V2's way of running trainers under Tune (Ray 2.60, "Hyperparameter Tuning with
Ray Tune"): the trial is a Tune *function* trainable that only drives (a small actor: Tune
reserves `DRIVER_CPUS` for it); inside it `run_training` builds the job's plan and calls
`TorchTrainer.fit()`, which starts the job's own Ray Train controller and worker group of
`scaling.num_workers` DeepSpeed workers. A Ray Train `UserCallback` on that run
(`TuneReport`, after Ray's `TuneReportCallback`) hands each report that carries the sweep's
metric to Tune, where ASHA and the searcher see it.

The trial's run is `<sweep>-<trial id>` in the base config's run storage; a trial Tune
restarts (the sweep resumed after its driver died, or a failed trial retried) finds its run
dir's checkpoints and resumes the job from the latest, like `lmforge train --resume`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

from lmforge.sweeps.tags import PARENT_TAG, SWEEP_TAG, TRIAL_TAG, VALUES_TAG

DRIVER_CPUS = 0.01  # what Tune reserves for a trial's driver (its workers reserve their own)
DIVERGED = 1e9  # a non-finite metric, as Tune sees it (NaN would never be stopped by ASHA)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs, handed to Tune once (`tune.with_parameters`)."""

    sweep: str
    base: dict[str, Any]  # the base config mapping (--set applied, tracking URI pinned)
    metric: str
    mode: str
    register_all: bool = False
    parent_run_id: str | None = None
    init_from: str | None = None  # `--init-from` of every trial (not of a resumed one)
    extra_tags: dict[str, str] = field(default_factory=dict)


def run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def trial_values(config: dict[str, Any]) -> dict[str, Any]:
    """The trial's config values by dotted key (a grid point's keys spread out)."""
    from lmforge.sweeps.space import GRID_KEY

    values = {k: v for k, v in config.items() if k != GRID_KEY}
    values.update(config.get(GRID_KEY) or {})
    return values


class TuneReport(TuneReportCallback):
    """Ray Train callback: each report with the sweep's metric goes to Tune (its numbers, the
    checkpoint's path); reports without it (the progress reports between evaluations) do not,
    so Tune's strict metric check and ASHA see only evaluation steps."""

    def __init__(self, metric: str, mode: str) -> None:
        super().__init__()
        self.metric, self.mode = metric, mode

    def after_report(self, run_context, metrics, checkpoint) -> None:
        out = to_tune(metrics[0], self.metric, self.mode)
        if out is None:
            return
        if checkpoint:
            out[CHECKPOINT_PATH_KEY] = checkpoint.path
        self._training_actor_item_queue.put(out)


class EvalToTune:
    """`run_training`'s `on_eval_scores` for a sweep on an evaluation score
    (`eval.<task>.<metric>`): each checkpoint's scores, as evaluation names them on the
    version (`eval.<task>.<metric>`), with the checkpoint's step, into the trial's Tune
    queue, where ASHA and the searcher see them. It travels to Ray Train's validation task
    (a Ray task of its own), so it holds only the queue (an actor handle) and names."""

    def __init__(self, queue, metric: str, mode: str) -> None:
        self.queue, self.metric, self.mode = queue, metric, mode

    def __call__(self, step: int, scores: dict[str, float]) -> None:
        named = {"eval." + k[len("eval/") :].replace("/", ".", 1): v for k, v in scores.items()}
        out = to_tune({**named, "step": step}, self.metric, self.mode)
        if out is not None:
            self.queue.put(out)


def to_tune(metrics: dict[str, Any], metric: str, mode: str) -> dict[str, Any] | None:
    """The numbers of one report as Tune gets them (None: it has no `metric`); a non-finite
    metric (a diverged run) becomes the worst finite value, which ASHA can rank."""
    if metric not in metrics:
        return None
    out = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    value = float(out[metric])
    if not math.isfinite(value):
        out[metric] = DIVERGED if mode == "min" else -DIVERGED
        out["diverged"] = 1
    return out


def trial_main(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune's function trainable: the trial's lmforge job, resumed if its run dir has
    checkpoints."""
    import ray.tune

    from lmforge import checkpoint as ckpt_io
    from lmforge.sweeps.space import trial_config
    from lmforge.training.launch import run_training
    from lmforge.training.plan import storage_dir

    trial_id = ray.tune.get_context().get_trial_id()
    values = trial_values(config)
    cfg = trial_config(setup.base, values)
    cfg = cfg.model_copy(
        update={"run": cfg.run.model_copy(update={"name": run_name(setup.sweep, trial_id)})}
    )
    resume = ckpt_io.has_checkpoints(storage_dir(cfg) / cfg.run.name)
    tags = {
        SWEEP_TAG: setup.sweep,
        TRIAL_TAG: trial_id,
        VALUES_TAG: json.dumps(values, sort_keys=True),
        **setup.extra_tags,
    }
    if setup.parent_run_id:
        tags[PARENT_TAG] = setup.parent_run_id
    # Checkpoint evaluation (eval.*) records its scores on the checkpoint's version, so a
    # run that evaluates keeps registering its checkpoints.
    register = setup.register_all or cfg.eval.enabled
    report = TuneReport(setup.metric, setup.mode)
    on_scores = None
    if setup.metric.startswith("eval."):  # the scores come from the checkpoints' evaluation
        on_scores = EvalToTune(report._training_actor_item_queue, setup.metric, setup.mode)
    run_training(
        cfg,
        resume=resume,
        init_from=None if resume else setup.init_from,
        tags=tags,
        register=register,
        callbacks=[report],
        on_eval_scores=on_scores,
        outlived=True,  # the trial runner lives on when ASHA stops the trial
    )
