"""The local cluster's layout (`lmforge cluster up --nodes N`), the checks a run passes before
it starts on a cluster, and the fast failure on a dead Ray address. No Ray is started: the
node commands are captured where `ManagedProcess.start` would run them."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge import cluster
from lmforge.cli import build_parser
from lmforge.config import ConfigError, load_config
from lmforge.training.launch import check_cluster
from lmforge.training.loop import rank_nodes_tag

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "configs" / "tiny.yaml"


@pytest.fixture
def started(monkeypatch, tmp_path):
    """Capture each node `up` would start, in order; `fail_at` makes that start fail."""
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.setattr(cluster, "ensure_token", lambda: tmp_path / "token")
    calls: list[dict] = []
    stopped: list[str] = []
    fail_at = {"name": None}

    def start(self, cmd, *, env, log_file, ready, timeout_s, error, poll_s=0.5, **fields):
        if self.name == fail_at["name"]:
            raise error(f"{self.what} did not start")
        calls.append({"name": self.name, "cmd": cmd, "env": env, **fields})
        return self.record(pid=len(calls), started=0.0, log_file=str(log_file), **fields)

    monkeypatch.setattr(cluster.ManagedProcess, "start", start)

    def stop(self, timeout_s=30):
        was = any(c["name"] == self.name for c in calls) and self.name not in stopped
        if was:
            stopped.append(self.name)
        return was

    monkeypatch.setattr(cluster.ManagedProcess, "stop", stop)
    monkeypatch.setattr(cluster.ManagedProcess, "running", lambda self: None)
    return calls, stopped, fail_at


def flags(cmd: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in cmd if a.startswith("--") and "=" in a)


def test_one_node_stays_on_127_0_0_1_in_single_host_mode(started):
    calls, _, _ = started
    info = cluster.up(port=7001, dashboard_port=7002)
    assert [c["name"] for c in calls] == ["cluster"]
    f = flags(calls[0]["cmd"])
    assert f["node-ip-address"] == "127.0.0.1" and "num-cpus" not in f
    assert calls[0]["env"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert info.address == "127.0.0.1:7001" and info.nodes == 1


def test_nodes_get_their_own_loopback_address_cpus_and_the_head(started, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:43987")  # another cluster's: never inherited
    calls, _, _ = started
    info = cluster.up(port=7001, dashboard_port=7002, nodes=3, node_cpus=2)
    assert [c["name"] for c in calls] == ["cluster", "cluster-node-1", "cluster-node-2"]
    head, *workers = (flags(c["cmd"]) for c in calls)
    assert head["node-ip-address"] == "127.0.0.2" and head["num-cpus"] == "0"
    assert head["dashboard-host"] == "127.0.0.1"  # the Jobs API stays on 127.0.0.1
    assert info.address == "127.0.0.2:7001" and info.nodes == 3
    assert [w["node-ip-address"] for w in workers] == ["127.0.0.3", "127.0.0.4"]
    assert {w["address"] for w in workers} == {info.address}
    assert {w["num-cpus"] for w in workers} == {"2"}
    for c in calls:
        assert c["env"]["RAY_AUTH_MODE"] == "token"  # token auth on every node
        assert c["env"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"  # else --address aborts
        assert "RAY_ADDRESS" not in c["env"]
    # One temp dir per cluster; in it, each worker node's own (its log monitor forwards its
    # own workers' lines only: each line once in a job's log)
    assert [flags(c["cmd"])["temp-dir"] for c in calls] == [
        info.temp_dir, f"{info.temp_dir}/node-1", f"{info.temp_dir}/node-2"
    ]  # fmt: skip


def test_clusters_on_other_ports_have_their_own_temp_dir():
    # Ray's "current cluster" file lives in the temp dir: a job's driver finds its cluster
    # through it, so two clusters must never share one.
    assert cluster.temp_dir_for(6379) != cluster.temp_dir_for(6380)
    # Unix socket paths (107 bytes at most) live under it, a node's under its own dir:
    # <temp dir>/node-31/session_<date>_<time>_<us>_<pid>/sockets/plasma_store
    deepest = cluster.node_temp_dir(cluster.temp_dir_for(65535), 31)
    assert len(deepest) + len("/session_2026-01-01_00-00-00_000000_4194304/sockets/raylet.x") < 100


def test_a_node_that_fails_to_start_stops_the_whole_cluster(started):
    calls, stopped, fail_at = started
    fail_at["name"] = "cluster-node-2"
    with pytest.raises(cluster.ClusterError, match="worker node 2"):
        cluster.up(port=7001, dashboard_port=7002, nodes=3)
    assert [c["name"] for c in calls] == ["cluster", "cluster-node-1"]
    assert stopped == ["cluster-node-1", "cluster"]  # worker nodes first


@pytest.mark.parametrize("kw", [{"nodes": 0}, {"nodes": 99}, {"node_cpus": 0}])
def test_impossible_layouts_are_refused(started, kw):
    with pytest.raises(cluster.ClusterError):
        cluster.up(**kw)
    assert started[0] == []


def test_add_node_takes_the_next_address_never_a_lost_nodes(started, monkeypatch):
    calls, _, _ = started
    info = cluster.up(port=7001, dashboard_port=7002, nodes=3)
    monkeypatch.setattr(cluster, "running", lambda: info)
    for i in (1, 2):  # node 2 was lost: its record is left, its process is gone
        cluster.worker_node(i).state_file.write_text("{}")
    cluster.add_node(node_cpus=2)
    assert calls[-1]["name"] == "cluster-node-3"
    f = flags(calls[-1]["cmd"])
    assert f["node-ip-address"] == "127.0.0.5" and f["address"] == info.address
    assert f["num-cpus"] == "2" and f["temp-dir"] == f"{info.temp_dir}/node-3"
    assert calls[-1]["env"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"


def test_add_node_needs_a_running_cluster_of_several_nodes(started, monkeypatch):
    with pytest.raises(cluster.ClusterError, match="no local Ray cluster running"):
        cluster.add_node()
    info = cluster.up(port=7001, dashboard_port=7002)
    monkeypatch.setattr(cluster, "running", lambda: info)
    with pytest.raises(cluster.ClusterError, match="--nodes 2"):
        cluster.add_node()
    assert [c["name"] for c in started[0]] == ["cluster"]


def test_status_without_a_cluster_exits_non_zero(monkeypatch, tmp_path, capsys):
    """As `ray status` does: a script can tell that no cluster runs."""
    from lmforge.cli import main

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))  # no cluster.json: none running
    assert main(["cluster", "status"]) != 0
    out = capsys.readouterr()
    assert "no local Ray cluster running" in out.err and "lmforge cluster up" in out.err
    assert out.out == ""


def test_cli_cluster_flags():
    args = build_parser().parse_args(["cluster", "up", "--nodes", "3", "--node-cpus", "2"])
    assert (args.nodes, args.node_cpus, args.num_cpus) == (3, 2, None)
    assert build_parser().parse_args(["cluster", "add-node"]).action == "add-node"


def test_nodes_table_shows_id_address_state_and_resources():
    nodes = [
        {"node_id": "b" * 56, "node_ip": "127.0.0.3", "state": "DEAD", "is_head_node": False,
         "resources_total": {"CPU": 1.0, "node:127.0.0.3": 1.0}},
        {"node_id": "a" * 56, "node_ip": "127.0.0.2", "state": "ALIVE", "is_head_node": True,
         "resources_total": {"memory": 2 * 1024**3}},
    ]  # fmt: skip
    head, worker = cluster.nodes_table(nodes).splitlines()
    assert head.split()[:4] == ["a" * 12, "127.0.0.2", "ALIVE", "head"]
    assert "memory 2.00 GiB" in head
    assert worker.split()[:4] == ["b" * 12, "127.0.0.3", "DEAD", "worker"]
    assert worker.endswith("CPU 1") and "node:" not in worker


def test_placement_counts_each_jobs_alive_training_workers_per_node():
    nodes = [
        {"node_id": "a" * 56, "node_ip": "127.0.0.2", "state": "ALIVE", "is_head_node": True},
        {"node_id": "b" * 56, "node_ip": "127.0.0.3", "state": "ALIVE", "is_head_node": False},
        {"node_id": "c" * 56, "node_ip": "127.0.0.4", "state": "ALIVE", "is_head_node": False},
    ]
    worker = {"class_name": "RayTrainWorker", "state": "ALIVE"}
    actors = [
        {**worker, "node_id": "b" * 56, "job_id": "01000000"},
        {**worker, "node_id": "b" * 56, "job_id": "02000000"},
        {**worker, "node_id": "c" * 56, "job_id": "02000000"},
        {**worker, "node_id": "c" * 56, "job_id": "02000000", "state": "DEAD"},
        {"class_name": "TrainController", "state": "ALIVE", "node_id": "a" * 56, "job_id": "02000000"},
    ]  # fmt: skip
    rows = cluster.placement(nodes, actors, {"02000000": "raysubmit_x"})
    assert [(r["address"], r["training workers"]) for r in rows] == [
        ("127.0.0.2", ""),
        ("127.0.0.3", "01000000: 1, raysubmit_x: 1"),
        ("127.0.0.4", "raysubmit_x: 1"),
    ]


def test_a_dead_jobs_api_fails_in_seconds_naming_it():
    from lmforge.jobclient import JobClient, JobClientError

    url = f"http://127.0.0.1:{dead_port()}"
    t0 = time.monotonic()
    with pytest.raises(JobClientError, match=re.escape(url)):
        JobClient(url)  # what `lmforge submit` and the dashboard use
    assert time.monotonic() - t0 < 15


# -- before a run starts on a cluster ---------------------------------------------------
ONE_CPU = {"CPU": 1.0}
TWO_CPU = {"CPU": 2.0}
HEAD = {"memory": 1.0}  # the head of `cluster up --nodes N`: no CPU


def cfg(*overrides):
    return load_config(TINY, list(overrides))


def test_a_local_storage_path_is_refused_on_several_nodes():
    with pytest.raises(ConfigError) as err:
        check_cluster(cfg(), [HEAD, ONE_CPU, ONE_CPU])
    msg = str(err.value)
    assert "run.storage_path='runs'" in msg and "3 nodes" in msg
    assert "s3://" in msg and "run.shared_filesystem" in msg  # the fixes
    assert "\n" not in msg


@pytest.mark.parametrize(
    "overrides, nodes",
    [
        ([], [TWO_CPU]),  # one node: local storage is shared by definition
        (["run.shared_filesystem=true"], [HEAD, ONE_CPU, ONE_CPU]),  # an NFS-style mount
        (["run.storage_path=s3://bucket/runs"], [HEAD, ONE_CPU, ONE_CPU]),  # a URI is shared
    ],
)
def test_shared_or_single_node_storage_passes(overrides, nodes):
    check_cluster(cfg(*overrides), nodes)


def test_strict_spread_needs_a_node_per_worker_that_fits_one():
    c = cfg("scaling.placement_strategy=STRICT_SPREAD", "run.shared_filesystem=true")
    check_cluster(c, [HEAD, ONE_CPU, ONE_CPU])
    with pytest.raises(ConfigError, match="only 1 of the cluster's 3 nodes"):
        check_cluster(c, [HEAD, ONE_CPU, {"CPU": 0.5}])
    check_cluster(cfg("scaling.placement_strategy=SPREAD"), [TWO_CPU])  # SPREAD may share


def test_placement_strategy_and_shared_filesystem_fields():
    c = cfg()
    assert c.scaling.placement_strategy == "PACK" and c.run.shared_filesystem is False
    assert cfg("scaling.placement_strategy=SPREAD").scaling.placement_strategy == "SPREAD"
    with pytest.raises(ConfigError, match="scaling.placement_strategy"):
        cfg("scaling.placement_strategy=spread_out")


def test_rank_nodes_tag_is_json_by_rank_and_fits_a_tag():
    import json

    ranks = [
        {"node_id": "a" * 56, "address": "127.0.0.3"},
        {"node_id": "b" * 56, "address": "127.0.0.4"},
    ]
    assert json.loads(rank_nodes_tag(ranks)) == [["127.0.0.3", "a" * 56], ["127.0.0.4", "b" * 56]]
    many = ranks * 50  # 100 ranks: full ids would not fit
    short = json.loads(rank_nodes_tag(many))
    assert len(rank_nodes_tag(many)) <= 5000 and short[1] == ["127.0.0.4", "b" * 12]
    assert json.loads(rank_nodes_tag(ranks * 500)) == "1000 ranks on 2 nodes"


# -- a dead or wrong address fails in seconds, naming it ---------------------------------
def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def test_a_dead_address_is_one_error_naming_it():
    port = dead_port()
    t0 = time.monotonic()
    with pytest.raises(cluster.ClusterError) as err:
        cluster.check_reachable(f"127.0.0.1:{port}", "RAY_ADDRESS")
    assert time.monotonic() - t0 < 6
    assert f"127.0.0.1:{port}" in str(err.value) and "RAY_ADDRESS" in str(err.value)
    with pytest.raises(cluster.ClusterError, match="not HOST:PORT"):
        cluster.check_reachable("127.0.0.1", "RAY_ADDRESS")


def test_a_command_pointed_at_a_dead_cluster_fails_in_seconds(tmp_path):
    """`lmforge prepare` (the same `connect()` as train) with RAY_ADDRESS of a cluster that is
    gone: one line naming the address, exit 2, well before Ray's own minute of retries."""
    port = dead_port()
    env = {
        "LMFORGE_HOME": str(tmp_path),
        "RAY_ADDRESS": f"127.0.0.1:{port}",
        "PATH": "/usr/bin:/bin",
    }
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "prepare", "--input", str(REPO / "data" / "shakespeare" / "henry_v.txt"),
         "--output", str(tmp_path / "ds"), "--vocab-size", "300"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], out.stderr[-2000:]
    assert took < 30  # mostly importing torch and Ray; Ray alone retries for minutes


def test_a_driver_outside_a_ray_job_gives_its_job_the_aws_variables(monkeypatch):
    """Ray Train's controller is an actor of the driver's job, not a worker: it reaches S3
    storage only by the job's runtime env, which `_init` sets from this process's AWS_*."""
    from lmforge import storage

    for k in storage.AWS_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert cluster.job_runtime_env() is None  # nothing to hand over
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-for-the-controller")
    assert cluster.job_runtime_env() == {
        "env_vars": {"AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}
    }
    # In a submitted job the job's runtime env has them already (Ray refuses them twice).
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {}}')
    assert cluster.job_runtime_env() is None


def test_the_preemption_watcher_is_off_on_one_node_only_and_a_set_value_stays(monkeypatch):
    """Ray Train reads RAY_TRAIN_ENABLE_PREEMPTION_WATCHER from the driver's environment."""
    from lmforge.training import launch

    var = launch.PREEMPTION_WATCHER
    monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(launch, "_watcher_off_here", False)
    launch.skip_preemption_watcher([{"CPU": 2.0}])
    assert os.environ[var] == "0"
    launch.skip_preemption_watcher([{"CPU": 1.0}, {"CPU": 1.0}])  # same process, 2 nodes
    assert var not in os.environ  # Ray's default (on) again
    monkeypatch.setenv(var, "1")  # the user's choice
    launch.skip_preemption_watcher([{"CPU": 2.0}])
    assert os.environ[var] == "1"
