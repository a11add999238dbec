"""Elastic workers (`scaling.num_workers: [min, max]`): the config, the cluster check, the
arithmetic that depends on the worker count, and what Ray Train is handed."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge import launch_form
from lmforge.config import ConfigError, load_config
from lmforge.estimate import estimate, model_state_bytes
from lmforge.training.launch import check_cluster, elastic_note, scaling_config
from lmforge.training.plan import check_fits_dataset

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny.yaml"
ONE_CPU, HEAD = {"CPU": 1.0}, {"memory": 1.0}


def cfg(*overrides):
    return load_config(TINY, list(overrides))


def test_num_workers_is_a_number_or_a_min_max_pair():
    s = cfg("scaling.num_workers=[1,2]").scaling  # --set parses the pair as YAML
    assert s.num_workers == (1, 2) and s.elastic and (s.min_workers, s.max_workers) == (1, 2)
    s = cfg("scaling.num_workers=3").scaling
    assert s.num_workers == 3 and not s.elastic and (s.min_workers, s.max_workers) == (3, 3)
    assert cfg("scaling.num_workers=[2, 2]").scaling.num_workers == 2  # [n, n] is fixed n
    c = cfg("scaling.num_workers=[1,4]")
    assert c.to_dict()["scaling"]["num_workers"] == [1, 4]  # as YAML and MLflow params say it
    assert load_config(None, ["scaling.num_workers=[1, 4]"]).scaling == c.scaling


@pytest.mark.parametrize(
    "value, says",
    [
        ("[0,2]", "[min, max] needs 1 <= min <= max (got [0, 2])"),
        ("[3,2]", "[min, max] needs 1 <= min <= max (got [3, 2])"),
        ("[1,2,3]", "expected a whole number or a [min, max] pair of them (got [1, 2, 3])"),
        ("[1,x]", "expected a whole number or a [min, max] pair of them"),
        ("[1,2.5]", "expected a whole number or a [min, max] pair of them"),
        ("0", "needs at least 1 worker (got 0)"),
        ("true", "expected a whole number"),
        ("two", "expected a whole number"),
    ],
)
def test_bad_worker_counts_are_one_line_naming_the_key(value, says):
    with pytest.raises(ConfigError) as err:
        cfg(f"scaling.num_workers={value}")
    msg = str(err.value)
    assert f"scaling.num_workers: {says}" in msg and "\n" not in msg, msg


def test_resize_interval_must_be_positive():
    assert cfg().scaling.elastic_resize_interval_s == 60.0
    with pytest.raises(ConfigError, match="scaling.elastic_resize_interval_s"):
        cfg("scaling.elastic_resize_interval_s=0")


def test_ray_train_gets_the_pair_and_the_interval():
    rs = scaling_config(cfg("scaling.num_workers=[1,3]", "scaling.elastic_resize_interval_s=5"))
    assert rs.elasticity_enabled and (rs.min_workers, rs.max_workers) == (1, 3)
    assert rs.elastic_resize_monitor_interval_s == 5
    assert rs.num_workers == (1, 3)
    fixed = scaling_config(cfg("scaling.num_workers=2"))
    assert not fixed.elasticity_enabled and fixed.num_workers == 2


def test_strict_spread_needs_nodes_for_the_minimum_only():
    c = cfg(
        "scaling.num_workers=[2,4]", "scaling.placement_strategy=STRICT_SPREAD",
        "run.shared_filesystem=true",
    )  # fmt: skip
    check_cluster(c, [HEAD, ONE_CPU, ONE_CPU])  # starts with 2, grows when nodes join
    with pytest.raises(ConfigError) as err:
        check_cluster(c, [HEAD, ONE_CPU, {"CPU": 0.5}])
    assert "each of the at least 2 workers on its own node, but only 1" in str(err.value)


def test_the_estimate_holds_memory_at_min_and_tokens_at_max():
    """Fewer workers hold more of ZeRO's partitioned state each; more workers make a
    bigger global batch (the per-worker micro-batch is fixed)."""
    base = ["model.vocab_size=512", "zero.stage=2", "train.grad_accum_steps=2"]
    elastic = estimate(cfg(*base, "scaling.num_workers=[2,4]"))
    at_min, at_max = (
        estimate(cfg(*base, "scaling.num_workers=2")),
        estimate(cfg(*base, "scaling.num_workers=4")),
    )
    assert elastic.per_worker_bytes == at_min.per_worker_bytes
    assert elastic.per_worker_bytes["total"] > at_max.per_worker_bytes["total"]
    assert elastic.tokens_per_step == at_max.tokens_per_step == 8 * 64 * 2 * 4
    n = elastic.n_params
    assert elastic.per_worker_bytes["gradients"] == model_state_bytes(n, 2, 2, False)[1]


def test_the_log_says_the_global_batch_follows_the_worker_count():
    note = elastic_note(cfg("scaling.num_workers=[1,3]", "scaling.elastic_resize_interval_s=5"))
    assert note.startswith("elastic: 1 to 3 workers") and "every 5 s" in note
    assert "8 sequences a worker, 8 to 24 in all" in note  # tiny: micro 8, accumulation 1
    assert "the global batch follows the worker count" in note


class FakeDataset:
    """Only what check_fits_dataset reads: row groups (units) with token counts."""

    path, vocab_size = Path("ds"), 300

    def __init__(self, train_groups: int):
        self.train = [type("U", (), {"tokens": 1000})() for _ in range(train_groups)]

    def units(self, split):
        return self.train if split == "train" else self.train[:1]


def test_the_dataset_must_feed_the_most_workers():
    check_fits_dataset(cfg("scaling.num_workers=[1,3]"), FakeDataset(3))
    with pytest.raises(ConfigError) as err:
        check_fits_dataset(cfg("scaling.num_workers=[1,4]"), FakeDataset(3))
    assert str(err.value).startswith("scaling.num_workers=[1, 4]: ds has only 3 train row groups")


def test_the_launch_form_takes_the_workers_field_as_a_number():
    f = launch_form.form_field("scaling.num_workers")
    assert f.type is int and f.default == 2 and "[min, max]" in f.help
    c, errors = launch_form.form_config({}, {"scaling.num_workers": [1, 2]})
    assert not errors and c.scaling.num_workers == (1, 2)
    _, errors = launch_form.form_config({}, {"scaling.num_workers": [3, 2]})
    assert "1 <= min <= max" in errors["scaling.num_workers"]


def test_the_step_delay_paces_steps_only(monkeypatch):
    """LMFORGE_FAULT_STEP_DELAY_S slows each step (the elastic test acts mid-run with it)."""
    import time

    from lmforge import faults

    monkeypatch.setenv("LMFORGE_FAULT_STEP_DELAY_S", "0.2")
    t0 = time.perf_counter()
    faults.maybe_kill("step", 3, 0)
    t1 = time.perf_counter()
    faults.maybe_kill("checkpoint", 4, 0)
    t2 = time.perf_counter()
    assert t1 - t0 >= 0.2 and t2 - t1 < 0.1


def test_a_job_spec_carries_the_pair_quoted_and_reads_it_back():
    import shlex

    from lmforge import jobspec

    token = jobspec.safe_token("scaling.num_workers", [1, 2])
    assert token == "scaling.num_workers=[1,2]"
    line = jobspec.entrypoint(["python", "jobs/train.py", "--set", token])
    assert "'scaling.num_workers=[1,2]'" in line  # quoted: no shell glob
    (arg,) = [a for a in shlex.split(line) if a.startswith("scaling.")]
    assert load_config(None, [arg]).scaling.num_workers == (1, 2)
    with pytest.raises(jobspec.JobSpecError, match="not allowed in a job"):
        jobspec.safe_token("scaling.num_workers", ["1;rm", 2])
