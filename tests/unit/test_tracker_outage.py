"""The tracking server down for a while: rank 0's tracker keeps the metrics and the
checkpoints to register, retries, and once the server is back MLflow holds every metric
value and version exactly once (a real `mlflow server` process, killed and restarted)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lmforge.services import free_port, http_ok, kill_group
from lmforge.tracking import registry, store
from lmforge.tracking.tracker import Tracker, find_run_id
from tests.unit.test_tracker import _settings, checkpoints  # noqa: F401 (a fixture)


def _start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [
        str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--artifacts-destination", str(tmp_path / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(tmp_path / "server.log", "a")  # noqa: SIM115 (the server's, closed with it)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    deadline = time.monotonic() + 120
    while not http_ok(f"http://127.0.0.1:{port}/health"):
        assert proc.poll() is None and time.monotonic() < deadline, (
            tmp_path / "server.log"
        ).read_text()[-2000:]
        time.sleep(0.3)
    return proc


def _wait(cond, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def server_dir(tmp_path):
    d = tmp_path / "server"
    d.mkdir()
    return d


def test_an_outage_loses_and_doubles_nothing(server_dir, tmp_path, checkpoints, capsys):  # noqa: F811
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = _start_server(server_dir, port)
    tracker = None
    try:
        tracker = Tracker(
            _settings(uri, tmp_path / "run", "outage"),
            backoff_s=0.2, max_backoff_s=1.0, flush_every_s=0.2,
        )  # fmt: skip
        (d5, s5), (d10, s10), _ = checkpoints
        for step in range(1, 6):
            tracker.log_metrics(step, {"loss": 10.0 / step})
        tracker.register(tracker.stage(d5, 5), d5, s5)
        _wait(lambda: [(s, str(v)) for s, v in tracker.registered] == [(5, "1")])

        kill_group(proc.pid)  # SIGTERM, then SIGKILL: the server is gone
        for step in range(6, 11):
            tracker.log_metrics(step, {"loss": 10.0 / step})
        tracker.register(tracker.stage(d10, 10), d10, s10)
        time.sleep(3)  # several tries fail meanwhile; training (this thread) goes on
        assert len(tracker.registered) == 1
        assert "is unreachable" in capsys.readouterr().out

        # Back (same store) only after close began: a server that answered before is waited for.
        restart = threading.Timer(2.0, lambda: started.append(_start_server(server_dir, port)))
        started: list[subprocess.Popen] = []
        restart.start()
        t0 = time.monotonic()
        tracker.close(timeout_s=120)
        restart.join()
        proc = started[0]
        assert time.monotonic() - t0 > 2
        assert tracker.failures == []
        out = capsys.readouterr().out
        assert "waiting up to 120 s" in out and "answers again" in out
        c = store.client(uri)
        run_id = find_run_id(uri, "outage", str(tmp_path / "run"))
        assert [m.step for m in c.get_metric_history(run_id, "loss")] == list(range(1, 11))
        versions = c.search_model_versions("name='outage'")
        assert sorted(int(v.tags["step"]) for v in versions) == [5, 10]
        assert c.get_model_version_by_alias("outage", "best").tags["step"] == "10"
        assert c.get_run(run_id).info.status == "FINISHED"
    finally:
        if tracker is not None:
            tracker.close(timeout_s=1)
        kill_group(proc.pid)


def test_a_server_gone_for_good_is_waited_for_up_to_the_bound(
    tracking_uri, tmp_path, monkeypatch, capsys
):
    """The store answered, then stops answering for good (every call a refused connection):
    close waits `outage_wait_s`, then reports what was left undone."""
    uri = tracking_uri
    settings = _settings(uri, tmp_path / "run", "gone")
    settings.outage_wait_s = 3
    tracker = Tracker(settings, backoff_s=0.2, max_backoff_s=0.5, flush_every_s=0.2)
    _wait(lambda: tracker.run_id is not None)

    def refused(*args, **kwargs):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    for name in ("log_batch", "set_terminated", "get_metric_history"):
        monkeypatch.setattr(tracker.client, name, refused)
    tracker.log_metrics(1, {"loss": 1.0})
    t0 = time.monotonic()
    tracker.close()
    assert 3 <= time.monotonic() - t0 < 10
    gave_up, lost = tracker.failures
    assert gave_up == (
        "gave up after 3 s (ConnectionRefusedError: [Errno 111] Connection refused); "
        "left undone: end the MLflow run"
    )
    assert lost == "1 metric values not logged"
    assert f"MLflow at {uri} is unreachable: waiting up to 3 s" in capsys.readouterr().out


def test_an_answer_lost_after_the_store_took_it_is_not_sent_twice(
    tracking_uri,
    tmp_path,
    checkpoints,  # noqa: F811
    monkeypatch,
):
    """The server stored a metric batch (or made a version) and the connection died before
    its answer: the retry asks what MLflow has, so nothing is doubled."""
    import mlflow

    uri = tracking_uri
    tracker = Tracker(_settings(uri, tmp_path / "run", "lost"), backoff_s=0.05)
    real_log_batch, real_register = tracker.client.log_batch, mlflow.register_model
    lost = {"batch": 0, "version": 0}

    def log_batch(run_id, metrics=(), **kwargs):
        real_log_batch(run_id, metrics=metrics, **kwargs)
        if metrics and not lost["batch"]:
            lost["batch"] += 1
            raise ConnectionError("connection reset before the answer")

    def register_model(*args, **kwargs):
        version = real_register(*args, **kwargs)
        if not lost["version"]:
            lost["version"] += 1
            raise ConnectionError("connection reset before the answer")
        return version

    monkeypatch.setattr(tracker.client, "log_batch", log_batch)
    monkeypatch.setattr(mlflow, "register_model", register_model)
    for step in range(1, 6):
        tracker.log_metrics(step, {"loss": 1.0 / step, "lr": 0.1})
    d, state = checkpoints[0]
    tracker.register(tracker.stage(d, state.step), d, state)
    tracker.close(timeout_s=60)
    assert tracker.failures == [] and lost == {"batch": 1, "version": 1}
    c = store.client(uri)
    run_id = find_run_id(uri, "lost", str(tmp_path / "run"))
    for key in ("loss", "lr"):
        assert [m.step for m in c.get_metric_history(run_id, key)] == [1, 2, 3, 4, 5]
    assert [v.tags["step"] for v in c.search_model_versions("name='lost'")] == ["5"]
    assert str(registry.find_version(c, "lost", run_id, 5).version) == "1"
