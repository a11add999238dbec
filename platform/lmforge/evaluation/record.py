"""Where scores go in MLflow: on the version they are about, and on its run.

- version tags `eval.<task>.<metric>` (the value) and `eval.results` (the artifact below);
- the version's run: metrics `eval/<task>/<metric>` at the version's step (a training
  run's checkpoints draw curves on the Runs page), each (key, step) logged once, so a
  restarted run or evaluation never logs it twice; the harness's results JSON as the
  artifact `eval/step-<step>/results.json` (and probes' answers as
  `eval/step-<step>/probes.json`, an MLflow table);
- a failed evaluation: the tag `eval.warning` with its one-line reason;
- the registered model's `best` alias follows `eval.select` (`registry.update_aliases`).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from lmforge.evaluation.harness import Score
from lmforge.tracking import registry, store

log = logging.getLogger(__name__)

WARNING_TAG = "eval.warning"
RESULTS_TAG = "eval.results"


def artifact_dir(step: int) -> str:
    return f"eval/step-{step:08d}"


def log_scores(
    version, scores: list[Score], raw: dict[str, Any], tracking_uri: str | None = None
) -> None:
    """`scores` on the MLflow ModelVersion `version` and its run (see the module doc)."""
    c = store.client(store.resolve_uri(tracking_uri))
    step = int(version.tags.get("step", 0))
    for s in scores:
        c.set_model_version_tag(version.name, version.version, s.tag, f"{s.value:.6g}")
    if version.run_id:
        logged = {}
        for s in scores:
            history = logged.setdefault(s.key, c.get_metric_history(version.run_id, s.key))
            if not any(m.step == step for m in history):
                c.log_metric(version.run_id, s.key, s.value, step=step)
        path = f"{artifact_dir(step)}/results.json"
        c.log_text(version.run_id, json.dumps(raw, indent=1, default=str), path)
        c.set_model_version_tag(version.name, version.version, RESULTS_TAG, path)
    if version.tags.get(WARNING_TAG):
        c.delete_model_version_tag(version.name, version.version, WARNING_TAG)
    registry.update_aliases(c, version.name)


def log_probes(version, table: dict[str, list], tracking_uri: str | None = None) -> None:
    """The probes' answers as an MLflow table artifact of the version's run."""
    c = store.client(store.resolve_uri(tracking_uri))
    step = int(version.tags.get("step", 0))
    path = f"{artifact_dir(step)}/probes.json"
    c.log_table(version.run_id, data=table, artifact_file=path)
    c.set_model_version_tag(version.name, version.version, "eval.probes", path)


def warn(version, reason: str, tracking_uri: str | None = None) -> None:
    """A failed evaluation, on the version: training and the other versions go on."""
    c = store.client(store.resolve_uri(tracking_uri))
    c.set_model_version_tag(version.name, version.version, WARNING_TAG, reason[:5000])


def set_selection(model_name: str, select: str | None, mode: str, tracking_uri=None) -> None:
    """What `best` follows for `model_name`: a version tag (`val_loss`, or an eval score
    `<task>/<metric>` -> `eval.<task>.<metric>`) and its direction."""
    c = store.client(store.resolve_uri(tracking_uri))
    tag = registry.selection_tag(select)
    c.set_registered_model_tag(model_name, registry.SELECT_TAG, f"{tag}:{mode}")
