"""The dashboard's Sweeps page in Streamlit's AppTest (a SQLite MLflow, no Ray): a sweep's
parent run and child runs as `lmforge sweep` writes them (`lmforge.sweeps.record`) are
listed: the sweep, each trial's values, metric, state and steps, the parallel-coordinates
plot and every trial's curve; "Resume" submits `jobs/sweep.py --resume NAME` in the run
storage the sweep's state is in (as its parent run records it)."""

from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from lmforge.sweeps import record, tags
from lmforge.tracking import store
from tests.conftest import REPO
from tests.unit.test_dashboard_launch import by_label

pytestmark = pytest.mark.unit
APP = str(REPO / "dashboard" / "app.py")


def seed(uri: str) -> None:
    params = {"metric": "val_loss", "mode": "min", "scheduler": "asha", "search": "random"}
    space = {"train.lr": {"loguniform": [1e-4, 1.0]}}
    about = {"params": params, "space": space, "base": {}, "dir": "/data/runs/sweeps/lr"}
    parent = record.parent_run(uri, "exp", "lr", about)
    c = store.client(uri)
    exp = c.get_experiment_by_name("exp").experiment_id
    for trial, lr, losses, stopped in (
        ("t_00000", 3e-3, [6.2, 5.6, 5.3], False),
        ("t_00001", 0.9, [6.2, 9.8], True),
    ):
        run = c.create_run(exp, run_name=f"lr-{trial}", tags={
            tags.SWEEP_TAG: "lr", tags.TRIAL_TAG: trial, tags.PARENT_TAG: parent,
            tags.VALUES_TAG: json.dumps({"train.lr": lr}), "lmforge.run_dir": f"/runs/lr-{trial}",
        })  # fmt: skip
        for i, v in enumerate(losses):
            c.log_metric(run.info.run_id, "val_loss", v, step=5 * i)
        c.set_terminated(run.info.run_id, "KILLED" if stopped else "FINISHED")
        record.mark_trial(uri, "exp", "lr", trial, "STOPPED" if stopped else "TERMINATED",
                          5 * (len(losses) - 1), stopped)  # fmt: skip
    best = {"trial_id": "t_00000", "values": {"train.lr": 3e-3}, "value": 5.3,
            "metric": "val_loss", "run_dir": "/runs/lr-t_00000", "config": {}}  # fmt: skip
    record.finish_parent(uri, parent, best, "FINISHED")


def test_a_sweep_its_trials_and_their_plots(tracking_uri, monkeypatch):
    from lmforge.jobclient import JobClient

    seed(tracking_uri)
    trials = record.trials_of(tracking_uri, "exp", "lr")
    assert [(t["trial"], t["stopped_early"], t["last_step"]) for t in trials] == [
        ("t_00000", False, "10"),
        ("t_00001", True, "5"),
    ]
    submitted = []
    monkeypatch.setattr(JobClient, "__init__", lambda self, address=None: None)
    monkeypatch.setattr(JobClient, "submit", lambda self, spec: submitted.append(spec) or "j1")
    monkeypatch.syspath_prepend(str(REPO / "dashboard"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("RAY_JOBS_ADDRESS", "http://127.0.0.1:9")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("pages/sweeps.py")
    at.run()
    assert not at.exception, at.exception
    sweeps_table, trials_table = (d.value for d in at.dataframe)
    assert list(sweeps_table["sweep"]) == ["lr"] and list(sweeps_table["best trial"]) == ["t_00000"]
    assert list(trials_table["train.lr"]) == [3e-3, 0.9]
    assert list(trials_table["stopped early"]) == [False, True]
    assert list(trials_table["val_loss"]) == [5.3, 9.8]
    figures = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert any(t["type"] == "parcoords" for f in figures for t in f["data"])
    curves = [t for f in figures for t in f["data"] if t["type"] == "scatter"]
    assert sorted(t["name"] for t in curves) == ["t_00000", "t_00001"]
    by_label(at.button, "Resume the sweep (a Ray job)").click()
    at.run()
    assert not at.exception, at.exception
    assert submitted and submitted[0].entrypoint.endswith(
        "jobs/sweep.py --resume lr --set run.storage_path=/data/runs"
    )


def test_the_launch_page_submits_a_sweep_of_its_form_and_refuses_a_bad_space(monkeypatch, tmp_path):
    import shlex

    from lmforge.jobclient import JobClient
    from lmforge.sweeps.submit import SPACE_ENV
    from tests.unit.test_dashboard_launch import fake_dataset

    submitted = []
    monkeypatch.setattr(JobClient, "__init__", lambda self, address=None: None)
    monkeypatch.setattr(JobClient, "submit", lambda self, spec: submitted.append(spec) or "j2")
    monkeypatch.syspath_prepend(str(REPO / "dashboard"))
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("RAY_JOBS_ADDRESS", "http://127.0.0.1:9")
    fake_dataset(tmp_path)
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    by_label(at.text_input, "Sweep name").set_value("lr1")
    area = at.text_area[0]
    area.set_value("train.lr: {loguniform: [1.0e-3, 3.0]}\n")  # 3 > the schema's 1
    at.run()
    by_label(at.button, "Submit sweep").click()
    at.run()
    assert not at.exception, at.exception
    assert any("train.lr: loguniform[0.001, 3.0] gives 3.0" in e.value for e in at.error)
    assert not submitted
    at.text_area[0].set_value("train.weight_decay: {uniform: [0.0, 0.2]}\n")
    at.run()
    by_label(at.button, "Submit sweep").click()
    at.run()
    assert not at.exception, at.exception
    (spec,) = submitted
    args = shlex.split(spec.entrypoint.removeprefix("exec "))
    assert args[:2] == ["python", "jobs/sweep.py"] and "--name" in args and "lr1" in args
    assert not any(a.startswith("run.name=") for a in args)
    assert json.loads(spec.runtime_env["env_vars"][SPACE_ENV]) == {
        "train.weight_decay": {"uniform": [0.0, 0.2]}
    }


def test_a_sweep_on_a_score_aliases_the_best_scored_version_and_reads_its_curve(tracking_uri):
    """--metric eval.<task>.<metric>: each checkpoint of the best trial is a version tagged
    with its scores; the alias goes to the best-scored one, and the trial's rows and curves
    read the run metric eval/<task>/<metric>."""
    from pathlib import Path

    c = store.client(tracking_uri)
    exp = c.create_experiment("exp-score")
    run = c.create_run(exp, run_name="s-t_0", tags={tags.SWEEP_TAG: "s", tags.TRIAL_TAG: "t_0",
                                                   "lmforge.run_dir": "/runs/s-t_0"})  # fmt: skip
    rid = run.info.run_id
    c.create_registered_model("m")
    for step, score in ((5, 0.2), (10, 0.7), (15, 0.4)):
        c.log_metric(rid, "eval/copy/exact_match", score, step=step)
        c.create_model_version("m", f"runs:/{rid}/checkpoint", run_id=rid, tags={
            "step": str(step), "eval.copy.exact_match": str(score),
            "ray_checkpoint_uri": f"/runs/s-t_0/checkpoint_{step:08d}",
        })  # fmt: skip
    got = record.alias_best_version(
        tracking_uri, "exp-score", "m", "s", Path("/runs/s-t_0"), "eval.copy.exact_match", "max"
    )
    assert (str(got[0]), got[1]) == ("2", Path("/runs/s-t_0/checkpoint_00000010"))
    assert c.get_model_version_by_alias("m", "sweep-s").tags["step"] == "10"
    (row,) = record.trials_of(tracking_uri, "exp-score", "s", "eval.copy.exact_match")
    assert row["metric"] == 0.4  # the last logged
    curves = record.curves_of(tracking_uri, [rid], "eval.copy.exact_match")
    assert curves == {rid: [(5, 0.2), (10, 0.7), (15, 0.4)]}
