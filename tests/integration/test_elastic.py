"""Elastic workers: `scaling.num_workers: [1, 2]` on `lmforge cluster up --nodes 3` (a head
with 0 CPUs, two worker nodes of 1 CPU: the session's, `nodes3`). One worker node is
SIGKILLed mid-run (its raylet and its workers); the job goes on with one worker from the
latest checkpoint, grows back to two when the node joins again, and finishes. The
checkpoints' stream positions, replayed by the stream itself with each token replaced by its
place in the split, show that no token was a target twice across the 2 -> 1 -> 2 re-deals;
the job log and MLflow say how many workers trained when, each step once although each
restart replays a step MLflow already has.

    flock /tmp/lmforge-ray.lock .venv/bin/pytest tests/integration/test_elastic.py -q
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import psutil
import pytest

from lmforge.checkpoint import RAY_RECORD, CheckpointError, read_state
from lmforge.data.dataset import Dataset
from lmforge.data.stream import TokenStream
from tests.conftest import REPO
from tests.integration.conftest import cli_env

TINY = REPO / "jobs" / "configs" / "tiny.yaml"
STEPS, EVERY, BATCH = 12, 4, 2
# Rank 0 holds (LMFORGE_FAULT_HOLD) right after these steps until its worker group is gone:
# the 2-worker group one step after checkpoint 4, while its node is killed; the 1-worker
# group one step after checkpoint 8, while the node joins again and Ray Train grows the
# group back. Each group logged the step before: the next group replays it from the
# checkpoint and must not log it again.
HOLDS = (EVERY + 2, 2 * EVERY + 2)


def kill_node(home, i: int) -> int:
    """SIGKILL worker node i's `ray start` and everything under it (raylet, its workers)."""
    pid = json.loads((home / f"cluster-node-{i}.json").read_text())["pid"]
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    return len(procs)


def logged_steps(uri: str, run_dir) -> set[int]:
    """The steps MLflow has the run's `workers` metric for (none before the run exists)."""
    from lmforge.tracking import store

    client = store.client(uri)
    exp = client.get_experiment_by_name("lmforge")
    if exp is None:
        return set()
    found = client.search_runs(
        [exp.experiment_id], f"tags.`lmforge.run_dir` LIKE '%{run_dir.name}'"
    )  # fmt: skip
    return {m.step for r in found for m in client.get_metric_history(r.info.run_id, "workers")}


def stretches(values: list[int]) -> list[int]:
    """[2, 2, 1, 1, 2] -> [2, 1, 2]."""
    return [v for v, _ in itertools.groupby(values)]


def checkpoints(run_dir) -> dict[int, object]:
    """step -> trainer state of each checkpoint Ray Train has recorded (the ones a restart
    resumes from; a dir written but not yet reported is not one)."""
    try:
        record = json.loads((run_dir / RAY_RECORD).read_text())
    except (OSError, ValueError):  # none yet, or being rewritten
        return {}
    out = {}
    for name in {r["checkpoint_dir_name"] for r in record["checkpoint_results"]}:
        try:
            state = read_state(run_dir / name)
        except CheckpointError:
            continue
        out[state.step] = state
    return out


class PlaceStream(TokenStream):
    """The run's own stream over its dataset, each token replaced by its place in the split
    (unit index * 10^7 + token index), so a target names where in the data it is."""

    def _read(self, unit):
        i = next(k for k, u in enumerate(self.units) if u is unit)
        return np.arange(unit.tokens, dtype=np.int64) + i * 10**7


def replay(ds: Dataset, states: dict[int, object], seed: int) -> list[int]:
    """Every target the run trained on, from step 0 through each checkpoint in turn: the
    workers of a checkpoint resume from the one before it (re-dealt when saved by another
    number of workers) and must reach exactly its positions in its steps' batches."""
    steps = sorted(states)
    first = states[steps[0]].world_size
    prev_step, prev = 0, [{"epoch": 0, "offset": 0}] * first
    targets: list[int] = []
    for step in steps:
        state = states[step]
        for rank in range(state.world_size):
            s = PlaceStream(ds, "train", 64, BATCH, rank, state.world_size, seed=seed)
            s.resume(prev)
            it = s.batches()
            for _ in range(step - prev_step):  # grad_accum_steps = 1
                targets += next(it)[1].flatten().tolist()
            assert s.state_dict() == state.data[rank], (step, rank)
        prev_step, prev = step, state.data
    return targets


@pytest.fixture(scope="module")
def elastic_run(nodes3, nodes3_dataset):
    home = nodes3.home
    name = f"elastic-{uuid.uuid4().hex[:8]}"  # Train V2 resumes a run of the same name
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    sets = {
        "data.path": nodes3_dataset, "run.name": name, "run.shared_filesystem": "true",
        "tracking.tracking_uri": uri, "scaling.num_workers": "[1,2]",
        "scaling.elastic_resize_interval_s": 3, "run.max_failures": 3,
        "train.max_steps": STEPS, "train.checkpoint_every": EVERY, "train.eval_every": STEPS,
        "train.eval_steps": 1, "train.log_every": 1, "train.micro_batch_size": BATCH,
        "train.warmup_steps": 1,
    }  # fmt: skip
    args = [sys.executable, "-m", "lmforge.cli", "train", "--config", TINY]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    hold = home / "elastic-hold"
    env = {
        **cli_env(home, nodes3.env), "PYTHONUNBUFFERED": "1",
        "LMFORGE_FAULT": ",".join(f"step:{step}:0" for step in HOLDS),
        "LMFORGE_FAULT_HOLD": str(hold), "LMFORGE_FAULT_ONCE": str(home / "elastic-once"),
    }  # fmt: skip
    # After the kill Ray Train asks for 2 workers again as long as its view of the cluster
    # (Ray Data's AutoscalingCoordinator, refreshed every 20 s) has the dead node, waits this
    # long for their placement (default 60 s), and decides again: a retry without limit, not
    # one of run.max_failures. A placement the cluster has room for is not waited for, but
    # its workers must start within it: 3 s was too short with the other test worker busy.
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "10"
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    run_dir = home / "runs" / name
    started = time.monotonic()

    def wait_for(what, ok, timeout_s):
        deadline = time.monotonic() + timeout_s
        while not ok():
            assert proc.poll() is None, f"job ended before {what}: {''.join(lines)[-4000:]}"
            assert time.monotonic() < deadline, f"no {what}: {''.join(lines)[-4000:]}"
            time.sleep(0.5)
        return time.monotonic() - started

    def held_by(n: int, step: int):
        """Checkpoint step - 2 recorded, by n workers, and step - 1 in MLflow: rank 0 holds
        at `step` (it cannot pass it while this test runs)."""
        return lambda: (
            (c := checkpoints(run_dir)).get(step - 2) is not None
            and c[step - 2].world_size == n and step - 1 in logged_steps(uri, run_dir)
        )  # fmt: skip

    try:
        t_two = wait_for("2 workers at the first hold", held_by(2, HOLDS[0]), 240)
        killed = kill_node(home, 2)
        t_one = wait_for("1 worker at the second hold", held_by(1, HOLDS[1]), 180)
        nodes3.restore()  # worker node 2 joins again, on its address
        t_back = wait_for("2-worker checkpoint after the 1-worker ones", lambda: (
            (c := checkpoints(run_dir)) and c[max(c)].world_size == 2 and
            any(s.world_size == 1 for s in c.values())), 180)  # fmt: skip
        proc.wait(timeout=300)
        reader.join(timeout=10)
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
    log = "".join(lines)
    (home / "elastic.log").write_text(log)  # the whole job log, to read when a check fails
    print(f"2 workers at {t_two:.0f}s, killed {killed} processes, 1 worker at {t_one:.0f}s, "
          f"2 again at {t_back:.0f}s, done at {time.monotonic() - started:.0f}s")  # fmt: skip
    return home, run_dir, uri, proc.returncode, log


def test_the_job_goes_on_with_fewer_workers_and_grows_back(elastic_run):
    home, run_dir, uri, rc, log = elastic_run
    assert rc == 0, log[-4000:]
    assert "elastic: 1 to 2 workers" in log and "the global batch follows the worker count" in log
    worlds = [int(w) for w in re.findall(r"on (\d) worker\(s\), ZeRO", log)]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds  # 2, then 1, then 2
    assert "re-sharded: the checkpoint was saved by 2 worker(s), this run has 1" in log
    assert "re-sharded: the checkpoint was saved by 1 worker(s), this run has 2" in log
    states = checkpoints(run_dir)
    assert max(states) == STEPS
    sizes = [states[s].world_size for s in sorted(states)]
    assert stretches(sizes) == [2, 1, 2], sizes  # checkpoints by 2 workers, then 1, then 2

    from lmforge.tracking import store

    client = store.client(uri)
    exp = client.get_experiment_by_name("lmforge")
    (run,) = client.search_runs(
        [exp.experiment_id], f"tags.`lmforge.run_dir` LIKE '%{run_dir.name}'"
    )
    assert run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.info.run_id, "workers"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, STEPS + 1))  # each step once
    by_step = [int(m.value) for m in history]
    assert stretches(by_step) == [2, 1, 2], by_step
    # Where the holds put the resizes: the step each restart replayed keeps the worker count
    # of its first run (MLflow had it; not logged again).
    first, second = HOLDS
    assert by_step == [2] * (first - 1) + [1] * (second - first) + [2] * (STEPS - second + 1)


def test_no_token_is_a_target_twice_across_the_resizes(elastic_run, nodes3_dataset):
    home, run_dir, *_ = elastic_run
    states = checkpoints(run_dir)
    assert all(p["epoch"] == 0 for s in states.values() for p in s.data)  # within one epoch
    targets = replay(Dataset(nodes3_dataset), states, seed=1337)
    assert len(targets) == len(set(targets)), len(targets) - len(set(targets))
    assert len(targets) == states[STEPS].tokens_seen
