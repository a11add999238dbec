"""A sweep's space (issue 28): SPACE.yaml parsed, every value it can produce checked against
the config schema, points the launch estimate says cannot fit skipped (grid) or refused
(a distribution), and a bad sweep refused in one line before anything starts."""

from __future__ import annotations

import pytest

from lmforge import sweeps
from lmforge.config import ConfigError, read_yaml
from lmforge.errors import LmforgeError
from lmforge.sweeps.space import GRID_KEY, check_space, load_space, parse_space
from lmforge.sweeps.trial import DIVERGED, to_tune, trial_values
from tests.conftest import REPO

pytestmark = pytest.mark.unit
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
GIB = 1024**3


@pytest.fixture
def base():
    return {**read_yaml(TINY), "train": {**read_yaml(TINY)["train"], "min_lr": 1e-5}}


def refused(raw, base, memory=None) -> str:
    with pytest.raises(ConfigError) as err:
        check_space(parse_space(raw, "space.yaml"), base, memory)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_a_valid_space_passes_with_its_grid_points(base):
    raw = {
        "train.lr": {"loguniform": [1e-4, 3e-3]},
        "train.warmup_steps": {"choice": [0, 5]},
        "train.weight_decay": {"uniform": [0.0, 0.2]},
        "model.d_model": {"grid": [32, 64]},
    }
    space = check_space(parse_space(raw), base, memory_gib(8))
    assert space.grid_points == [{"model.d_model": 32}, {"model.d_model": 64}]
    assert space.skipped == []
    assert space.to_dict()["train.lr"] == {"loguniform": [1e-4, 3e-3]}


def memory_gib(n: float) -> float:
    return n * GIB


@pytest.mark.parametrize(
    "raw, says",
    [
        ({"train.lrr": {"loguniform": [1e-4, 3e-3]}}, "train.lrr: unknown key (known: max_steps"),
        ({"trian.lr": {"uniform": [1e-4, 3e-3]}}, "trian: unknown key"),
        ({"train.lr": {"loguniform": [1e-4, 3.0]}}, "train.lr: loguniform[0.0001, 3.0] gives 3.0"),
        (
            {"train.warmup_steps": {"choice": [0, "x"]}},
            "train.warmup_steps: choice[0, 'x'] gives 'x'",
        ),
        (
            {"train.warmup_steps": {"uniform": [0, 5]}},
            "uniform gives floats, but the key takes whole",
        ),
        ({"train.warmup_steps": {"randint": [0, 100]}}, "exceeds train.max_steps"),
        ({"zero.stage": {"grid": [1, 4]}}, "zero.stage: grid[1, 4] gives 4"),
        ({"train.lr": {"gaussian": [0, 1]}}, "unknown distribution 'gaussian'"),
        ({"train.lr": {"loguniform": [0, 1e-3]}}, "loguniform needs low > 0"),
        ({"train.lr": {"uniform": [3e-3, 1e-3]}}, "needs low < high"),
        ({"run.name": {"choice": ["a", "b"]}}, "run.name: not sweepable"),
        ({"train.lr": 0.001}, "expected one distribution"),
    ],
)
def test_a_bad_space_is_refused_in_one_line_naming_the_key(base, raw, says):
    assert says in refused(raw, base)


def test_the_line_of_the_key_in_the_space_file_is_named(tmp_path, base):
    f = tmp_path / "space.yaml"
    f.write_text("train.lr: {loguniform: [1.0e-4, 3.0e-3]}\ntrain.nope: {choice: [1, 2]}\n")
    with pytest.raises(ConfigError, match=rf"^{f}:2: train.nope: unknown key"):
        check_space(load_space(f), base)


def test_bounds_written_1e_3_in_the_space_file_are_numbers(tmp_path, base):
    """PyYAML reads `1e-3` (no dot) as a string; a bound is the number it spells."""
    f = tmp_path / "space.yaml"
    f.write_text("train.lr: {loguniform: [1e-4, 3e-3]}\n")
    space = load_space(f)
    check_space(space, base)
    assert space.to_dict()["train.lr"] == {"loguniform": [1e-4, 3e-3]}
    f.write_text("train.lr: {loguniform: [1e-4, fast]}\n")
    with pytest.raises(ConfigError, match="two numbers"):
        load_space(f)


def test_grid_points_that_cannot_fit_are_skipped_by_name(base):
    space = check_space(parse_space({"model.d_model": {"grid": [64, 4096]}}), base, memory_gib(1))
    assert space.grid_points == [{"model.d_model": 64}]
    assert [{k: v for k, v in s.items() if not k.startswith("_")} for s in space.skipped] == [
        {"model.d_model": 4096}
    ]
    assert space.skipped[0]["_need"] > GIB


def test_a_distribution_whose_bounds_cannot_fit_is_refused(base):
    msg = refused({"model.d_model": {"choice": [64, 4096]}}, base, memory_gib(1))
    assert "model.d_model=4096 needs" in msg and "per worker by the launch estimate" in msg
    msg = refused({"train.micro_batch_size": {"randint": [1, 4097]}}, base, memory_gib(1))
    assert "train.micro_batch_size=4096" in msg
    with pytest.raises(ConfigError, match="no grid point fits"):
        check_space(parse_space({"model.d_model": {"grid": [4096]}}), base, memory_gib(1))


def test_a_bad_sweep_is_refused_before_anything_starts():
    from lmforge import paths

    space = {"train.lr": {"loguniform": [1e-4, 3e-3]}}
    sets = ["train.min_lr=1e-5"]
    cases = [
        (dict(name="bad name"), "--name 'bad name'"),
        (dict(options=sweeps.SweepOptions(max_concurrent=0)), "--max-concurrent 0"),
        (dict(options=sweeps.SweepOptions(metric="eval.copy.exact_match")), "--metric eval.copy"),
        (dict(options=sweeps.SweepOptions(search="optuna"), space={"model.d_model": {"grid": [32, 64]}}), "with --search optuna"),
        (dict(space={"train.nope": {"choice": [1]}}), "train.nope: unknown key"),
        (dict(overrides=["train.lr=7"]), "train.lr"),
        (dict(space={"train.lora.r": {"choice": [4, 8]}}), "train.lora.r: train.lora: LoRA adapts a base model; name it with --init-from"),
    ]  # fmt: skip
    for kw, says in cases:
        args = {"name": "s", "space": space, "overrides": sets, **kw}
        with pytest.raises(LmforgeError) as err:
            sweeps.plan_sweep(
                args["name"], TINY, args["space"], args["overrides"], kw.get("options")
            )
        assert says in str(err.value), (says, str(err.value))
    assert not (paths.home() / "runs" / "sweeps" / "s").exists()  # nothing written


def test_a_trial_reports_only_evaluations_to_tune_and_a_divergence_as_the_worst():
    assert to_tune({"step": 5, "loss": 3.0}, "val_loss", "min") is None
    got = to_tune({"step": 5, "val_loss": 2.5, "tag": "x"}, "val_loss", "min")
    assert got == {"step": 5, "val_loss": 2.5}
    assert to_tune({"step": 5, "val_loss": float("nan")}, "val_loss", "min")["val_loss"] == DIVERGED
    assert (
        to_tune({"step": 5, "val_loss": float("inf")}, "val_loss", "max")["val_loss"] == -DIVERGED
    )
    assert trial_values({"train.lr": 1e-3, GRID_KEY: {"model.d_model": 64}}) == {
        "train.lr": 1e-3,
        "model.d_model": 64,
    }


def test_a_submitted_sweep_runs_jobs_sweep_py_with_the_same_options(monkeypatch):
    import argparse
    import json
    import shlex

    from lmforge.cli import add_sweep_args, sweep_plan
    from lmforge.sweeps.submit import SPACE_ENV, sweep_job

    space = {"train.lr": {"loguniform": [1e-3, 3e-3]}, "model.d_model": {"grid": [32, 64]}}
    opts = sweeps.SweepOptions(trials=3, max_concurrent=1, grace_period=5, seed=7)
    plan = sweeps.plan_sweep("s1", TINY, space, ["train.max_steps=40"], opts)
    spec = sweep_job(plan.name, plan.base_config, plan.space, opts, any_path=True)
    args = shlex.split(spec.entrypoint.removeprefix("exec "))
    assert args[:2] == ["python", "jobs/sweep.py"]
    p = argparse.ArgumentParser()
    add_sweep_args(p)
    got = p.parse_args(args[2:])
    assert (got.name, got.trials, got.max_concurrent, got.grace_period, got.seed) == (
        "s1", 3, 1, 5, 7,
    )  # fmt: skip
    assert "train.max_steps=40" in got.overrides
    # In the job, the space comes from the environment and is checked again.
    monkeypatch.setenv(SPACE_ENV, spec.runtime_env["env_vars"][SPACE_ENV])
    again = sweep_plan(got)
    assert again.space.to_dict() == json.loads(spec.runtime_env["env_vars"][SPACE_ENV])
    assert again.base_config.train.max_steps == 40


def test_a_concurrency_the_cluster_cannot_hold_is_said_once(caplog):
    from lmforge.config import load_config
    from lmforge.sweeps.driver import say_concurrency

    cfg = load_config(TINY)  # 2 workers of 1 CPU a trial
    with caplog.at_level("WARNING"):
        say_concurrency("s", cfg, [{"CPU": 4.0}], 2)
        assert not caplog.records
        say_concurrency("s", cfg, [{"CPU": 4.0}], 3)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "--max-concurrent 3, but the cluster fits the workers of 2 trial(s)" in line


def test_a_sweep_on_an_evaluation_score(tmp_path):
    """--metric eval.<task>.<metric>: the base config must evaluate that task; ASHA's grace
    is then the checkpoint interval (scores come with checkpoints); each checkpoint's
    scores reach Tune named as on the version, with their step (EvalToTune)."""
    from lmforge.sweeps.plan import grace_steps
    from lmforge.sweeps.trial import EvalToTune
    from tests.unit import evaltasks

    rows = evaltasks.write_rows(tmp_path / "rows.jsonl", [{"prompt": "a", "completion": "b"}])
    task = evaltasks.generative(tmp_path, "copy", rows)
    space = {"train.lr": {"loguniform": [1e-4, 3e-3]}}
    sets = ["train.min_lr=1e-5", f"eval.tasks=[{task}]", "train.max_steps=20",
            "train.checkpoint_every=10", "train.eval_every=5"]  # fmt: skip
    opts = sweeps.SweepOptions(metric="eval.copy.exact_match", mode="max")
    plan = sweeps.plan_sweep("score", TINY, space, sets, opts)
    assert grace_steps(plan.options, plan.base_config) == 10
    for metric, says in [
        ("eval.nope.exact_match", "task 'nope' is not evaluated by the base config"),
        ("eval.copy", "eval.<task>.<metric>"),
    ]:
        with pytest.raises(LmforgeError, match=says):
            sweeps.plan_sweep("score", TINY, space, sets, sweeps.SweepOptions(metric=metric))

    class Queue(list):
        put = list.append

    q = Queue()
    to = EvalToTune(q, "eval.copy.exact_match", "max")
    to(10, {"eval/copy/exact_match": 0.5, "eval/copy/bleu": 3.0})
    to(20, {"eval/copy/exact_match": float("nan")})
    to(30, {"eval/other/acc": 1.0})  # not the sweep's metric: Tune does not see it
    assert q == [
        {"eval.copy.exact_match": 0.5, "eval.copy.bleu": 3.0, "step": 10},
        {"eval.copy.exact_match": -DIVERGED, "step": 20, "diverged": 1},
    ]
