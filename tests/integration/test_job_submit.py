"""A real `ray job submit` of jobs/train.py against the cluster `lmforge cluster up` starts."""

import os
import subprocess
import sys
from pathlib import Path

from lmforge.checkpoint import read_state
from tests.conftest import REPO


def submit(dashboard_url: str, *args: str, auth: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    if auth:
        env["RAY_AUTH_MODE"] = "token"
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [str(ray_bin), "job", "submit", "--address", dashboard_url,
           "--runtime-env", "cluster/runtime_env.yaml", "--", *args]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_ray_job_submit_trains_and_checkpoints(ray_cluster, dataset, tmp_path):
    storage = tmp_path / "runs"
    out = submit(
        ray_cluster.dashboard_url,
        "python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml",
        "--set", f"data.path={dataset}", "--set", f"run.storage_path={storage}",
        "--set", "run.name=submitted", "--set", "train.max_steps=6",
        "--set", "train.eval_every=3", "--set", "train.checkpoint_every=6",
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "succeeded" in log
    assert "step      6/6" in log and "checkpoint step 6" in log
    assert read_state(storage / "submitted" / "checkpoint_00000006")["step"] == 6


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
