"""A real `ray job submit` (and `lmforge submit`) of jobs/train.py against the cluster
`lmforge cluster up` starts.

The job that Ctrl-C leaves running is started first and checked last: it trains beside the
other tests' jobs (two jobs on the cluster at once, as a user's would be) instead of
being waited for alone."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.checkpoint import read_state
from lmforge.jobclient import JobClient
from lmforge.tracking import browse, store
from tests.conftest import REPO


def submit(dashboard_url: str, *args: str, auth: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    if auth:
        env["RAY_AUTH_MODE"] = "token"
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin), "job", "submit", "--address", dashboard_url,
           "--runtime-env", "cluster/runtime_env.yaml", "--", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def lmforge_submit(ray_cluster, dataset, storage, name, *extra):
    return [
        sys.executable, "-m", "lmforge.cli", "submit", "--config", "jobs/configs/tiny.yaml",
        "--set", f"data.path={dataset}", "--set", f"run.storage_path={storage}",
        "--set", f"run.name={name}", "--set", "tracking.experiment=cli-submit",
        "--set", "train.warmup_steps=1",
        "--address", ray_cluster.dashboard_url, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def interrupted(ray_cluster, dataset, tmp_path_factory):
    """`lmforge submit`, Ctrl-C (SIGINT) once the followed log has started: (sid, exit code,
    stderr). The job runs on while the module's other tests run theirs."""
    cmd = lmforge_submit(ray_cluster, dataset, tmp_path_factory.mktemp("detached"), "cli-detached",
                         "--set", "train.max_steps=2", "--set", "train.eval_every=2",
                         "--set", "train.checkpoint_every=2")  # fmt: skip
    # SIGINT's default action in the child, as in a terminal: a test run started in the
    # background by a non-interactive shell (`pytest ... &`) ignores SIGINT, and a child
    # inherits that, so Ctrl-C would never reach it.
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        first = proc.stdout.readline()
        (sid,) = re.findall(r"^submitted job (raysubmit_\w+) ", first)
        for line in proc.stdout:  # the followed log has started
            if line.strip():
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return SimpleNamespace(sid=sid, returncode=proc.returncode, err=err)


def test_ctrl_c_stops_following(interrupted, ray_cluster):
    sid, err = interrupted.sid, interrupted.err
    assert interrupted.returncode == 130, err[-3000:]
    assert f"stopped following; job {sid} keeps running" in err
    assert f"ray job stop --address {ray_cluster.dashboard_url} {sid}" in err
    assert "Traceback" not in err


def test_ray_job_submit_trains_checkpoints_and_registers(
    ray_cluster, tracking_server, dataset, tmp_path
):
    """The job logs to the `lmforge tracking up` server given as tracking.tracking_uri."""
    storage = tmp_path / "runs"
    out = submit(
        ray_cluster.dashboard_url,
        "python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml",
        "--set", f"data.path={dataset}", "--set", f"run.storage_path={storage}",
        "--set", "run.name=submitted", "--set", "train.max_steps=6",
        "--set", "train.eval_every=3", "--set", "train.checkpoint_every=6",
        "--set", f"tracking.tracking_uri={tracking_server.url}",
        "--set", "tracking.experiment=submitted-jobs",
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "succeeded" in log
    assert "step      6/6" in log and "checkpoint step 6" in log
    assert "startup | workers up" in log and "throughput" in log
    assert read_state(storage / "submitted" / "checkpoint_00000006").step == 6
    client = store.client(tracking_server.url)
    (version,) = client.search_model_versions("name='submitted-jobs'")
    assert version.tags["step"] == "6"
    assert version.tags["ray_checkpoint_uri"] == str(storage / "submitted" / "checkpoint_00000006")
    tags = client.get_run(version.run_id).data.tags
    assert tags["ray.submission_id"].startswith("raysubmit_")  # the id `ray job submit` printed
    assert tags["ray.submission_id"] in log


def test_submit_without_the_token_is_refused(ray_cluster):
    out = submit(ray_cluster.dashboard_url, "python", "-c", "print('should not run')", auth=False)
    assert out.returncode != 0
    assert "401" in out.stdout + out.stderr or "nauthorized" in out.stdout + out.stderr


def test_bad_config_fails_the_job_with_the_key_named(ray_cluster, dataset):
    out = submit(
        ray_cluster.dashboard_url, "python", "jobs/train.py",
        "--config", "jobs/configs/tiny.yaml", "--set", "zero.stage=7",
    )  # fmt: skip
    assert out.returncode != 0
    assert "zero.stage" in out.stdout + out.stderr


def test_lmforge_submit_follows_the_job_to_its_end(ray_cluster, dataset, tmp_path):
    storage = tmp_path / "runs"
    cmd = lmforge_submit(ray_cluster, dataset, storage, "cli-submitted",
                         "--set", "train.max_steps=4", "--set", "train.eval_every=2",
                         "--set", "train.checkpoint_every=4")  # fmt: skip
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    (sid,) = re.findall(
        rf"^submitted job (raysubmit_\w+) to {ray_cluster.dashboard_url} \(run cli-submitted, "
        r"experiment cli-submit\)$",
        out.stdout,
        re.M,
    )
    # The job's own log, followed here: the training lines, then the job's end.
    assert "step      4/4" in out.stdout and "checkpoint step 4" in out.stdout
    assert out.stdout.endswith(f"job {sid} SUCCEEDED\n")
    client = JobClient(ray_cluster.dashboard_url)
    row = client.job(sid)
    assert row.kind == "SUBMISSION" and row.status == "SUCCEEDED"
    assert row.entrypoint.startswith("exec python jobs/train.py --set")
    assert row.metadata == {
        "lmforge.kind": "train", "lmforge.run_name": "cli-submitted",
        "lmforge.experiment": "cli-submit",
    }  # fmt: skip
    assert "step      4/4" in client.logs(sid)
    assert read_state(storage / "cli-submitted" / "checkpoint_00000004").step == 4
    run = browse.run_for_submission(store.resolve_uri(), sid)  # the Jobs page's "run"
    assert run is not None and run.name == "cli-submitted" and run.experiment == "cli-submit"


def test_the_job_ctrl_c_left_runs_on_to_its_end(interrupted, ray_cluster):
    client = JobClient(ray_cluster.dashboard_url)
    assert client.wait(interrupted.sid, timeout_s=600) == "SUCCEEDED", client.tail(
        interrupted.sid, 60
    )
    assert "step      2/2" in client.logs(interrupted.sid)
