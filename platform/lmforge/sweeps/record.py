"""A sweep in MLflow: one parent run, one child run per trial, the best registered once.

The parent run (tags `lmforge.sweep=<name>`, `lmforge.sweep.role=parent`) holds the space,
the scheduler and searcher, and at the end the best trial, its values and its metric. Each
trial's own training run is its child (MLflow's `mlflow.parentRunId` tag, set by the trial,
`trial.py`): its sampled values are params as every config value is, and the sweep's driver
adds what only Tune knows: its state, its last step, stopped early or not.

Trials register no checkpoints (`--register-all`: every trial does, as `lmforge train`); at
the end the best trial's best checkpoint (by the sweep's metric among its recorded
checkpoints) is registered once, with the alias `sweep-<name>`.

The dashboard's Sweeps page reads sweeps back through `list_sweeps` and `trials_of`.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lmforge import checkpoint as ckpt_io
from lmforge import storage
from lmforge.errors import first_line
from lmforge.sweeps.tags import (
    ALIAS_PREFIX,
    DIR_TAG,
    LAST_STEP_TAG,
    ROLE_TAG,
    STATE_TAG,
    STOPPED_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    VALUES_TAG,
)
from lmforge.tracking import registry, store

log = logging.getLogger(__name__)


def parent_run(uri: str, experiment: str, name: str, about: dict[str, Any]) -> str:
    """The sweep's parent run: found (a resumed sweep) or created, with its params."""
    c = store.client(uri)
    exp_id = store.ensure_experiment(c, experiment, uri)
    found = find_parent(c, exp_id, name)
    if found is not None:
        c.set_terminated(found.info.run_id, "RUNNING")
        return found.info.run_id
    tags = {SWEEP_TAG: name, ROLE_TAG: "parent"}
    if about.get("dir"):
        tags[DIR_TAG] = str(about["dir"])
    run = c.create_run(exp_id, run_name=f"sweep-{name}", tags=tags)
    rid = run.info.run_id
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in about["params"].items()]
    for i in range(0, len(params), 100):
        c.log_batch(rid, params=params[i : i + 100])
    c.log_text(rid, yaml.safe_dump(about["space"], sort_keys=False), "space.yaml")
    c.log_text(rid, yaml.safe_dump(about["base"], sort_keys=False), "base_config.yaml")
    return rid


def reopen(uri: str, run_id: str) -> None:
    """A resumed sweep's parent run is running again."""
    try:
        store.client(uri).set_terminated(run_id, "RUNNING")
    except Exception as err:  # tracking trouble never stops the sweep
        log.warning("sweep: could not reopen its MLflow run (%s)", first_line(err))


def find_parent(client, experiment_id: str, name: str):
    quoted = name.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{quoted}' and tags.`{ROLE_TAG}` = 'parent'",
        max_results=1,
    )
    return runs[0] if runs else None


def child_run(client, experiment_id: str, name: str, trial_id: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{name}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0] if runs else None


def mark_trial(
    uri: str, experiment: str, name: str, trial_id: str, state: str, last_step: int | None,
    stopped_early: bool,
) -> None:  # fmt: skip
    """Tag a trial's child run with how it ended; a trial the scheduler stopped (its job
    killed mid-run) is ended as KILLED, a failed one as FAILED. Never raises."""
    try:
        c = store.client(uri)
        exp = c.get_experiment_by_name(experiment)
        run = child_run(c, exp.experiment_id, name, trial_id) if exp else None
        if run is None:
            log.warning("sweep %s: trial %s has no MLflow run to tag", name, trial_id)
            return
        rid = run.info.run_id
        c.set_tag(rid, STATE_TAG, state)
        c.set_tag(rid, STOPPED_TAG, "true" if stopped_early else "false")
        if last_step is not None:
            c.set_tag(rid, LAST_STEP_TAG, str(last_step))
        if stopped_early and run.info.status == "RUNNING":
            c.set_terminated(rid, "KILLED")
        elif state == "ERROR" and run.info.status == "RUNNING":
            c.set_terminated(rid, "FAILED")
    except Exception as err:  # tracking trouble never stops the sweep
        log.warning(
            "sweep %s: could not tag trial %s in MLflow (%s)", name, trial_id, first_line(err)
        )


def finish_parent(uri: str, run_id: str, best: dict[str, Any] | None, status: str) -> None:
    """The parent run's result: the best trial, its values, metric and version."""
    try:
        c = store.client(uri)
        if best is not None:
            c.set_tag(run_id, "lmforge.sweep.best_trial", best["trial_id"])
            c.set_tag(
                run_id, "lmforge.sweep.best_values", json.dumps(best["values"], sort_keys=True)
            )
            c.set_tag(run_id, "lmforge.sweep.best_run_dir", best["run_dir"])
            if best.get("version"):
                c.set_tag(run_id, "lmforge.sweep.best_version", best["version"])
            if math.isfinite(best["value"]):
                c.log_metric(run_id, f"best_{best['metric'].replace('/', '_')}", best["value"])
            c.log_text(run_id, yaml.safe_dump(best["config"], sort_keys=False), "best_config.yaml")
        c.set_terminated(run_id, status)
    except Exception as err:
        log.warning("sweep: could not record the result in MLflow (%s)", first_line(err))


def best_checkpoint(
    run_dir: Path | storage.S3Path, metric: str, mode: str
) -> tuple[Path | storage.S3Path, float] | None:
    """The run's recorded checkpoint with the best `metric` (its trainer_state's metrics)."""
    sign = 1.0 if mode == "min" else -1.0
    best: tuple[Path | storage.S3Path, float] | None = None
    for d in sorted(run_dir.glob("checkpoint_*"), key=str):
        if ckpt_io.incomplete(d):
            continue
        try:
            value = float(ckpt_io.read_state(d).metrics.get(metric, "nan"))
        except ckpt_io.CheckpointError:
            continue
        if not math.isfinite(value):
            continue
        if best is None or sign * value < sign * best[1]:
            best = (d, value)
    return best


def register_best(
    uri: str, experiment: str, model_name: str, sweep: str, run_dir: Path | storage.S3Path,
    metric: str, mode: str,
) -> tuple[str, Path | storage.S3Path] | None:  # fmt: skip
    """Register the best checkpoint of the best trial's run once and point the alias
    `sweep-<name>` at it; (version, checkpoint), or None when it has no sound checkpoint."""
    if metric.startswith("eval."):  # every evaluated checkpoint is a version already
        return alias_best_version(uri, experiment, model_name, sweep, run_dir, metric, mode)
    found = best_checkpoint(run_dir, metric, mode)
    if found is None:
        log.warning("sweep %s: %s has no checkpoint with a finite %s", sweep, run_dir, metric)
        return None
    ckpt, _ = found
    c = store.client(uri)
    from lmforge.tracking.tracker import find_run_id

    run_id = find_run_id(uri, experiment, str(run_dir))
    if run_id is None:
        log.warning(
            "sweep %s: no MLflow run for %s; its best checkpoint stays unregistered", sweep, run_dir
        )
        return None
    state = ckpt_io.read_state(ckpt)
    tags = registry.version_tags(state, run_id, ckpt)
    tags[SWEEP_TAG] = sweep
    local = ckpt_io.fetch_servable(ckpt) if storage.is_remote(ckpt) else ckpt  # s3://: a copy
    with tempfile.TemporaryDirectory(prefix="lmforge-sweep-") as tmp:
        staged = registry.stage_servable(local, Path(tmp))
        with registry.fluent_uri(uri):
            version = registry.register_checkpoint(
                c, run_id, staged, model_name, tags,
                f"Best of sweep {sweep}: " + registry.describe_version(state, ckpt),
            )  # fmt: skip
    c.set_registered_model_alias(model_name, ALIAS_PREFIX + sweep, version.version)
    return version.version, ckpt


def alias_best_version(
    uri: str, experiment: str, model_name: str, sweep: str, run_dir: Path | storage.S3Path,
    metric: str, mode: str,
) -> tuple[str, Path | storage.S3Path] | None:  # fmt: skip
    """For a sweep on an evaluation score: the best trial's run registered a version per
    checkpoint, each tagged with its scores (`eval.<task>.<metric>`); the alias
    `sweep-<name>` goes to the one with the best `metric`."""
    from lmforge.tracking.tracker import find_run_id

    run_id = find_run_id(uri, experiment, str(run_dir))
    if run_id is None:
        log.warning("sweep %s: no MLflow run for %s; no version gets the alias", sweep, run_dir)
        return None
    c = store.client(uri)
    sign = 1.0 if mode == "min" else -1.0
    best = None
    for v in c.search_model_versions(f"name='{model_name}' and run_id='{run_id}'"):
        value = float(v.tags.get(metric, "nan"))
        if math.isfinite(value) and (best is None or sign * value < sign * best[1]):
            best = (v, value)
    if best is None:
        log.warning("sweep %s: no version of %s has a score %s", sweep, run_dir, metric)
        return None
    version = best[0]
    c.set_model_version_tag(model_name, version.version, SWEEP_TAG, sweep)
    c.set_registered_model_alias(model_name, ALIAS_PREFIX + sweep, version.version)
    return version.version, storage.resolve(version.tags.get("ray_checkpoint_uri") or run_dir)


def run_metric(metric: str) -> str:
    """The training run's MLflow metric of a sweep's metric (a score `eval.<task>.<metric>`
    is the run metric `eval/<task>/<metric>`)."""
    if metric.startswith("eval."):
        return "eval/" + metric[len("eval.") :].replace(".", "/", 1)
    return metric


# -- reading sweeps back (the dashboard) -------------------------------------------------
def list_sweeps(uri: str, experiment: str | None = None) -> list[dict[str, Any]]:
    """Every sweep's parent run: name, status, start, best trial and value, run id."""
    c = store.client(uri)
    exps = [c.get_experiment_by_name(experiment)] if experiment else c.search_experiments()
    out = []
    for exp in filter(None, exps):
        for run in c.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'parent'", max_results=500
        ):
            t, p = run.data.tags, run.data.params
            out.append({
                "name": t.get(SWEEP_TAG), "experiment": exp.name, "status": run.info.status,
                "started": run.info.start_time, "run_id": run.info.run_id,
                "metric": p.get("metric"), "mode": p.get("mode"),
                "scheduler": p.get("scheduler"), "search": p.get("search"),
                "model": p.get("registered_model"),
                "best_trial": t.get("lmforge.sweep.best_trial"),
                "best_version": t.get("lmforge.sweep.best_version"),
                "best_value": next(iter(run.data.metrics.values()), None),
                "storage": t.get(DIR_TAG),
            })  # fmt: skip
    return sorted(out, key=lambda s: s["started"] or 0, reverse=True)


def trials_of(
    uri: str, experiment: str, name: str, metric: str = "val_loss"
) -> list[dict[str, Any]]:
    """Each trial's child run: its values, state, steps reached, last and best metric."""
    c = store.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    out = []
    for run in c.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{name}'",
        max_results=1000,
    ):
        t = run.data.tags
        if TRIAL_TAG not in t:
            continue
        out.append({
            "trial": t[TRIAL_TAG], "run_id": run.info.run_id, "status": run.info.status,
            "state": t.get(STATE_TAG, run.info.status), "values": json.loads(t.get(VALUES_TAG, "{}")),
            "stopped_early": t.get(STOPPED_TAG) == "true", "last_step": t.get(LAST_STEP_TAG),
            "metric": run.data.metrics.get(run_metric(metric)), "run_dir": t.get("lmforge.run_dir"),
        })  # fmt: skip
    return sorted(out, key=lambda r: r["trial"])


def curves_of(
    uri: str, run_ids: list[str], metric: str = "val_loss"
) -> dict[str, list[tuple[int, float]]]:
    """Each run's history of `metric`: [(step, value)]."""
    c = store.client(uri)
    return {
        rid: sorted((m.step, m.value) for m in c.get_metric_history(rid, run_metric(metric)))
        for rid in run_ids
    }
