"""The `Trainer` built and run in this process against a recording session (world size 1,
no Ray, no spawned ranks): what it reports when, the checkpoint it hands over, the order
in which a subscriber hears of it, and a restore from it. The session is a fake because
these tests are about the loop's side of the port; tests/trainer runs the real sessions."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from lmforge import checkpoint as ckpt_io
from lmforge.config import load_config
from lmforge.training.session import ResumePoint
from tests.conftest import REPO
from tests.datasets import plays_dataset

pytestmark = pytest.mark.usefixtures("gloo_group")


class RecordingSession:
    """Persists a checkpoint as the real sessions do (a copy into the run dir) and records
    every call, in order, in `events` (shared with the subscriber)."""

    def __init__(self, run_dir: Path, events: list, resume: ResumePoint | None = None):
        from lmforge import dist

        self.info = dist.setup(use_gpu=False)
        self.run_dir, self.events, self.resume = run_dir, events, resume

    @contextlib.contextmanager
    def restore_point(self):
        yield self.resume

    def report(self, metrics, checkpoint=None):
        name = checkpoint.name if checkpoint is not None else None
        self.events.append(("report", metrics["step"], name))
        if checkpoint is not None:
            shutil.copytree(checkpoint, self.run_dir / name)

    def node(self):
        return {"node_id": "n0", "address": "127.0.0.1"}


class Subscriber:
    def __init__(self, events: list):
        self.events = events

    def stage(self, checkpoint: Path, step: int):
        # The dir is complete (sealed) before the session persists it.
        self.events.append(("stage", step, ckpt_io.incomplete(checkpoint)))
        return f"token-{step}"

    def register(self, staged, checkpoint, state):
        self.events.append(("persisted", staged, checkpoint.name, state.step))


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    ds = plays_dataset(tmp_path_factory.mktemp("data") / "plays")
    return load_config(
        REPO / "jobs" / "configs" / "tiny.yaml",
        [f"data.path={ds.path}", "model.vocab_size=512", "scaling.num_workers=1",
         "train.max_steps=4", "train.log_every=2", "train.eval_every=2",
         "train.checkpoint_every=4", "train.eval_steps=1", "train.warmup_steps=1",
         "tracking.enabled=false"],
    )  # fmt: skip


def test_the_loop_reports_hands_over_its_checkpoint_and_restores_from_it(cfg, tmp_path):
    from lmforge.training.loop import Trainer

    events: list = []
    session = RecordingSession(tmp_path, events)
    trainer = Trainer(cfg, session, str(tmp_path))
    trainer.subscribers.append(Subscriber(events))
    trainer.fit()
    # Step 0's evaluation, step 2's (a log and eval step), step 4's checkpoint; the
    # subscribers hear of the checkpoint before it is handed over (staged, already sealed)
    # and again once the session has persisted it, with its name in the run dir.
    assert events == [
        ("report", 0, None),
        ("report", 2, None),
        ("stage", 4, None),
        ("report", 4, "checkpoint_00000004"),
        ("persisted", "token-4", "checkpoint_00000004", 4),
    ]
    saved = tmp_path / "checkpoint_00000004"
    assert ckpt_io.incomplete(saved) is None
    state = ckpt_io.read_state(saved)
    assert (state.step, state.world_size, [e["step"] for e in state.evals]) == (4, 1, [0, 2, 4])

    # A new trainer restored from it continues where it stopped, with the same stream.
    resume = ResumePoint.open(saved, saved)
    more = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 6})})
    again = Trainer(more, RecordingSession(tmp_path, []), str(tmp_path), resume=resume)
    again.restore(resume)
    assert (again.step, again.tokens_seen) == (4, state.tokens_seen)
    assert again.stream.state_dict() == state.data[0]
    again.fit()
    assert again.step == 6 and ckpt_io.read_state(tmp_path / "checkpoint_00000006").step == 6


def test_due_is_the_one_schedule():
    from lmforge.training.loop import due

    t = load_config(REPO / "jobs" / "configs" / "tiny.yaml",
                    ["train.max_steps=10", "train.log_every=3", "train.eval_every=4",
                     "train.checkpoint_every=5"]).train  # fmt: skip
    plan = {s: due(s, 0, t) for s in range(1, 11)}
    assert [s for s, d in plan.items() if d.checkpoint] == [5, 10]
    assert [s for s, d in plan.items() if d.eval] == [4, 5, 8, 10]  # every checkpoint too
    assert [s for s, d in plan.items() if d.line] == [1, 3, 6, 9, 10]  # the first step too
    assert [s for s, d in plan.items() if d.report] == [3, 4, 6, 8, 9]  # not with a checkpoint
    assert [s for s, d in plan.items() if d.last] == [10]
    assert not plan[2].anything
    assert due(7, 6, t).line  # the first step of a restart


def test_step_seed_is_per_rank_and_step_and_repeatable():
    from lmforge.training.loop import step_seed

    seeds = {(r, s): step_seed(1337, r, s) for r in range(4) for s in range(50)}
    assert len(set(seeds.values())) == len(seeds)
    assert all(0 <= v < 2**63 for v in seeds.values())
    assert step_seed(1337, 1, 7) == seeds[(1, 7)] != step_seed(1338, 1, 7)
