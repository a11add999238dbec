"""The guard's decisions (`lmforge.guard`) on synced step numbers, the loss faults that
drive its trainer tests (`lmforge.faults`), and the Runs page's reading of its events;
the rollbacks themselves are tests/trainer/test_guard.py's."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge import faults
from lmforge.config import ConfigError, GuardConfig, config_from_dict
from lmforge.dist import DistInfo
from lmforge.errors import UsageError
from lmforge.guard import Guard, GuardStop, raise_if_stopped
from lmforge.tracking.browse import RunRow, guard_events


class Recorder:
    def __init__(self):
        self.metrics, self.tags = [], {}

    def log_metrics(self, step, metrics):
        self.metrics.append((step, metrics))

    def set_tags(self, tags):
        self.tags.update(tags)


def guard(tmp_path, said=None, **cfg):
    info = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    return Guard(
        GuardConfig(**cfg), tmp_path, info, Recorder(), (said if said is not None else []).append
    )


def steps(*losses, grad=1.0):
    return [{"step": i + 1, "loss": x, "grad_norm": grad} for i, x in enumerate(losses)]


def test_nonfinite_triggers_at_its_step_and_off_does_not(tmp_path):
    g = guard(tmp_path)
    assert g.observe(steps(3.0, 2.9, 2.8)) is None
    event = g.observe(steps(2.7, math.nan, 2.6))
    assert event.step == 2 and event.reason == "non-finite loss"
    assert g.observe(steps(2.0, grad=math.inf)).reason == "non-finite loss"
    assert g.observe(steps(2.0, grad=math.nan)) is None  # an unreported norm is not a trigger
    assert guard(tmp_path, nonfinite="off").observe(steps(math.inf)) is None


def test_a_spike_is_a_loss_above_factor_times_the_window_median(tmp_path):
    g = guard(tmp_path, spike={"factor": 2.0, "window": 3})
    assert g.observe(steps(9.0, 3.0, 3.0)) is None  # fewer than `window` steps: no median yet
    assert g.observe(steps(3.1)) is None
    event = g.observe([{"step": 9, "loss": 6.5, "grad_norm": 1.0}])
    assert event.step == 9 and event.reason == "loss spike" and "median" in event.detail


def test_stop_and_used_up_rollbacks_say_why_and_where(tmp_path):
    said: list[str] = []
    g = guard(tmp_path, said, nonfinite="stop")
    with pytest.raises(GuardStop, match=r"guard: non-finite loss at step 7 .*nonfinite=stop"):
        g.act(g.observe(steps(*[1.0] * 6, math.nan)), trainer=None)
    assert said and g.tracker.tags["guard/stopped"].startswith("guard: non-finite loss at step 7")
    # Recorded for the launcher, which ends the job with it (the workers end without error).
    with pytest.raises(GuardStop, match="at step 7"):
        raise_if_stopped(tmp_path)
    g = guard(tmp_path, max_rollbacks=0)
    with pytest.raises(GuardStop, match=r"after 0 rollback\(s\) \(train.guard.max_rollbacks=0\)"):
        g.act(g.observe(steps(math.nan)), trainer=None)
    g = guard(tmp_path)  # no checkpoint in the run dir yet
    with pytest.raises(GuardStop, match="no sound checkpoint before it"):
        g.act(g.observe(steps(math.nan)), trainer=None)


def test_guard_config_is_checked():
    cfg = config_from_dict({"train": {"guard": {"spike": {"factor": 3, "window": 10}}}})
    assert cfg.train.guard.nonfinite == "rollback" and cfg.train.guard.spike.window == 10
    with pytest.raises(ConfigError, match="train.guard.lr_scale_after"):
        config_from_dict({"train": {"guard": {"lr_scale_after": 2}}})
    with pytest.raises(ConfigError, match="train.guard.nonfinite"):
        config_from_dict({"train": {"guard": {"nonfinite": "panic"}}})


def test_loss_faults_fire_once_where_asked(monkeypatch):
    monkeypatch.setattr(faults, "_fired", set())
    monkeypatch.setenv("LMFORGE_FAULT", "nan:step:3,spike:step:5:10,step:9:1")
    assert faults.parse("nan:step:3,spike:step:5:10,step:9:1") == [("step", 9, 1)]
    one = torch.tensor(1.5)
    assert faults.corrupt_loss(one, 3, rank=1) == one  # nan: rank 0's
    assert math.isnan(faults.corrupt_loss(one, 3, rank=0))
    assert faults.corrupt_loss(one, 3, rank=0) == one  # fired once: a rolled-back step is not hit
    assert faults.corrupt_loss(one, 5, rank=1) == 15.0
    with pytest.raises(UsageError, match="spike:step:<step>:<factor>"):
        faults.parse_loss("spike:step:5")


def test_the_runs_page_reads_the_events_from_the_tags():
    event = {"n": 1, "step": 6, "reason": "loss spike", "rolled_back_to": 4}
    row = RunRow("r", "run", "exp", "FAILED", None, None, {}, {
        "guard/event/1": json.dumps(event),
        "guard/stopped": "guard: non-finite loss at step 9 (loss nan); train.guard...",
    })  # fmt: skip
    assert guard_events(row) == [
        (6, "rollback 1: loss spike -> step 4"),
        (9, "stopped: guard: non-finite loss at step 9 (loss nan)"),
    ]


def test_the_runs_page_offers_a_mixtures_per_source_curves():
    from lmforge.tracking.browse import source_curves, source_val_curves

    metrics = {"loss": 1.0, "val_loss": 2.0, "val_loss/code": 2.1, "val_perplexity/code": 8.0,
               "data/code/tokens": 512.0, "val_loss/books": 1.9}  # fmt: skip
    rows = [RunRow("r", "run", "exp", "RUNNING", None, None, metrics)]
    keys = source_curves(rows)
    assert keys == ["data/code/tokens", "val_loss/books", "val_loss/code", "val_perplexity/code"]
    assert source_val_curves(keys) == ["val_loss/books", "val_loss/code"]
