"""`lmforge tracking up|down|status`: a real `mlflow server` over the embedded store.

    lmforge tracking up      # http://127.0.0.1:5000: the MLflow UI, REST API and artifacts
    lmforge tracking status
    lmforge tracking down

It serves `store.sqlite_uri()` and proxies `store.artifact_root()`, so the UI, the dashboard
and jobs submitted to the cluster (`--set tracking.tracking_uri=http://127.0.0.1:5000`) see
the same runs and models as processes that open the SQLite file directly. It binds to
127.0.0.1 unless told otherwise; for a shared cluster see cluster/README.md (MLflow's
basic-auth app behind TLS). Like the Ray head, it runs in its own session and is recorded
in `$LMFORGE_HOME/tracking.json` by pid and start time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.services import kill_group, port_in_use, process_start_time
from lmforge.tracking import store

log = logging.getLogger(__name__)


class TrackingServerError(RuntimeError):
    pass


@dataclass
class TrackingServerInfo:
    pid: int
    url: str
    log_file: str
    started: float  # the server process's start time: a reused pid is not our server


def running() -> TrackingServerInfo | None:
    """The server `up` started, if it is still alive."""
    f = store.server_state_file()
    if not f.is_file():
        return None
    try:
        info = TrackingServerInfo(**json.loads(f.read_text()))
    except (json.JSONDecodeError, TypeError):
        return None
    return info if process_start_time(info.pid) == info.started else None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _mlflow_bin() -> str:
    """The `mlflow` CLI of this environment (the one lmforge runs in)."""
    return shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"


def up(port: int = 5000, host: str = "127.0.0.1", timeout_s: float = 120) -> TrackingServerInfo:
    """Start the server (or return the one already running)."""
    info = running()
    if info is not None:
        log.info("the MLflow server is already running at %s (pid %d)", info.url, info.pid)
        return info
    info = _start(port, host, timeout_s)
    store.server_state_file().write_text(json.dumps(asdict(info), indent=2) + "\n")
    return info


def _start(port: int, host: str, timeout_s: float) -> TrackingServerInfo:
    """Start `mlflow server` and wait until it answers its health check."""
    if port_in_use(host, port):
        raise TrackingServerError(
            f"port {port} on {host} is already in use; choose another with --port"
        )
    store.artifact_root().mkdir(parents=True, exist_ok=True)
    cmd = [
        _mlflow_bin(), "server",
        "--backend-store-uri", store.sqlite_uri(),
        "--artifacts-destination", str(store.artifact_root()),
        "--host", host, "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    log_file = store.root() / "server.log"
    # MLflow 3's server also starts a job runner with several huey worker pools (GenAI
    # evaluation, prompt optimisation): ~2 GB of processes lmforge never uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_file, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    info = TrackingServerInfo(
        pid=proc.pid,
        url=f"http://{host}:{port}",
        log_file=str(log_file),
        started=process_start_time(proc.pid) or 0.0,
    )
    deadline = time.monotonic() + timeout_s
    while not _healthy(info.url):
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_group(proc.pid)
            tail = log_file.read_text().strip().splitlines()[-3:]
            raise TrackingServerError(
                f"mlflow server did not start (see {log_file}): {' | '.join(tail)}"
            )
        time.sleep(0.5)
    return info


def down() -> bool:
    """Stop the server `up` started; False when none was running."""
    info = running()
    store.server_state_file().unlink(missing_ok=True)
    if info is None:
        return False
    kill_group(info.pid)
    return True


def describe(info: TrackingServerInfo) -> str:
    return (
        f"MLflow server: {info.url} (pid {info.pid})\n"
        f"  store: {store.sqlite_uri()}, artifacts in {store.artifact_root()}\n"
        f"  log: {info.log_file}\n"
        f"  use it: --set tracking.tracking_uri={info.url} or MLFLOW_TRACKING_URI={info.url}\n"
        "  (lmforge commands on this machine use it by default while it runs)"
    )


def status() -> str:
    info = running()
    return describe(info) if info else "no MLflow server is running (lmforge tracking up)"
