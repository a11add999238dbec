"""`lmforge tracking up` is a real `mlflow server` on 127.0.0.1 over the embedded store."""

from __future__ import annotations

import socket
from pathlib import Path

import psutil
import pytest

from lmforge.tracking import server, store


def test_server_listens_on_loopback_only_and_is_reused(tracking_server):
    assert server.running() == tracking_server
    assert server.up(port=int(tracking_server.url.rsplit(":", 1)[1])).pid == tracking_server.pid
    proc = psutil.Process(tracking_server.pid)
    listening = [
        c.laddr
        for p in (proc, *proc.children(recursive=True))
        for c in p.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening
    assert store.resolve_uri() == tracking_server.url  # the default while it runs


def test_server_and_sqlite_file_are_one_store(tracking_server, tmp_path):
    http = store.client(tracking_server.url)
    exp = store.ensure_experiment(http, "server-test", tracking_server.url)
    run = http.create_run(exp, run_name="via-http")
    http.log_metric(run.info.run_id, "loss", 1.5, step=3)
    (tmp_path / "note.txt").write_text("hello")
    http.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    direct = store.client(store.sqlite_uri())
    assert [m.value for m in direct.get_metric_history(run.info.run_id, "loss")] == [1.5]
    path = direct.download_artifacts(run.info.run_id, "note.txt", str(tmp_path / "dl"))
    assert Path(path).read_text() == "hello"
    # Artifacts live in the plain folder under LMFORGE_HOME, whichever way they were written.
    assert list((store.artifact_root() / "server-test").rglob("note.txt"))


def test_a_taken_port_is_one_clear_error(tracking_server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(server.TrackingServerError, match=f"port {port} .* in use"):
            server._start(port=port, host="127.0.0.1", timeout_s=10)
