"""A real local Ray cluster (started like `lmforge cluster up`) and a small prepared dataset,
shared by every integration test in the session."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from lmforge import cluster, paths
from lmforge.config import load_config
from lmforge.services import free_port, kill_group
from lmforge.tracking import store
from tests.conftest import CORPUS, REPO

# Free ports, not Ray's defaults: a developer's own cluster (6379/8265) and another test
# session on the same machine are left alone.
GCS_PORT, DASHBOARD_PORT = free_port(), free_port()
PLAYS = ["twelfth_night.txt", "as_you_like_it.txt", "henry_v.txt"]


# Fixtures that start Ray: the session's cluster (`dataset` and the others that need it
# follow) and the modules' own multi-node clusters. A test that starts Ray another way is
# in FAULT_MODULES or says so itself (`pytestmark = pytest.mark.ray`).
RAY_FIXTURES = {"ray_cluster", "nodes3"}
# Modules whose every test waits on workers or nodes killed on purpose (a SIGKILLed worker
# group, a lost node, a hung object store) and on Ray's recovery from it.
FAULT_MODULES = {"test_resilience.py", "test_elastic.py", "test_scaleout.py"}


def pytest_collection_modifyitems(items):
    """Every test here is `integration`; `ray` if it starts Ray, `faults` if it kills
    workers or nodes (pyproject.toml lists the markers, README.md's Development how to pick)."""
    for item in items:
        if "/integration/" not in str(item.fspath):
            continue
        item.add_marker(pytest.mark.integration)
        faults = item.path.name in FAULT_MODULES
        if faults or RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.ray)
        if faults:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def ray_cluster():
    info = cluster.up(port=GCS_PORT, dashboard_port=DASHBOARD_PORT, num_cpus=4)
    cluster.connect()
    yield info
    import ray

    ray.shutdown()
    cluster.down()


@pytest.fixture(scope="session")
def tracking_server():
    """`lmforge tracking up` on a free port; while it runs it is every later test's default
    MLflow (same store as the SQLite file, so assertions read the same runs either way)."""
    from lmforge.services import free_port
    from lmforge.tracking import server

    info = server.up(port=free_port())
    yield info
    server.down()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real local S3 API (moto's server from .venv-services on a free port) with an empty
    bucket: `.endpoint_url`, `.bucket`, `.env` (dummy AWS_* credentials and the endpoint,
    for os.environ or a job's runtime env), `.uri("runs")` -> s3://BUCKET/runs."""
    from tests.s3server import s3_server

    with s3_server("lmforge-it", log_dir=tmp_path_factory.mktemp("moto")) as s3:
        yield s3


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for play in PLAYS:
        shutil.copy(CORPUS / play, d / play)
    return d


@pytest.fixture(scope="session")
def dataset(ray_cluster, corpus):
    """Three plays, a 512-token vocab, 128-token rows: many row groups for 2 workers."""
    from lmforge.data.prepare import PrepareOptions, prepare

    out = paths.home() / "datasets" / "plays"
    prepare([corpus], out, PrepareOptions(vocab_size=512, seq_tokens=128, rows_per_group=4))
    return out


def tiny_config(dataset, name, *overrides):
    return load_config(
        REPO / "jobs" / "configs" / "tiny.yaml",
        [f"data.path={dataset}", f"run.name={name}", *overrides],
    )


def submit_train(
    ray_cluster, overrides: dict, env: dict[str, str] | None = None, extra: tuple[str, ...] = (),
    timeout_s: float = 600,
) -> tuple[str, str]:  # fmt: skip
    """`python jobs/train.py --config jobs/configs/tiny.yaml [extra] --set K=V...` through
    the Jobs API, as `ray job submit` does (cluster/runtime_env.yaml, `env` added to its
    env_vars: driver, Ray Train's controller and workers get them); waits for its end:
    (status, log)."""
    from ray.job_submission import JobSubmissionClient

    from lmforge.jobspec import runtime_env

    args = ["python", "jobs/train.py", "--config", "jobs/configs/tiny.yaml", *extra]
    for k, v in overrides.items():
        args += ["--set", f"{k}={v}"]
    client = JobSubmissionClient(ray_cluster.dashboard_url)
    job = client.submit_job(entrypoint=shlex.join(args), runtime_env=runtime_env(env))
    deadline = time.monotonic() + timeout_s
    while not (status := client.get_job_status(job)).is_terminal():
        assert time.monotonic() < deadline, f"job {job} still {status} after {timeout_s:.0f} s"
        time.sleep(1)
    return str(status), client.get_job_logs(job)


def cli_env(home, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of an `lmforge` command run as a user runs it, in its own
    LMFORGE_HOME: none of this session's RAY_* or MLFLOW_* variables, `extra` on top."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    return {**env, "LMFORGE_HOME": str(home), **(extra or {})}


def lmforge(home, *args, timeout=300, check=True, env=None) -> subprocess.CompletedProcess:
    """`lmforge ARGS...` in LMFORGE_HOME `home` (`env`: extra variables), to its end."""
    out = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *map(str, args)],
        capture_output=True, text=True, env=cli_env(home, env), timeout=timeout,
    )  # fmt: skip
    if check:
        assert out.returncode == 0, f"lmforge {args[0]}: {out.stderr[-3000:]}"
    return out


def cluster_processes(temp_dir: str) -> list:
    """Every process of a cluster: each names the cluster's own temp dir on its command line
    (raylet, GCS, dashboard, workers) or is a recorded `ray start`."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(temp_dir in a for a in p.info["cmdline"] or []):
            found.append(p)
    return found


@pytest.fixture(scope="session")
def dashboard_server(ray_cluster, tmp_path_factory):
    """`lmforge dashboard` on a free port against the test cluster, as a user starts it; its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("dashboard") / "streamlit.log"
    cmd = [sys.executable, "-m", "lmforge.cli", "dashboard", "--port", str(port),
           "--ray-address", ray_cluster.dashboard_url, "--tracking-uri", store.resolve_uri()]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
    yield url
    kill_group(proc.pid)
