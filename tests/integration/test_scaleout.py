"""Scale out for real (issue 17): a node lost mid-run. `lmforge cluster up --nodes 3` (a head
with 0 CPUs on 127.0.0.2, worker nodes of 1 CPU on 127.0.0.3 and .4: the session's, `nodes3`),
data and checkpoints in a local S3 API (moto), MLflow on PostgreSQL with its artifacts in S3
(`lmforge tracking up`). The run trains uninterrupted on 2 local processes (`lmforge train
--local`: the same Trainer, data and seed without Ray, the reference weights); on the
cluster a 2-worker STRICT_SPREAD run of it loses one worker node to SIGKILL (its raylet and
every process it runs) after a checkpoint reached S3; STRICT_SPREAD needs a second node
again, so `lmforge cluster add-node` starts a replacement, and Ray Train restarts the worker
group there from the last checkpoint in S3. It ends with one MLflow run, one version per
checkpoint, and the uninterrupted weights. Then a third run meets the S3 API hanging (moto
SIGSTOPped) while checkpoint 8 is written (LMFORGE_FAULT_HOLD holds rank 0 there while the
test stops the store): that checkpoint fails cleanly, the run restarts from checkpoint 4
once the store answers, and finishes with the uninterrupted weights. Everything goes through
the CLI, in the cluster's LMFORGE_HOME, as a user runs it.

    flock /tmp/lmforge-ray.lock .venv/bin/pytest tests/integration/test_scaleout.py -q
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import psutil
import pytest
from safetensors.torch import load as load_safetensors

from lmforge import cluster, storage
from lmforge.checkpoint import WEIGHTS, incomplete, latest_in_run, read_state
from lmforge.services import free_port
from lmforge.tracking import store
from lmforge.tracking.tracker import find_run
from tests.conftest import CORPUS, REPO
from tests.integration.conftest import cli_env, lmforge
from tests.pgserver import pg_server

STEPS, EVERY = 12, 4  # checkpoints 4 (the resume point), 8 (lost to the store), 12
EXPERIMENT = MODEL = "it-scaleout"
RANK_LINE = re.compile(r"rank (\d) on node [0-9a-f]{12} \((127\.0\.0\.\d+)\)")
# Rank 0 prints where each rank runs: (rank 0's pid, rank, node address).
PLACED = re.compile(r"pid=(\d+)\D.*?rank (\d) on node [0-9a-f]{12} \((127\.0\.0\.\d+)\)")


def worker_groups(log: str) -> list[dict[str, str]]:
    """Each worker group's {rank: node address}, in the order they started."""
    groups: dict[str, dict[str, str]] = {}
    for pid, rank, ip in PLACED.findall(log):
        groups.setdefault(pid, {})[rank] = ip
    return list(groups.values())


def resumed_steps(log: str) -> set[int]:
    return {int(x) for x in re.findall(r"resumed from step (\d+)", log)}


@pytest.fixture(scope="module")
def scaled(s3_server, nodes3):
    """The session's 3-node cluster (`nodes3`), PostgreSQL, `lmforge tracking up` over it
    with artifacts in S3, and a dataset prepared into the bucket; this process reaches the
    bucket as the jobs do (the standard AWS_* variables, which each run hands its workers
    through Ray's runtime env: the nodes were started without them)."""
    home = nodes3.home
    # The train log is read while it runs; lines are told apart by the worker's pid, and
    # Ray's folding of like lines of several workers into "[repeated 2x ...]" is off.
    env = {**nodes3.env, **s3_server.env, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    with contextlib.ExitStack() as stack, pytest.MonkeyPatch.context() as mp:
        for key in storage.AWS_ENV:
            mp.delenv(key, raising=False)
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        storage.configure(None)
        pg = stack.enter_context(pg_server())
        port = free_port()
        lmforge(home, "tracking", "up", "--port", port, "--backend-store-uri", pg.uri,
                "--artifacts-destination", s3_server.uri("scaleout", "mlflow"), env=env)  # fmt: skip
        stack.callback(lmforge, home, "tracking", "down", check=False, env=env)
        data = s3_server.uri("scaleout", "ds")
        lmforge(home, "prepare", "--input", CORPUS / "twelfth_night.txt", "--output", data,
                "--vocab-size", 300, "--seq-tokens", 64, "--rows-per-group", 4, env=env)  # fmt: skip
        yield SimpleNamespace(
            home=home, env=env, data=data, runs=s3_server.uri("scaleout", "runs"),
            tracking=f"http://127.0.0.1:{port}", state=nodes3.state, nodes=nodes3,
        )  # fmt: skip


def train_args(s, name: str, **overrides) -> list[str]:
    settings = {
        "data.path": s.data, "run.storage_path": s.runs, "run.name": name,
        "scaling.num_workers": 2, "scaling.placement_strategy": "STRICT_SPREAD",
        "run.max_failures": 2, "train.max_steps": STEPS, "train.checkpoint_every": EVERY,
        "train.eval_every": EVERY, "train.eval_steps": 1, "train.log_every": 1,
        "train.warmup_steps": 1, "tracking.tracking_uri": s.tracking,
        "tracking.experiment": EXPERIMENT, "tracking.registered_model": MODEL, **overrides,
    }  # fmt: skip
    args = ["train", "--config", REPO / "jobs" / "configs" / "tiny.yaml"]
    for k, v in settings.items():
        args += ["--set", f"{k}={v}"]
    return [str(a) for a in args]


def node_processes(home, i: int, ip: str) -> list[psutil.Process]:
    """Every process of worker node `i`: its `ray start`, the raylet and all they started
    (the node's Ray workers among them), and anything else bound to the node's address."""
    root = psutil.Process(json.loads((home / f"cluster-node-{i}.json").read_text())["pid"])
    found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if f"--node-ip-address={ip}" in cmd or f"--node_ip_address={ip}" in cmd:
            found.setdefault(p.pid, p)
    return list(found.values())


def wait_for(pattern: re.Pattern, log_file, proc, timeout_s: float) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while True:
        text = log_file.read_text(errors="replace")
        if m := pattern.search(text):
            return m
        assert proc.poll() is None, f"the run ended first: {text[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern.pattern!r} in: {text[-3000:]}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def runs(scaled):
    s = scaled
    suffix = uuid.uuid4().hex[:8]  # Train V2 resumes a run of the same name
    ref_name, lost_name = f"ref-{suffix}", f"lost-{suffix}"
    # The uninterrupted reference: the same run on 2 local processes (`train --local`: the
    # same Trainer, data and seed, no Ray), reading the same data from S3; its checkpoints
    # in a local dir, as a local run keeps them.
    started = time.monotonic()
    ref_root = s.home / "local-runs"
    local = {"run.storage_path": ref_root, "tracking.enabled": "false"}
    ref = lmforge(s.home, *train_args(s, ref_name, **local), "--local", timeout=420, env=s.env)
    ref_s = time.monotonic() - started

    log_file = s.home / "lost.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli", *train_args(s, lost_name)],
            stdout=out, stderr=subprocess.STDOUT, env=cli_env(s.home, s.env),
            start_new_session=True,
        )  # fmt: skip
    try:
        # After the first checkpoint is in S3 and in Ray's record of the run: kill the node
        # of rank 1 (not the driver's: the driver runs in this process's child, on no node).
        # Rank 0 says so once every rank's copy is in S3, a moment before Ray Train's
        # controller records it (the restart point): wait for the record too.
        wait_for(re.compile(rf"checkpoint step {EVERY} ->"), log_file, proc, 300)
        run_dir = storage.resolve(s.runs) / lost_name
        deadline = time.monotonic() + 60
        while (recorded := latest_in_run(run_dir)) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "no recorded checkpoint"
            time.sleep(0.2)
        before_kill = read_state(recorded).step
        placed = dict(RANK_LINE.findall(log_file.read_text()))
        victim_ip = placed["1"]
        i = int(victim_ip.rsplit(".", 1)[1]) - 2  # node_ip(i) = 127.0.0.{i + 2}
        (node,) = [
            n for n in cluster.state_list(s.state["dashboard_url"], "nodes")
            if n["node_ip"] == victim_ip and n["state"] == "ALIVE"
        ]  # fmt: skip
        train_workers = {
            a["pid"] for a in cluster.state_list(s.state["dashboard_url"], "actors")
            if a["node_id"] == node["node_id"] and a["state"] == "ALIVE"
            and cluster.TRAIN_WORKER in a["class_name"]
        }  # fmt: skip
        victims = node_processes(s.home, i, victim_ip)
        for p in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        step_at_kill = max(int(x) for x in re.findall(r"step\s+(\d+)/", log_file.read_text()))
        # STRICT_SPREAD needs 2 nodes: a new one, started as the others were
        added = lmforge(s.home, "cluster", "add-node", env=s.nodes.env)
        proc.wait(timeout=420)
    finally:
        if proc.poll() is None:
            proc.kill()
    lost_s = time.monotonic() - killed_at
    return SimpleNamespace(
        ref=ref, ref_dir=ref_root / ref_name, ref_s=ref_s, name=lost_name, rc=proc.returncode,
        log=log_file.read_text(), before_kill=before_kill, step_at_kill=step_at_kill,
        victim_ip=victim_ip, node=node, train_workers=train_workers,
        killed={p.pid for p in victims}, added=added.stdout, lost_s=lost_s,
    )  # fmt: skip


def test_the_lost_node_was_killed_and_replaced(scaled, runs):
    assert runs.rc == 0, runs.log[-5000:]
    # The kill hit the node's Ray Train worker, and the run was mid-way then.
    assert runs.train_workers and runs.train_workers <= runs.killed
    assert runs.step_at_kill < STEPS, runs.log[-3000:]
    nodes = {
        n["node_id"]: n for n in cluster.state_list(scaled.state["dashboard_url"], "nodes")
    }  # fmt: skip
    assert nodes[runs.node["node_id"]]["state"] == "DEAD"
    assert "started a worker node on 127.0.0.5" in runs.added
    alive = sorted(n["node_ip"] for n in nodes.values() if n["state"] == "ALIVE")
    assert alive == ["127.0.0.2", "127.0.0.3" if runs.victim_ip != "127.0.0.3" else "127.0.0.4",
                     "127.0.0.5"]  # fmt: skip
    # Two worker groups, each spread over two nodes; the second on the survivor and the
    # replacement.
    groups = worker_groups(runs.log)
    assert len(groups) >= 2 and all(len(g) == 2 for g in groups), groups
    assert set(groups[0].values()) == {"127.0.0.3", "127.0.0.4"}
    survivor = ({"127.0.0.3", "127.0.0.4"} - {runs.victim_ip}).pop()
    assert set(groups[-1].values()) == {survivor, "127.0.0.5"}, groups


def test_the_job_finishes_from_the_last_checkpoint_in_s3(scaled, runs):
    assert runs.rc == 0, runs.log[-5000:]
    (resumed,) = resumed_steps(runs.log)
    # Ray's record in S3 had checkpoint `before_kill` when the node died; a later one may
    # have been recorded before the kill took effect, never one past the last step run.
    assert resumed % EVERY == 0 and runs.before_kill <= resumed <= runs.step_at_kill
    assert resumed >= EVERY
    final = storage.resolve(scaled.runs) / runs.name / f"checkpoint_{STEPS:08d}"
    assert read_state(final).step == STEPS and read_state(final).world_size == 2


def test_one_mlflow_run_and_one_version_per_checkpoint(scaled, runs):
    assert runs.rc == 0, runs.log[-5000:]
    client = store.client(scaled.tracking)
    exp = client.get_experiment_by_name(EXPERIMENT)
    run_dir = str(storage.resolve(scaled.runs) / runs.name)
    found = client.search_runs([exp.experiment_id], f"tags.`lmforge.run_dir` = '{run_dir}'")
    assert len(found) == 1, [r.info.run_id for r in found]
    run = find_run(client, exp.experiment_id, run_dir)
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(1, STEPS + 1)), steps  # each step once, none missing
    versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
    assert sorted(int(v.tags["step"]) for v in versions) == list(range(EVERY, STEPS + 1, EVERY))
    for v in versions:
        assert v.tags["ray_checkpoint_uri"] == f"{run_dir}/checkpoint_{int(v.tags['step']):08d}"


def test_the_final_weights_equal_the_uninterrupted_runs(scaled, runs):
    assert runs.rc == 0, runs.log[-5000:]
    root, name = storage.resolve(scaled.runs), f"checkpoint_{STEPS:08d}"
    ref = load_safetensors((runs.ref_dir / name / WEIGHTS).read_bytes())
    got = load_safetensors((root / runs.name / name / WEIGHTS).read_bytes())
    assert ref.keys() == got.keys()
    diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert diff < 1e-5, f"max abs weight difference {diff}"
    a = read_state(runs.ref_dir / name)
    b = read_state(root / runs.name / name)
    assert a.tokens_seen == b.tokens_seen and a.data == b.data


def test_the_object_store_down_during_a_checkpoint(scaled, runs, s3_server):
    """The S3 API hangs (moto SIGSTOPped: every request times out) while checkpoint 8 is
    being written: it fails cleanly (not in Ray's record, not registered, not the resume
    point), checkpoint 4 stays good, the worker group restarts once the store is back and
    the run ends with the uninterrupted weights."""
    s, name = scaled, f"s3down-{uuid.uuid4().hex[:8]}"
    flag, bad = s.home / "hold", 2 * EVERY
    env = {**s.env, "LMFORGE_FAULT": f"checkpoint:{bad}:0",
           "LMFORGE_FAULT_ONCE": str(s.home / "once"), "LMFORGE_FAULT_HOLD": str(flag)}  # fmt: skip
    log_file = s.home / "s3down.log"
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lmforge.cli", *train_args(s, name)],
            stdout=out, stderr=subprocess.STDOUT, env=cli_env(s.home, env),
            start_new_session=True,
        )  # fmt: skip
    stopped = False
    try:
        deadline = time.monotonic() + 300
        while not flag.exists():  # rank 0 holds in the middle of writing checkpoint 8
            assert proc.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.2)
        workers = {
            a["actor_id"] for a in cluster.state_list(s.state["dashboard_url"], "actors")
            if a["state"] == "ALIVE" and cluster.TRAIN_WORKER in a["class_name"]
        }  # fmt: skip
        assert len(workers) == 2
        os.killpg(s3_server.pid, signal.SIGSTOP)
        stopped = True
        down_at = time.monotonic()
        flag.unlink()  # go on: the checkpoint's upload meets a store that does not answer
        while True:  # until that worker group is gone (its upload failed)
            states = {
                a["actor_id"]: a["state"]
                for a in cluster.state_list(s.state["dashboard_url"], "actors")
            }  # fmt: skip
            if all(states.get(w) == "DEAD" for w in workers):
                break
            assert proc.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < down_at + 180, log_file.read_text()[-3000:]
            time.sleep(0.5)
        down_s = time.monotonic() - down_at
        os.killpg(s3_server.pid, signal.SIGCONT)
        stopped = False
        proc.wait(timeout=420)
    finally:
        if stopped:
            os.killpg(s3_server.pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    log = log_file.read_text()
    assert proc.returncode == 0, log[-5000:]
    assert f"holds at checkpoint {bad}" in log and down_s > 0
    # The restart resumed from checkpoint 4, which is complete in S3; checkpoint 8's
    # version came only from the rerun after it.
    (resumed,) = resumed_steps(log)
    assert resumed == EVERY, log[-4000:]
    root = storage.resolve(s.runs) / name
    assert incomplete(root / f"checkpoint_{EVERY:08d}") is None
    assert log.index("resumed from step") < log.index(f"(step {bad})")
    client = store.client(s.tracking)
    exp = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs([exp.experiment_id], f"tags.`lmforge.run_dir` = '{root}'")
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    versions = client.search_model_versions(f"run_id='{found[0].info.run_id}'")
    assert sorted(int(v.tags["step"]) for v in versions) == list(range(EVERY, STEPS + 1, EVERY))
    ckpt = f"checkpoint_{STEPS:08d}"
    ref = load_safetensors((runs.ref_dir / ckpt / WEIGHTS).read_bytes())
    got = load_safetensors((root / ckpt / WEIGHTS).read_bytes())
    diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert diff < 1e-5, f"max abs weight difference {diff}"
