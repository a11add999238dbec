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

import logging
import os
import shutil
import sys
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.services import http_ok, port_in_use
from lmforge.tracking import store
from lmforge.tracking.store import SERVER, TrackingServerInfo

log = logging.getLogger(__name__)


class TrackingServerError(LmforgeError):
    pass


def running() -> TrackingServerInfo | None:
    """The server `up` started, if it is still alive."""
    return SERVER.running()


def _mlflow_bin() -> str:
    """The `mlflow` CLI of this environment (the one lmforge runs in)."""
    return shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"


def up(port: int = 5000, host: str = "127.0.0.1", timeout_s: float = 120) -> TrackingServerInfo:
    """Start the server (or return the one already running)."""
    info = running()
    if info is not None:
        log.info("the MLflow server is already running at %s (pid %d)", info.url, info.pid)
        return info
    return _start(port, host, timeout_s)


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
    # MLflow 3's server also starts a job runner with several huey worker pools (GenAI
    # evaluation, prompt optimisation): ~2 GB of processes lmforge never uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    url = f"http://{host}:{port}"
    return SERVER.start(
        cmd,
        env=env,
        log_file=store.root() / "server.log",
        ready=lambda: http_ok(f"{url}/health"),
        timeout_s=timeout_s,
        error=TrackingServerError,
        url=url,
    )


def down() -> bool:
    """Stop the server `up` started; False when none was running."""
    return SERVER.stop()


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
