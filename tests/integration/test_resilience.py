"""Workers SIGKILLed in the middle of a job (between checkpoints, and while a checkpoint is
being written): Ray Train restarts the worker group from the latest checkpoint, the job
finishes, and it ends with the weights of an uninterrupted run and one metric history.
Then that run resumed on one worker instead of two.

Only the killed job is about Ray. The uninterrupted reference and the resume on one worker
run the same launch plan and loop on local gloo ranks (`run_training(..., local=True)`, no
Ray): the reference's role is its weights, data positions and losses, which a local run of
the same seed gives to the bit (checked against a Ray job when this was written: equal
weights); the re-shard is the loop's, and Ray's own re-sharded restarts are test_elastic's.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.checkpoint import WEIGHTS, read_state
from lmforge.config import load_config
from lmforge.tracking import store
from lmforge.tracking.tracker import find_run
from lmforge.training.launch import run_training
from tests.conftest import REPO
from tests.integration.conftest import submit_train

TINY = REPO / "jobs" / "configs" / "tiny.yaml"
STEPS, EVERY = 12, 4
EXPERIMENT = "it-resilience"


def settings(dataset, storage: Path, name: str, steps: int = STEPS, workers: int = 2) -> dict:
    """The run's `--set` overrides of jobs/configs/tiny.yaml."""
    return {
        "data.path": dataset, "run.storage_path": storage, "run.name": name,
        "train.max_steps": steps, "scaling.num_workers": workers, "train.eval_every": EVERY,
        "train.checkpoint_every": EVERY, "train.log_every": 1, "run.max_failures": 2, "zero.stage": 2,
        "tracking.tracking_uri": store.resolve_uri(None), "tracking.experiment": EXPERIMENT,
    }  # fmt: skip


def train_locally(settings: dict):
    """The same plan and loop on local gloo ranks, no Ray (`lmforge train --local`)."""
    return run_training(load_config(TINY, [f"{k}={v}" for k, v in settings.items()]), local=True)


@pytest.fixture(scope="module")
def runs(ray_cluster, dataset, tmp_path_factory, plain_main):
    """The killed job (jobs/train.py through the Jobs API, as `ray job submit` does) and
    its uninterrupted reference (local ranks: see the module's docstring)."""
    storage = tmp_path_factory.mktemp("resilience")
    once = storage / "fault-fired"
    faults = {
        "LMFORGE_FAULT": f"step:6:1,checkpoint:{2 * EVERY}:0",
        "LMFORGE_FAULT_ONCE": str(once),
    }
    hit = submit_train(ray_cluster, settings(dataset, storage, "killed"), faults)
    train_locally(settings(dataset, storage, "uninterrupted"))
    return storage, hit, once


def test_killed_workers_are_restarted_and_the_job_finishes(runs):
    storage, (status, log), once = runs
    assert status == "SUCCEEDED", log[-4000:]
    # Both faults fired: rank 1 after step 6, rank 0 while writing checkpoint 8.
    assert (Path(f"{once}.step-6-1")).exists() and (Path(f"{once}.checkpoint-8-0")).exists()
    assert log.count("fault injection: SIGKILL") == 2
    # Each restart resumed from checkpoint 4: the half-written checkpoint 8 was never used.
    assert log.count(f"resumed from step {EVERY}") == 2, log[-4000:]
    final = storage / "killed" / f"checkpoint_{STEPS:08d}"
    assert read_state(final).step == STEPS


def test_resumed_run_ends_with_the_uninterrupted_weights(runs):
    storage, *_ = runs
    name = f"checkpoint_{STEPS:08d}"
    ref = load_file(str(storage / "uninterrupted" / name / WEIGHTS))
    got = load_file(str(storage / "killed" / name / WEIGHTS))
    assert ref.keys() == got.keys()
    diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert diff < 1e-5, f"max abs weight difference {diff}"
    assert not all(torch.equal(ref[k], torch.zeros_like(ref[k])) for k in ref)
    # Same data seen: the token count and each worker's stream position agree.
    a, b = read_state(storage / "uninterrupted" / name), read_state(storage / "killed" / name)
    assert a.tokens_seen == b.tokens_seen and a.data == b.data
    assert a.metrics["loss"] == pytest.approx(b.metrics["loss"], abs=1e-5)


def test_one_metric_history_and_one_version_per_checkpoint(runs):
    storage, *_ = runs
    client = store.client(store.resolve_uri(None))
    exp = client.get_experiment_by_name(EXPERIMENT)
    ref = find_run(client, exp.experiment_id, str(storage / "uninterrupted"))
    run = find_run(client, exp.experiment_id, str(storage / "killed"))
    assert run is not None and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, STEPS + 1)), steps  # each step once, none missing
    ref_loss = {m.step: m.value for m in client.get_metric_history(ref.info.run_id, "loss")}
    for m in history:  # the replayed steps logged nothing twice, and match the reference
        assert m.value == pytest.approx(ref_loss[m.step], abs=1e-5)
    versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
    assert sorted(int(v.tags["step"]) for v in versions) == [EVERY, 2 * EVERY, STEPS]


def test_a_run_resumes_on_another_number_of_workers(runs, dataset):
    """The recovered 2-worker run, resumed for more steps on one worker: DeepSpeed's ZeRO-2
    state is re-partitioned and the unread rest of both workers' epoch goes to the one.
    (`lmforge train --local --resume`, as a user types it: see the module's docstring.)"""
    storage, *_ = runs
    args = [
        f"--set={k}={v}" for k, v in settings(dataset, storage, "killed", STEPS + EVERY, 1).items()
    ]
    out = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "train", "--local", "--resume", "--config", str(TINY), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "saved by 2 workers, on scaling.num_workers=1" in log  # the launcher says so
    assert "re-sharded: the checkpoint was saved by 2 worker(s), this run has 1" in log
    assert f"resumed from step {STEPS}" in log
    before = read_state(storage / "killed" / f"checkpoint_{STEPS:08d}")
    after = read_state(storage / "killed" / f"checkpoint_{STEPS + EVERY:08d}")
    assert after.world_size == 1 and len(after.data) == 1
    assert after.tokens_seen == before.tokens_seen * (STEPS + EVERY / 2) / STEPS
    position, last = after.data[0], max(p["epoch"] for p in before.data)
    assert position["epoch"] > last or (position["epoch"] == last and "pieces" in position)
    losses = [after.metrics["loss"], before.metrics["loss"]]
    assert all(0 < x < 10 for x in losses), losses  # trains on from the restored state
    ref = load_file(str(storage / "killed" / f"checkpoint_{STEPS:08d}" / WEIGHTS))
    got = load_file(str(storage / "killed" / f"checkpoint_{STEPS + EVERY:08d}" / WEIGHTS))
    assert any(not torch.equal(ref[k], got[k]) for k in ref)
