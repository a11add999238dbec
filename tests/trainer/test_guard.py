"""The guard (`train.guard`, `lmforge.guard`) on 2 local gloo ranks with fault injection:
a NaN rolls the run back to its last sound checkpoint and skips the data window that led
to it, ending with the weights of a run that never saw that window; `stop` ends the job
with the message and a non-zero status; each event is logged once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from lmforge.checkpoint import LOCAL_RECORD, read_state, seal
from lmforge.guard.watch import RECORD
from lmforge.tracking import store
from tests.conftest import REPO
from tests.trainer.conftest import tiny_config, train

GUARD = "train.guard={nonfinite: rollback, max_rollbacks: 2, skip_batches: true}"
COMMON = ["train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4", "zero.stage=2"]


def test_a_nan_rolls_back_skips_its_window_and_ends_as_if_never_seen(dataset, monkeypatch):
    monkeypatch.setenv("LMFORGE_FAULT", "nan:step:6")
    guarded = train(tiny_config(dataset, "guarded", *COMMON, GUARD))
    monkeypatch.delenv("LMFORGE_FAULT")
    run = guarded.run_dir
    (rollback,) = json.loads((run / RECORD).read_text())["rollbacks"]
    assert (rollback["step"], rollback["rolled_back_to"]) == (6, 4)
    assert rollback["reason"] == "non-finite loss"
    assert rollback["skipped_tokens"] == [4 * 1024, 6 * 1024]  # steps 5..6 of 1,024 tokens
    final = read_state(guarded.checkpoint)
    assert final.step == 8 and [r["n"] for r in final.guard["rollbacks"]] == [1]
    # The reference: the same checkpoint of step 4, its stream moved past steps 5..6 (where
    # the rollback left it), resumed without any guard or fault.
    ref = guarded.run_dir.parent / "never-saw-it"
    ref.mkdir()
    shutil.copytree(run / "checkpoint_00000004", ref / "checkpoint_00000004")
    state_file = ref / "checkpoint_00000004" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["data"] = rollback["positions"]
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    seal(ref / "checkpoint_00000004")
    (ref / LOCAL_RECORD).write_text(json.dumps({"checkpoints": ["checkpoint_00000004"]}))
    clean = train(tiny_config(dataset, "never-saw-it", *COMMON), resume=True)
    a = load_file(guarded.checkpoint / "model.safetensors")
    b = load_file(clean.checkpoint / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst

    # MLflow: one rollback event (metric point and tag), every step's loss logged once,
    # finite, and both checkpoints registered.
    client = store.client(store.resolve_uri(None))
    run_id = guarded.mlflow_run_id
    events = client.get_metric_history(run_id, "guard/rollbacks")
    assert [(p.step, p.value) for p in events] == [(6, 1.0)]
    tag = json.loads(client.get_run(run_id).data.tags["guard/event/1"])
    assert tag["step"] == 6 and tag["skipped_tokens"] == [4096, 6144] and "positions" not in tag
    steps = [p.step for p in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, 9)), steps  # nothing logged twice
    history = [m for m in guarded.history if "loss" in m]
    # Reported to the session: the trigger step is not (it was rolled back), then 5..8.
    assert [m["step"] for m in history] == [1, 2, 3, 4, 5, 5, 6, 7, 8]


def test_stop_ends_the_job_with_the_message_and_a_nonzero_status(dataset, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {"LMFORGE_HOME": str(tmp_path / "home"), "LMFORGE_FAULT": "nan:step:3"}
    out = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "train", "--local", "--config",
         "jobs/configs/tiny.yaml", "--set", f"data.path={dataset}", "--set", "run.name=stops",
         "--set", "tracking.enabled=false", "--set", "train.max_steps=4", "--set",
         "train.warmup_steps=0", "--set", "train.log_every=1", "--set",
         "train.checkpoint_every=2", "--set", "train.guard={nonfinite: stop}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode != 0, log[-3000:]
    assert "guard: non-finite loss at step 3 (loss nan" in log, log[-3000:]
    assert "train.guard.nonfinite=stop" in log
    run = tmp_path / "home" / "runs" / "stops"
    assert json.loads((run / LOCAL_RECORD).read_text())["checkpoints"] == ["checkpoint_00000002"]


def test_a_spike_rolls_back_and_scales_the_lr(dataset, monkeypatch):
    monkeypatch.setenv("LMFORGE_FAULT", "spike:step:4:50")
    guard = ("train.guard={spike: {factor: 3, window: 2}, max_rollbacks: 1, "
             "lr_scale_after: 0.5}")  # fmt: skip
    run = train(tiny_config(dataset, "spiky", "train.max_steps=5", "train.checkpoint_every=2",
                            "train.eval_every=100", guard))  # fmt: skip
    (rollback,) = json.loads((run.run_dir / RECORD).read_text())["rollbacks"]
    assert (rollback["reason"], rollback["step"], rollback["rolled_back_to"]) == (
        "loss spike", 4, 2,
    )  # fmt: skip
    lrs = [(m["step"], m["lr"]) for m in run.history if "lr" in m]
    first, again = dict(lrs[:3]), dict(lrs[3:])  # steps 1..3, then 3..5 after the rollback
    assert list(first) == [1, 2, 3] and list(again) == [3, 4, 5]
    assert again[3] == pytest.approx(first[3] * 0.5, rel=1e-9)
    assert read_state(run.checkpoint).step == 5


def test_a_rollback_to_a_checkpoint_of_more_workers_reshards_it(dataset, monkeypatch):
    """An elastic run that lost a worker rolls back to a checkpoint the 2 workers saved: it
    is loaded re-sharded (DeepSpeed's universal checkpoint) and training goes on exactly as
    a plain 1-worker resume from that checkpoint does."""
    common = ["train.checkpoint_every=2", "train.eval_every=100", "train.warmup_steps=0"]
    two = train(tiny_config(dataset, "wide", "train.max_steps=2", *common))
    assert read_state(two.checkpoint).world_size == 2
    ref_dir = two.run_dir.parent / "wide-ref"
    ref_dir.mkdir()
    shutil.copytree(two.checkpoint, ref_dir / two.checkpoint.name)
    (ref_dir / LOCAL_RECORD).write_text(json.dumps({"checkpoints": [two.checkpoint.name]}))

    narrow = [*common, "train.max_steps=4", "scaling.num_workers=1"]
    monkeypatch.setenv("LMFORGE_FAULT", "nan:step:3")
    guarded = train(tiny_config(dataset, "wide", *narrow,
                                "train.guard={nonfinite: rollback, max_rollbacks: 1, "
                                "skip_batches: false}"),
                    resume=True)  # fmt: skip
    monkeypatch.delenv("LMFORGE_FAULT")
    (rollback,) = json.loads((guarded.run_dir / RECORD).read_text())["rollbacks"]
    assert (rollback["step"], rollback["rolled_back_to"]) == (3, 2)
    assert read_state(guarded.checkpoint).step == 4
    # Steps 1..2 were of 2 workers (1,024 tokens each), step 3 of one (512).
    assert rollback["skipped_tokens"] is None and read_state(guarded.checkpoint).tokens_seen == (
        2 * 1024 + 2 * 512
    )

    clean = train(tiny_config(dataset, "wide-ref", *narrow), resume=True)
    a = load_file(guarded.checkpoint / "model.safetensors")
    b = load_file(clean.checkpoint / "model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
