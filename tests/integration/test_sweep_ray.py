"""Sweeps (issue 28) on the session's Ray cluster: Ray Tune over whole lmforge jobs.

The sweep's driver runs as a Ray job (`lmforge sweep --submit`'s job, jobs/sweep.py, sent
through the Jobs API). A grid of 4 learning rates, 2 trials at a time, each a real 1-worker
DeepSpeed job: two sane rates run first, then two that make the tiny model diverge; ASHA
(grace 5 steps) stops those at its first rung, before max_steps, and their MLflow child
runs say so. The best trial is a sane one; its best checkpoint is the one version the sweep
registered, with the alias `sweep-<name>`, and the parent run names it. `--resume` of the
finished sweep (Tune's state in the run storage) reruns none of its trials and registers
nothing more. (Killing the driver mid-trial and resuming: checked by hand, see the commit;
a second sweep would double this test's time.)
"""

from __future__ import annotations

import json
import time

from lmforge import sweeps
from lmforge.tracking import store
from tests.conftest import REPO

NAME = "it-lr"
MODEL = "it-sweep"
SANE, DIVERGING = (3e-3, 2e-3), (1.0, 0.9)


def test_sweep_stops_diverging_trials_and_registers_the_best(ray_cluster, dataset, plain_main):
    from ray.job_submission import JobSubmissionClient

    from lmforge import paths
    from lmforge.sweeps.submit import sweep_job

    uri = store.resolve_uri()
    space = {"train.lr": {"grid": [*SANE, *DIVERGING]}}
    plan = sweeps.plan_sweep(
        NAME, REPO / "jobs" / "configs" / "tiny.yaml", space,
        [
            f"data.path={dataset}", "scaling.num_workers=1", "train.max_steps=10",
            "train.warmup_steps=2", "train.min_lr=1e-5", "train.eval_every=5",
            "train.eval_steps=2", "train.checkpoint_every=10", "train.log_every=5",
            "model.n_layer=1", "tracking.experiment=it-sweep",
            f"tracking.registered_model={MODEL}", f"run.storage_path={paths.home() / 'runs'}",
        ],
        sweeps.SweepOptions(trials=1, max_concurrent=2, grace_period=5, reduction_factor=2),
    )  # fmt: skip
    spec = sweep_job(NAME, plan.base_config, plan.space, plan.options, tracking_uri=uri,
                     any_path=True)  # fmt: skip
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    job = client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                            metadata=spec.metadata)  # fmt: skip
    while not (status := client.get_job_status(job)).is_terminal():
        time.sleep(1)
    log = client.get_job_logs(job)
    assert str(status) == "SUCCEEDED", log[-4000:]
    assert f"sweep {NAME}: trial" in log and "stopped by asha at step 5" in log, log[-3000:]

    rows = sweeps.trials_of(uri, "it-sweep", NAME)
    by_lr = {r["values"]["train.lr"]: r for r in rows}
    assert sorted(by_lr) == sorted([*SANE, *DIVERGING])
    for lr in DIVERGING:
        assert by_lr[lr]["stopped_early"] and int(by_lr[lr]["last_step"]) < 10, by_lr[lr]
    c = store.client(uri)
    parent_id = c.get_run(by_lr[SANE[0]]["run_id"]).data.tags["mlflow.parentRunId"]
    parent = c.get_run(parent_id)
    best_values = json.loads(parent.data.tags["lmforge.sweep.best_values"])
    assert best_values["train.lr"] in SANE
    best_trial = parent.data.tags["lmforge.sweep.best_trial"]
    for lr in DIVERGING:
        run = c.get_run(by_lr[lr]["run_id"])
        assert run.data.tags["lmforge.sweep.stopped_early"] == "true"
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.data.params["train.lr"] == str(lr)
    # Only the best was registered, once, with the sweep's alias.
    versions = c.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == 1, [v.tags for v in versions]
    best = c.get_model_version_by_alias(MODEL, f"sweep-{NAME}")
    assert best.version == versions[0].version
    assert best.tags["run_id"] == by_lr[best_values["train.lr"]]["run_id"]

    # Resuming a finished sweep reruns nothing: the same trials, no new runs or versions.
    again = sweeps.resume_sweep(
        NAME, overrides=[f"data.path={dataset}", f"run.storage_path={paths.home() / 'runs'}"]
    )
    assert sorted(r["trial"] for r in again.rows) == sorted(r["trial"] for r in rows)
    assert len(sweeps.trials_of(store.resolve_uri(), "it-sweep", NAME)) == 4
    assert len(c.search_model_versions(f"name='{MODEL}'")) == 1
    assert again.best["trial_id"] == best_trial
