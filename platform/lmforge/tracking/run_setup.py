"""What the launcher settles about tracking before any worker starts.

The driver resolves the MLflow URI once (every worker then uses that one store), creates
the experiment there once, and gathers the tags of the run: where it came from (git commit,
dataset, init source) and where it ran (Ray address, job and submission id). Rank 0's
`Tracker` receives all of it as one `TrackingSettings`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import lmforge
from lmforge.config import Config
from lmforge.data.dataset import MANIFEST, Dataset
from lmforge.data.mixture import Mixture, datasets_of
from lmforge.errors import first_line
from lmforge.tracking import store
from lmforge.tracking.tracker import RUN_DIR_TAG, TrackingSettings, find_run_id, flatten

log = logging.getLogger(__name__)


def pin_uri(cfg: Config) -> Config:
    """`cfg` with its tracking URI resolved, and the experiment created in that store.

    MLflow trouble never stops training: it is said once here, and rank 0 keeps retrying.
    """
    if not cfg.tracking.enabled:
        return cfg
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


def source_tags(dataset: Dataset | Mixture, run_dir: Path, init_from: str | None) -> dict[str, str]:
    """Tags known before Ray starts: the run dir, lmforge's version, the dataset, the commit."""
    tags = {
        RUN_DIR_TAG: str(run_dir),
        "lmforge.version": lmforge.__version__,
        "dataset.path": str(dataset.path),
        "dataset.manifest_sha256": dataset.manifest_sha256,
    }
    if commit := git_commit():
        tags["mlflow.source.git.commit"] = commit
    if init_from:
        tags["lmforge.init_from"] = init_from
    return tags


def git_commit() -> str | None:
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


def ray_tags(where: str) -> dict[str, str]:
    """Where the run ran: the Ray address, the job id and (for submitted jobs) the
    submission id, which the dashboard's Jobs page finds the run by."""
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


def settings(
    cfg: Config, dataset: Dataset | Mixture, run_dir: Path, tags: dict[str, str]
) -> TrackingSettings | None:
    """What rank 0 needs to log the run, for the workers (None: tracking off)."""
    if not cfg.tracking.enabled:
        return None
    return TrackingSettings(
        uri=cfg.tracking.tracking_uri,
        experiment=cfg.tracking.experiment,
        registered_model=cfg.registered_model,
        run_name=cfg.run.name,
        run_dir=str(run_dir),
        tags=tags,
        params=flatten(cfg.to_dict()),
        artifacts={"config.yaml": cfg.to_yaml(), **dataset_artifacts(dataset)},
        outage_wait_s=cfg.tracking.outage_wait_s,
    )


def dataset_artifacts(dataset: Dataset | Mixture) -> dict[str, str]:
    """The manifest of the dataset, or the mixture (its sources, weights, schedule) and each
    source's manifest."""
    if not isinstance(dataset, Mixture):
        return {"dataset/manifest.json": (dataset.path / MANIFEST).read_text()}
    out = {"dataset/mixture.json": dataset.describe()}
    for name, ds in datasets_of(dataset):
        out[f"dataset/{name}/manifest.json"] = (ds.path / MANIFEST).read_text()
    return out


def tracked_run_id(cfg: Config, run_dir: Path) -> str | None:
    """The MLflow run a finished training run logged to, if it can be looked up."""
    if not cfg.tracking.enabled:
        return None
    if not store.reachable(cfg.tracking.tracking_uri):
        return None
    try:
        return find_run_id(cfg.tracking.tracking_uri, cfg.tracking.experiment, str(run_dir))
    except Exception as err:  # the run trained; only the lookup failed
        log.warning("could not look up the MLflow run (%s)", first_line(err))
        return None
