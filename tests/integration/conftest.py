"""A real local Ray cluster (started like `lmforge cluster up`) and a small prepared dataset,
shared by every integration test in the session."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from lmforge import cluster, paths
from lmforge.config import load_config
from lmforge.services import free_port, kill_group, process_start_time
from lmforge.tracking import store
from tests.conftest import CORPUS, REPO

# Free ports, not Ray's defaults: a developer's own cluster (6379/8265) and another test
# session on the same machine are left alone.
GCS_PORT, DASHBOARD_PORT = free_port(), free_port()
PLAYS = ["twelfth_night.txt", "as_you_like_it.txt", "henry_v.txt"]


# Fixtures that start Ray: the session's cluster (`dataset` and the others that need it
# follow) and the session's multi-node cluster (`nodes3`, `nodes3_dataset` follow). A test
# that starts Ray another way is in FAULT_MODULES or says so itself (`pytestmark = ...ray`).
RAY_FIXTURES = {"ray_cluster", "multinode"}
# Modules whose every test waits on workers or nodes killed on purpose (a SIGKILLed worker
# group, a lost node, a hung object store) and on Ray's recovery from it.
FAULT_MODULES = {"test_resilience.py", "test_elastic.py", "test_scaleout.py"}


# The modules that share the session's multi-node cluster (`nodes3`), in the order they run:
# test_multinode first (its status and dashboard checks want a cluster no node has left),
# then the ones that kill nodes, and last test_multinode's `cluster down`, which stops it.
MULTINODE_MODULES = ("test_multinode.py", "test_elastic.py", "test_scaleout.py")
MULTINODE_LAST = "test_multinode.py::test_down_leaves_no_process"


def pytest_collection_modifyitems(items):
    """Every test here is `integration`; `ray` if it starts Ray, `faults` if it kills
    workers or nodes (pyproject.toml lists the markers, README.md's Development how to pick).
    The multi-node modules run one after another, in MULTINODE_MODULES' order (and, under
    pytest-xdist, in one worker: tests/conftest.py's scheduler)."""
    order_multinode(items)
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


def order_multinode(items: list) -> None:
    """The tests of MULTINODE_MODULES together, where the first of them was collected, in
    MULTINODE_MODULES' order (each module's own order kept), MULTINODE_LAST at the end: the
    shared cluster lives from the first to the last of them, and no other test runs beside
    it on this machine's few cores."""
    rank = {name: i for i, name in enumerate(MULTINODE_MODULES)}
    block = [it for it in items if it.path.parent.name == "integration" and it.path.name in rank]
    if not block:
        return
    first, members = items.index(block[0]), set(block)
    rest = [it for it in items if it not in members]
    block.sort(key=lambda it: (it.nodeid.endswith(MULTINODE_LAST), rank[it.path.name]))
    items[:] = rest[:first] + block + rest[first:]


# Ray's node-death detection on the multi-node cluster, short: its GCS health-checks each
# raylet every `period` ms and marks the node dead after `threshold` checks in a row failed
# (Ray 2.60's RayConfig, read by the GCS from RAY_<name> in its environment; defaults 3000 ms
# x 5: a SIGKILLed node is dead 15 s later). A killed raylet refuses the check at once, so a
# lost node is seen in about 2 s; a live one fails a check only by not answering within
# `health_check_timeout_ms` (10 s, kept), so a busy machine is no lost node.
NODE_DEATH_ENV = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}
# Node i's address in a cluster of several nodes (cluster.node_ip): head .2, workers .3, .4
NODES3 = ("127.0.0.2", "127.0.0.3", "127.0.0.4")

# Worker nodes 1 and 2 back as `cluster up --nodes 3` started them; any other node stopped.
RESTORE_NODES = """
from lmforge import cluster
head = cluster.running()
for i in range(3, cluster.MAX_NODES):  # added by a test (`cluster add-node`)
    cluster.worker_node(i).stop()
for i in (1, 2):  # killed by a test: joins again on its address
    if cluster.worker_node(i).running() is None:
        cluster.worker_node(i).stop()
        cluster._start_worker(head, i, 1, cluster._node_env(head.nodes), 120)
"""


class MultiNode:
    """`lmforge cluster up --nodes 3` in its own LMFORGE_HOME (`home`): a head with 0 CPUs
    on 127.0.0.2, worker nodes of 1 CPU on .3 and .4. `env`: the variables every `lmforge`
    command against it gets (the cluster's own are those it was started with). Not under
    pytest's basetemp, which a concurrent pytest session may prune while this one runs."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="lmforge-multinode-"))
        self.env = dict(NODE_DEATH_ENV)
        self.up_out = ""

    @property
    def state(self) -> dict:
        return json.loads((self.home / "cluster.json").read_text())

    def up(self) -> None:
        self.up_out = lmforge(self.home, "cluster", "up", "--nodes", 3, "--port", free_port(),
                              "--dashboard-port", free_port(), env=self.env).stdout  # fmt: skip

    def down(self) -> None:
        if list(self.home.glob("cluster*.json")):  # not stopped yet (by test_multinode's last)
            lmforge(self.home, "cluster", "down", timeout=120, check=False)

    def alive(self) -> list[str]:
        """The addresses of the nodes Ray has alive, sorted."""
        nodes = cluster.state_list(self.state["dashboard_url"], "nodes")
        return sorted(n["node_ip"] for n in nodes if n["state"] == "ALIVE")

    def restore(self) -> None:
        """Back to three alive nodes on NODES3 (the cluster started again if it is down):
        a worker node a test killed joins again on its address, one a test added stops. Ray
        keeps the dead nodes' entries."""
        try:
            alive = self.alive()
        except (OSError, ValueError, cluster.ClusterError):  # no cluster.json, or no head
            self.up()
            alive = self.alive()
        if alive == list(NODES3) and all(
            process_start_time(json.loads(f.read_text())["pid"]) is not None
            for f in self.home.glob("cluster-node-*.json")
        ):
            return
        out = subprocess.run([sys.executable, "-c", RESTORE_NODES], capture_output=True,
                             text=True, env=cli_env(self.home, self.env), timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        deadline = time.monotonic() + 60
        while (alive := self.alive()) != list(NODES3):  # a stopped node's entry turns DEAD
            assert time.monotonic() < deadline, f"alive nodes: {alive}"
            time.sleep(0.5)


@pytest.fixture(scope="session")
def multinode(request):
    """The session's multi-node cluster (MultiNode), shared by MULTINODE_MODULES; stopped by
    test_multinode's last test, or here at the end. Its LMFORGE_HOME (the runs' logs, each
    node's `ray start` log under cluster/) is kept when a test of the session failed."""
    nodes = MultiNode()
    try:
        nodes.up()
        yield nodes
    finally:
        nodes.down()
        if not request.session.testsfailed:
            shutil.rmtree(nodes.home, ignore_errors=True)


@pytest.fixture(scope="module")
def nodes3(multinode):
    """The multi-node cluster as `cluster up --nodes 3` left it, at the start of a module."""
    multinode.restore()
    return multinode


@pytest.fixture(scope="session")
def nodes3_dataset(multinode):
    """One play, prepared on the multi-node cluster (Ray Data tasks on the worker nodes)."""
    out = multinode.home / "ds"
    lmforge(multinode.home, "prepare", "--input", CORPUS / "twelfth_night.txt", "--output", out,
            "--vocab-size", 300, "--seq-tokens", 64, "--rows-per-group", 4)  # fmt: skip
    return out


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
