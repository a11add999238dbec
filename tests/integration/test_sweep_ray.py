"""Sweeps (issue 28) on the session's Ray cluster: Ray Tune over whole lmforge jobs.

The sweep's driver runs as a Ray job (`lmforge sweep --submit`'s job, jobs/sweep.py, sent
through the Jobs API). A grid of 4 learning rates, 2 trials at a time, each a real 1-worker
DeepSpeed job: two sane rates run first, then two that make the tiny model diverge. Once
the sane ones have finished (and Tune's experiment state says so), the driver is killed
(`ray job stop`) while the diverging ones are held at step 3 (LMFORGE_FAULT_HOLD); `resume`
continues the sweep from Tune's state in the run storage: the finished trials are not
rerun (their MLflow curves are not extended), the diverging ones run again and ASHA (grace
5 steps) stops them at its first rung, before max_steps, and their MLflow child runs say so.
(ASHA's rungs are rebuilt from the ended trials when the sweep resumes: Tune saves no
scheduler state.) The best trial is a sane one; its best checkpoint is the one version the sweep registered,
with the alias `sweep-<name>`, and the parent run names it.
"""

from __future__ import annotations

import json
import shutil
import time

from lmforge import sweeps
from lmforge.tracking import store
from tests.conftest import REPO

NAME = "it-lr"
MODEL = "it-sweep"
SANE, DIVERGING = (3e-3, 2e-3), (1.0, 0.9)


def test_a_killed_sweep_resumes_stops_diverging_trials_and_registers_the_best(
    ray_cluster, dataset, plain_main, tmp_path
):
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
    holds = tmp_path / "holds"  # rank 0 of each trial of this driver waits at step 3 in here
    env = {"LMFORGE_FAULT": "step:3:0", "LMFORGE_FAULT_HOLD": f"{holds}/"}
    runtime_env = {**spec.runtime_env, "env_vars": {**spec.runtime_env["env_vars"], **env}}
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    job = client.submit_job(entrypoint=spec.entrypoint, runtime_env=runtime_env,
                            metadata=spec.metadata)  # fmt: skip
    sweep_dir = paths.home() / "runs" / "sweeps" / NAME
    deadline, released = time.monotonic() + 600, set()
    while True:  # release the sane pair at step 3; stop the driver while the diverging pair holds
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        assert not client.get_job_status(job).is_terminal(), client.get_job_logs(job)[-3000:]
        held = list(holds.glob("*"))
        if len(held) == 2 and not released:
            released = {f.name for f in held}
            for f in held:
                f.unlink()
        elif len(held) == 2 and terminated_in_state(sweep_dir) >= 2:
            assert not released & {f.name for f in held}
            break
        time.sleep(0.3)
    sane_curves = {}
    for r in sweeps.trials_of(uri, "it-sweep", NAME):
        if r["values"]["train.lr"] in SANE:
            sane_curves[r["run_id"]] = len(
                store.client(uri).get_metric_history(r["run_id"], "loss")
            )
    assert len(sane_curves) == 2 and all(sane_curves.values()), sane_curves
    client.stop_job(job)
    while not client.get_job_status(job).is_terminal():
        time.sleep(0.5)
    log = client.get_job_logs(job)
    assert "holds at step 3" in log, log[-3000:]
    shutil.rmtree(holds)

    result = sweeps.resume_sweep(
        NAME, overrides=[f"data.path={dataset}", f"run.storage_path={paths.home() / 'runs'}"]
    )
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

    # The finished trials were not rerun: their curves are as they were before the kill.
    for run_id, n in sane_curves.items():
        assert len(c.get_metric_history(run_id, "loss")) == n, run_id
    assert len(result.rows) == 4 and result.best["trial_id"] == best_trial


def terminated_in_state(sweep_dir) -> int:
    """How many trials Tune's newest saved experiment state has TERMINATED (0: none saved):
    its `trial_data` holds each trial's JSON state, `status` among it."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    if not states:
        return 0
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except (ValueError, KeyError):  # being written
        return 0
    return sum(json.loads(state)["status"] == "TERMINATED" for state, _ in trials)
