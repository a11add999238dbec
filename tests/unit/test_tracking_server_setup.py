"""`lmforge tracking up`'s choices before any server starts: which environment runs it, what
it refuses, what it writes for basic auth, and that passwords stay masked. (The servers
themselves: tests/integration/test_tracking_server.py and test_tracking_postgres.py.)"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from lmforge.services import free_port
from lmforge.tracking import server, store
from lmforge.tracking.store import SERVER, TrackingServerInfo

PG = "postgresql://mlflow:s3cret@db.example:5432/mlflow"


def test_passwords_are_masked_and_other_uris_kept():
    assert store.masked(PG) == "postgresql://mlflow:***@db.example:5432/mlflow"
    assert store.masked("postgresql://mlflow@db/mlflow") == "postgresql://mlflow@db/mlflow"
    assert store.masked(store.sqlite_uri()) == store.sqlite_uri()


def test_the_drivers_follow_the_store_artifacts_and_auth():
    assert server.drivers_for(store.sqlite_uri(), "/tmp/artifacts") == ()
    assert server.drivers_for(PG, "s3://b/mlflow", auth=True) == ("psycopg", "boto3", "flask_wtf")
    assert server.drivers_for("postgresql+psycopg2://h/db", "/a") == ("psycopg2",)


def test_a_missing_driver_runs_the_services_env_or_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_SERVICES_ENV", str(tmp_path / "svc"))
    here = str(Path(sys.executable).parent / "mlflow")
    assert server._mlflow_bin(("json",)) == here  # this env has it: no services env needed
    with pytest.raises(server.TrackingServerError, match=r"no_such_driver.*scripts/setup\.sh"):
        server._mlflow_bin(("no_such_driver",))
    (tmp_path / "svc" / "bin").mkdir(parents=True)
    (tmp_path / "svc" / "bin" / "mlflow").write_text("#!/bin/sh\n")
    assert server._mlflow_bin(("no_such_driver",)) == str(tmp_path / "svc" / "bin" / "mlflow")


def test_a_store_without_a_database_is_refused_before_starting(monkeypatch):
    monkeypatch.setattr(SERVER, "start", lambda *a, **k: pytest.fail("started"))
    with pytest.raises(server.TrackingServerError, match=r"file:///tmp/x: not a database URI"):
        server._start(free_port(), "127.0.0.1", 5, backend_store_uri="file:///tmp/x")
    with pytest.raises(server.TrackingServerError, match=r"mlflow:\*\*\*@.*not a database URI"):
        server._start(free_port(), "127.0.0.1", 5, backend_store_uri="redis://mlflow:s3cret@h/0")


def test_another_address_than_loopback_needs_auth(monkeypatch):
    monkeypatch.setattr(SERVER, "start", lambda *a, **k: pytest.fail("started"))
    with pytest.raises(server.TrackingServerError, match=r"--host 0.0.0.0 without --auth"):
        server._start(free_port(), "0.0.0.0", 5)


def test_a_running_server_over_another_store_is_not_reused(monkeypatch):
    info = TrackingServerInfo(1, 0.0, "log", "http://127.0.0.1:5000", store.masked(PG), "s3://b")
    monkeypatch.setattr(server, "running", lambda: info)
    assert server.up(backend_store_uri=PG, artifacts_destination="s3://b") is info
    with pytest.raises(server.TrackingServerError, match="already running .* over postgresql"):
        server.up()


def test_only_the_server_over_sqlite_is_the_embedded_store(monkeypatch):
    shared = TrackingServerInfo(1, 0.0, "log", "http://127.0.0.1:5000", store.masked(PG))
    monkeypatch.setattr(SERVER, "recorded", lambda: shared)
    assert not store.is_embedded("http://127.0.0.1:5000")  # its experiments: its artifacts
    embedded = TrackingServerInfo(1, 0.0, "log", "http://127.0.0.1:5000")
    monkeypatch.setattr(SERVER, "recorded", lambda: embedded)
    assert store.is_embedded("http://127.0.0.1:5000/") and store.is_embedded(store.sqlite_uri())


def test_basic_auth_config_is_private_and_its_secret_kept(monkeypatch):
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)
    store.root().mkdir(parents=True, exist_ok=True)
    env = server._auth_env(PG)
    config = store.root() / "basic_auth.ini"
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(config)
    assert f"database_uri = {PG}\n" in config.read_text()  # users beside the runs
    assert "auth_cache_ttl_seconds = 60\n" in config.read_text()  # not a hash per request
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    key = store.root() / "flask_secret_key"
    assert (
        stat.S_IMODE(key.stat().st_mode) == 0o600
        and len(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64
    )
    assert server._auth_env(None)["MLFLOW_FLASK_SERVER_SECRET_KEY"] == key.read_text()
    assert "basic_auth.db" in config.read_text()  # the embedded store: a file beside it
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "mine")
    assert "MLFLOW_FLASK_SERVER_SECRET_KEY" not in server._auth_env(None)  # the server's own


def test_credentials_for_the_workers_are_only_those_set(monkeypatch):
    for k in store.CREDENTIAL_ENV:
        monkeypatch.delenv(k, raising=False)
    assert store.credential_env() == {}
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    assert store.credential_env() == {
        "MLFLOW_TRACKING_USERNAME": "trainer",
        "MLFLOW_TRACKING_PASSWORD": "pw",
    }
