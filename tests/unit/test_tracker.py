"""Rank 0's MLflow writer against a real SQLite store: batching, registration that is never
doubled by a retry, and a dead server that costs bounded time and raises nothing."""

from __future__ import annotations

import socket
import time

import pytest
import torch

from lmforge import models
from lmforge.checkpoint import DatasetIdentity, TrainerState, is_complete, save_servable, seal
from lmforge.config import load_config
from lmforge.tokenizer import train_tokenizer
from lmforge.tracking import registry, store
from lmforge.tracking.registry import ModelRef, RegistryError, parse_model_uri
from lmforge.tracking.tracker import Tracker, TrackingSettings, find_run_id, flatten
from tests.conftest import REPO


def test_model_uris_parse_and_bad_ones_are_named():
    assert parse_model_uri("models:/tiny@best") == ModelRef("tiny", alias="best")
    assert parse_model_uri("models:/tiny/3") == ModelRef("tiny", version="3")
    assert parse_model_uri("models:/tiny/latest") == ModelRef("tiny", alias="latest")
    for bad in ("tiny@best", "models:/tiny", "models:/a b@best", "models:/tiny/x1"):
        with pytest.raises(RegistryError, match="expected models:/NAME@ALIAS"):
            parse_model_uri(bad)


def test_flatten_config():
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml")
    flat = flatten(cfg.to_dict())
    assert flat["train.lr"] == "0.003" and flat["model.vocab_size"] == ""
    assert flat["tracking.experiment"] == "lmforge"


@pytest.fixture
def checkpoints(tmp_path):
    """Three servable checkpoints of a tiny model, with val losses 3.0, 2.5, 2.7."""
    tok = train_tokenizer(["to be or not to be, that is the question"] * 20, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["model.vocab_size=300"])
    torch.manual_seed(0)
    model = models.build(cfg.model)
    out = []
    for step, val in ((5, 3.0), (10, 2.5), (15, 2.7)):
        d = tmp_path / "run" / f"checkpoint_{step:08d}"
        state = TrainerState(
            step=step, tokens_seen=step * 100, metrics={"val_loss": val},
            dataset=DatasetIdentity("ds", "m" * 64, "t" * 64),
        )  # fmt: skip
        save_servable(d, model.state_dict(), cfg, tmp_path / "tokenizer.json", state)
        seal(d)
        out.append((d, state))
    return out


def _settings(uri, run_dir, name="unit"):
    return TrackingSettings(
        uri=uri, experiment=name, registered_model=name, run_name="r", run_dir=str(run_dir),
        tags={"t": "1"}, params={"a.b": "1"}, artifacts={"config.yaml": "x: 1\n"},
    )  # fmt: skip


def test_metrics_and_registrations_reach_the_store(tracking_uri, tmp_path, checkpoints):
    uri = tracking_uri
    tracker = Tracker(_settings(uri, tmp_path / "run"))
    for step in range(1, 16):
        tracker.log_metrics(step, {"step": step, "loss": 10.0 / step})
    for d, state in checkpoints:
        tracker.register(tracker.stage(d, state.step), d, state)
    tracker.close()
    assert tracker.failures == []
    c = store.client(uri)
    run_id = find_run_id(uri, "unit", str(tmp_path / "run"))
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == list(range(1, 16))
    assert c.get_run(run_id).data.params == {"a.b": "1"}
    versions = c.search_model_versions("name='unit'")
    assert sorted(int(v.tags["step"]) for v in versions) == [5, 10, 15]
    assert c.get_model_version_by_alias("unit", "best").tags["step"] == "10"
    # A second tracker for the same run dir (a resumed job) continues the same run.
    again = Tracker(_settings(uri, tmp_path / "run"))
    again.log_metrics(16, {"loss": 0.5})
    again.close()
    assert find_run_id(uri, "unit", str(tmp_path / "run")) == run_id
    assert len(c.get_metric_history(run_id, "loss")) == 16


def test_a_retried_registration_makes_one_version(tracking_uri, tmp_path, checkpoints, monkeypatch):
    uri = tracking_uri
    calls = []
    real = registry.update_aliases

    def flaky(client, name):  # fails once after the version exists
        calls.append(name)
        if len(calls) == 1:
            raise ConnectionError("server went away")
        return real(client, name)

    monkeypatch.setattr(registry, "update_aliases", flaky)
    tracker = Tracker(_settings(uri, tmp_path / "run", "flaky"), backoff_s=0.01)
    d, state = checkpoints[0]
    tracker.register(tracker.stage(d, state.step), d, state)
    tracker.close()
    assert tracker.failures == [] and len(calls) == 2
    assert len(store.client(uri).search_model_versions("name='flaky'")) == 1


def test_a_restored_checkpoint_without_a_version_is_registered(
    tracking_uri, tmp_path, checkpoints, capsys
):
    """Rank 0 died after `ray.train.report` of step 10, before its registration ran; the
    restarted job restores step 10 and registers it. Step 5, registered already, is not
    logged again."""
    uri = tracking_uri
    (d5, s5), (d10, s10), _ = checkpoints
    first = Tracker(_settings(uri, tmp_path / "run", "restored"))
    first.register(first.stage(d5, 5), d5, s5)
    first.close()  # and the job dies: step 10 is in the run dir, not in the registry
    c = store.client(uri)
    run_id = find_run_id(uri, "restored", str(tmp_path / "run"))
    assert [v.tags["step"] for v in c.search_model_versions("name='restored'")] == ["5"]
    capsys.readouterr()
    for d, state in ((d10, s10), (d5, s5)):  # two restarts: from step 10, then from step 5
        again = Tracker(_settings(uri, tmp_path / "run", "restored"))
        again.register_restored(d, state)
        again.close()
        assert again.failures == []
    versions = {v.tags["step"]: v for v in c.search_model_versions("name='restored'")}
    assert sorted(versions) == ["10", "5"]
    assert versions["10"].run_id == run_id and versions["10"].tags["ray_checkpoint_uri"] == str(d10)
    assert versions["10"].tags["val_loss"] == "2.500000"
    assert c.get_model_version_by_alias("restored", "best").tags["step"] == "10"
    out = capsys.readouterr().out
    assert "registered models:/restored/2 (step 10)" in out and "(step 5)" not in out
    logged = {m.model_id for m in c.search_logged_models([c.get_run(run_id).info.experiment_id])}
    assert len(logged) == 2  # one logged model per checkpoint: step 5's was not logged twice


def test_an_incomplete_checkpoint_is_never_registered(tracking_uri, tmp_path, checkpoints):
    uri = tracking_uri
    tracker = Tracker(_settings(uri, tmp_path / "run", "partial"))
    (d5, s5), (d10, s10), _ = checkpoints
    for d in (d5, d10):
        seal(d)  # as the training loop lists a checkpoint's files
    staged = [tracker.stage(d, s.step) for d, s in ((d5, s5), (d10, s10))]
    assert all(is_complete(s) for s in staged)  # the registered copy lists its own files
    # Ray's copy of checkpoint 10 into the run dir was cut short (a new file: the staged
    # copy holds hard links to the old one).
    weights = d10 / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[:100])
    tracker.register(staged[0], d5, s5)
    tracker.register(staged[1], d10, s10)
    tracker.close()
    versions = store.client(uri).search_model_versions("name='partial'")
    assert [v.tags["step"] for v in versions] == ["5"]
    assert tracker.failures == [
        f"not registered: {d10} is incomplete (model.safetensors has 100 bytes, files.json "
        f"says {len(data)})"
    ]
    assert not staged[1].exists()


def test_a_server_never_reached_fails_fast_in_one_line(tmp_path, checkpoints, capsys):
    """A server that never answered is not waited for at close (the outage bound is for a
    server that went away, test_tracker_outage.py): one last try, whatever the back-off,
    then one line naming the URI and what was not logged; nothing raises."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    settings = _settings(uri, tmp_path / "run")
    assert settings.outage_wait_s == 600  # the default bound: not what this close takes
    tracker = Tracker(settings, backoff_s=60, max_backoff_s=60)  # a long back-off at close
    tracker.log_metrics(1, {"loss": 1.0})
    d, state = checkpoints[0]
    tracker.register(tracker.stage(d, state.step), d, state)
    time.sleep(1)  # the first try has failed: the tracker sits in its back-off
    t0 = time.monotonic()
    tracker.close()
    assert time.monotonic() - t0 < 15
    assert tracker.failures == [
        f"MLflow at {uri} never answered: nothing of this run was logged there (metric "
        "values: 1; checkpoints not registered, kept in the run dir: steps 5); check "
        "tracking.tracking_uri or start the server (`lmforge tracking up`)"
    ]
    out = capsys.readouterr().out
    assert out.count("never answered") == 1 and "waiting up to" not in out
    assert d.is_dir()  # the checkpoint itself is untouched


def test_a_refused_run_drops_its_work_after_the_retries(
    tracking_uri, tmp_path, checkpoints, monkeypatch
):
    """A server that answers but refuses (here: a bad experiment) is not an outage: after
    `retries` more tries each piece of work is reported once, and close does not wait."""
    from mlflow.exceptions import MlflowException

    uri = tracking_uri
    calls = []

    def refuse(*args):
        calls.append(args)
        raise MlflowException("experiment name refused", error_code="INVALID_PARAMETER_VALUE")

    monkeypatch.setattr(store, "ensure_experiment", refuse)
    tracker = Tracker(_settings(uri, tmp_path / "run", "refused"), retries=2, backoff_s=0.01)
    tracker.log_metrics(1, {"loss": 1.0})
    d, state = checkpoints[0]
    tracker.register(tracker.stage(d, state.step), d, state)
    t0 = time.monotonic()
    tracker.close(timeout_s=30)
    assert time.monotonic() - t0 < 10 and len(calls) == 3
    assert tracker.failures[0] == (
        "could not start the MLflow run: MlflowException: experiment name refused"
    )
    assert tracker.failures[-1] == "1 metric values not logged"
    assert "could not register the checkpoint of step 5: no MLflow run" in tracker.failures
    assert "could not end the MLflow run: no MLflow run" in tracker.failures


def test_tracking_disabled_sends_nothing_to_the_workers():
    from lmforge.tracking import run_setup

    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["tracking.enabled=false"])
    assert run_setup.settings(cfg, None, REPO, {"t": "1"}) is None


def test_a_checkpoint_after_a_nonfinite_step_is_never_registered(
    tracking_uri, tmp_path, checkpoints
):
    """The guard's rule: weights written after a NaN/inf loss are nobody's to serve."""
    import dataclasses

    tracker = Tracker(_settings(tracking_uri, tmp_path / "run", "unsound"))
    (d5, s5), (d10, s10), _ = checkpoints
    nan = dataclasses.replace(s10, metrics={"loss": float("nan"), "val_loss": 2.5})
    staged = [tracker.stage(d, s.step) for d, s in ((d5, s5), (d10, nan))]
    tracker.register(staged[0], d5, s5)
    tracker.register(staged[1], d10, nan)
    tracker.close()
    versions = store.client(tracking_uri).search_model_versions("name='unsound'")
    assert [v.tags["step"] for v in versions] == ["5"]
    assert tracker.failures == [f"not registered: {d10} has a non-finite loss"]
    assert not staged[1].exists()
