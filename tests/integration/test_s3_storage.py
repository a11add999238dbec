"""Data and checkpoints in S3 (moto's real S3 API on 127.0.0.1): `prepare --output s3://`,
2 workers training from shards streamed out of the bucket into run storage in the bucket
(Ray Train's storage_filesystem), every checkpoint sealed there and registered, a resume
from S3 with a guard's rollback to a checkpoint there, `generate --checkpoint s3://...`, damage in an S3 checkpoint caught by files.json;
the secret key reaches neither MLflow nor the log."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from lmforge import cli, storage
from lmforge.checkpoint import FILES, RAY_RECORD, CheckpointError, read_state, resolve_checkpoint
from lmforge.config import ConfigError
from lmforge.data.prepare import PrepareOptions, prepare
from lmforge.tracking import store
from lmforge.tracking.tracker import RUN_DIR_TAG
from lmforge.training.plan import build_plan
from tests.integration.conftest import submit_train, tiny_config

SECRET = "it-secret-key-4b9e2a7c"
EXPERIMENT = "it-s3"
SETTINGS = {"train.checkpoint_every": 3, "train.eval_every": 3, "train.eval_steps": 1,
            "train.log_every": 1, "train.warmup_steps": 1, "tracking.experiment": EXPERIMENT}  # fmt: skip


def submit(ray_cluster, env: dict[str, str], settings: dict, *extra: str) -> tuple[str, str]:
    """jobs/train.py through the Jobs API, the AWS_* in the job's runtime env (as a user
    submits with credentials: driver, Ray Train's controller and workers all get them)."""
    settings = {**SETTINGS, "tracking.tracking_uri": store.resolve_uri(None), **settings}
    return submit_train(ray_cluster, settings, env, extra)


@pytest.fixture(scope="module")
def s3(s3_server):
    """This process (the driver) reaches the moto server by the standard AWS_* variables,
    with a secret key the test looks for everywhere it must not be."""
    with pytest.MonkeyPatch.context() as mp:
        for key in storage.AWS_ENV:
            mp.delenv(key, raising=False)
        for key, value in {**s3_server.env, "AWS_SECRET_ACCESS_KEY": SECRET}.items():
            mp.setenv(key, value)
        storage.configure(None)
        yield s3_server


@pytest.fixture(scope="module")
def s3_dataset(ray_cluster, corpus, s3):
    uri = s3.uri("datasets", "plays")
    prepare([corpus], uri, PrepareOptions(vocab_size=512, seq_tokens=128, rows_per_group=4))
    return uri


def test_prepare_writes_the_dataset_to_s3(s3_dataset):
    ds = storage.resolve(s3_dataset)
    files = ds.files()
    assert "manifest.json" in files and "tokenizer.json" in files
    assert any(f.startswith("train/shard-") for f in files)
    assert any(f.startswith("val/shard-") for f in files)


def test_train_resume_register_and_generate_on_s3(ray_cluster, s3, s3_dataset, capfd):
    runs = s3.uri("runs")
    env = {**s3.env, "AWS_SECRET_ACCESS_KEY": SECRET}
    settings = {"data.path": s3_dataset, "run.storage_path": runs, "run.name": "s3-run"}
    status, log = submit(ray_cluster, env, {**settings, "train.max_steps": 3})
    assert status == "SUCCEEDED", log[-4000:]
    run = storage.resolve(runs) / "s3-run"
    first = run / "checkpoint_00000003"
    assert (run / RAY_RECORD).is_file() and (first / FILES).is_file()  # in the bucket
    assert read_state(first).dataset.path == s3_dataset

    # The resumed run's step 5 is NaN: the guard rolls back to the checkpoint in the bucket
    # (each worker reads a copy of it) and trains 4..6 again on the same data.
    guard = "{nonfinite: rollback, max_rollbacks: 1, skip_batches: false}"
    status, log2 = submit(
        ray_cluster, {**env, "LMFORGE_FAULT": "nan:step:5"},
        {**settings, "train.max_steps": 6, "train.guard": guard}, "--resume",
    )  # fmt: skip
    assert status == "SUCCEEDED", log2[-4000:]
    assert "resumed from step 3" in log2
    assert "rollback 1/1 to the checkpoint of step 3, reading the same data again" in log2
    last = run / "checkpoint_00000006"
    state = read_state(last)
    assert state.step == 6 and state.tokens_seen == 6 * 8 * 2 * 64
    before = read_state(first).data
    assert [a["offset"] - b["offset"] for a, b in zip(state.data, before, strict=True)] == [
        3 * 8 * 64
    ] * 2  # each worker's stream went on from where it stopped, not from the start

    # One MLflow run; a version per checkpoint, each pointing into the bucket.
    client = MlflowClient(store.resolve_uri(None))
    exp = client.get_experiment_by_name(EXPERIMENT)
    mruns = client.search_runs([exp.experiment_id], f"tags.`{RUN_DIR_TAG}` = '{run}'")
    assert len(mruns) == 1
    versions = client.search_model_versions(f"name='{EXPERIMENT}'")
    by_step = {int(v.tags["step"]): v for v in versions if v.run_id == mruns[0].info.run_id}
    assert sorted(by_step) == [3, 6]
    assert by_step[6].tags["ray_checkpoint_uri"] == str(last)
    assert by_step[6].tags["run_dir"] == str(run)

    # The credentials reached the job through its runtime env only: not MLflow, not the log.
    params = mruns[0].data.params
    assert params["data.path"] == s3_dataset and params["run.storage_path"] == runs
    seen = [*params.values(), *mruns[0].data.tags.values()]
    seen += [str(t) for v in versions for t in v.tags.values()]
    assert not [s for s in seen if SECRET in s]
    assert SECRET not in log + log2

    # generate --checkpoint on the run in S3: its latest checkpoint, checked and fetched.
    capfd.readouterr()
    code = cli.main(["generate", "--checkpoint", str(run), "--prompt", "KING",
                     "--max-new-tokens", "8", "--seed", "1"])  # fmt: skip
    out = capfd.readouterr()
    assert code in (0, None) and out.out.startswith("KING"), out.err[-2000:]

    # Damage in the bucket is caught by files.json, for generate and for --resume.
    engine = next(p for p in (last / "deepspeed").files() if p.endswith(".pt"))
    obj = last / "deepspeed" / engine
    obj.fs.delete_file(obj.key)
    with pytest.raises(CheckpointError, match=f"deepspeed/{engine} is missing"):
        resolve_checkpoint(str(run))
    with pytest.raises(CheckpointError, match="the run's latest checkpoint is incomplete"):
        build_plan(tiny_config(s3_dataset, "s3-run", f"run.storage_path={runs}"), resume=True)


def test_another_uri_scheme_is_refused():
    with pytest.raises(ConfigError, match="run.storage_path='gs://b/runs'"):
        tiny_config("datasets/x", "gs-run", "run.storage_path=gs://b/runs")


def test_a_sweep_keeps_its_state_in_s3_and_resumes_from_it(ray_cluster, s3, s3_dataset):
    """`lmforge sweep --submit` with run.storage_path in the bucket, searched by Optuna (TPE),
    each trial a 2-worker job: Tune's experiment state (the searcher's too), the sweep's
    description and the trials' runs are written there; the best trial's best checkpoint (in
    the bucket) is registered with the alias. `--resume` as a job reads it all back from the
    bucket: nothing is rerun (no curve grows) and the alias stays on the same version; the
    trials' reports, which a resumed ASHA is rebuilt from, are read from there."""
    from ray.job_submission import JobSubmissionClient

    from lmforge import sweeps
    from lmforge.jobspec import runtime_env
    from lmforge.sweeps.submit import sweep_job
    from tests.conftest import REPO

    name, model, runs = "it-s3-lr", "it-s3-sweep", s3.uri("sweep-runs")
    uri = store.resolve_uri(None)
    env = {**s3.env, "AWS_SECRET_ACCESS_KEY": SECRET}
    plan = sweeps.plan_sweep(
        name, REPO / "jobs" / "configs" / "tiny.yaml", {"train.lr": {"loguniform": [1e-3, 3e-3]}},
        [
            f"data.path={s3_dataset}", f"run.storage_path={runs}", "scaling.num_workers=2",
            "train.max_steps=4", "train.warmup_steps=1", "train.eval_every=2",
            "train.eval_steps=1", "train.checkpoint_every=4", "train.log_every=2",
            "model.n_layer=1", f"tracking.experiment={EXPERIMENT}",
            f"tracking.registered_model={model}",
        ],
        sweeps.SweepOptions(trials=2, max_concurrent=2, search="optuna", seed=0, grace_period=2,
                            reduction_factor=2),
    )  # fmt: skip
    assert str(plan.sweep_dir) == f"{runs}/sweeps/{name}"
    spec = sweep_job(name, plan.base_config, plan.space, plan.options, tracking_uri=uri,
                     any_path=True, env_vars=env)  # fmt: skip
    client = JobSubmissionClient(ray_cluster.dashboard_url)

    def run(entrypoint: str, runtime: dict) -> str:
        job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime)
        while not (status := client.get_job_status(job)).is_terminal():
            time.sleep(1)
        log = client.get_job_logs(job)
        assert str(status) == "SUCCEEDED", log[-4000:]
        return log

    log = run(spec.entrypoint, spec.runtime_env)
    state = storage.resolve(runs) / "sweeps" / name
    assert (state / "lmforge-sweep.json").is_file()
    assert any(p.name.startswith("experiment_state") for p in state.iterdir()), log[-3000:]
    assert log.count(" params on 2 worker(s), ZeRO") == 2, log[-3000:]  # each trial's rank 0
    trials = sweeps.trials_of(uri, EXPERIMENT, name)
    assert len(trials) == 2 and all(r["run_dir"].startswith(runs) for r in trials), trials
    lrs = [r["values"]["train.lr"] for r in trials]
    assert len(set(lrs)) == 2 and all(1e-3 <= lr <= 3e-3 for lr in lrs), lrs  # Optuna's picks
    curves = {r["run_id"]: len(store.client(uri).get_metric_history(r["run_id"], "loss"))
              for r in trials}  # fmt: skip
    version = MlflowClient(uri).get_model_version_by_alias(model, f"sweep-{name}")
    assert version.tags["ray_checkpoint_uri"].startswith(f"{runs}/{name}-")

    log2 = run(
        f"python jobs/sweep.py --resume {name} --set run.storage_path={runs}", runtime_env(env)
    )
    assert f"resuming from {state}" in log2
    assert "started" not in log2.split("resuming from", 1)[1]
    again = {r["run_id"]: len(store.client(uri).get_metric_history(r["run_id"], "loss"))
             for r in sweeps.trials_of(uri, EXPERIMENT, name)}  # fmt: skip
    assert again == curves  # nothing rerun
    after = MlflowClient(uri).get_model_version_by_alias(model, f"sweep-{name}")
    assert after.version == version.version
    assert SECRET not in log + log2
    # What a resumed sweep's ASHA is rebuilt from: each trial's reports, read from the bucket.
    from types import SimpleNamespace

    from lmforge.sweeps.driver import _results_of

    dirs = [p for p in state.iterdir() if p.name.startswith("trial_main_")]
    assert len(dirs) == 2
    reached = []
    for d in dirs:
        trial = SimpleNamespace(storage=SimpleNamespace(storage_filesystem=d.fs), path=d.key)
        steps = [r["step"] for r in _results_of(trial) if "val_loss" in r]
        assert steps[:2] == [0, 2], steps  # the evaluation before training, then each eval_every
        reached.append(steps[-1])
    assert max(reached) == 4, reached  # the better trial ran to the end (ASHA may stop the other)
