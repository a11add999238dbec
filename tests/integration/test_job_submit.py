"""A real `ray job submit` of jobs/train.py against the cluster `lmforge cluster up` starts."""

import os
import subprocess
import sys
from pathlib import Path

from lmforge.checkpoint import read_state
from lmforge.tracking import store
from tests.conftest import REPO


def submit(dashboard_url: str, *args: str, auth: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    if auth:
        env["RAY_AUTH_MODE"] = "token"
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin), "job", "submit", "--address", dashboard_url,
           "--runtime-env", "cluster/runtime_env.yaml", "--", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


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
    assert "startup | Ray Train workers up" in log and "throughput" in log
    assert read_state(storage / "submitted" / "checkpoint_00000006")["step"] == 6
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
