"""Which MLflow store a process talks to, and the embedded default.

With no tracking URI configured, lmforge uses an embedded store inside the project data
folder: a SQLite database (the model registry needs a database; MLflow's plain file
store has none) and a local artifact folder:

    $LMFORGE_HOME/mlflow/mlflow.db
    $LMFORGE_HOME/mlflow/artifacts/<experiment>/

`lmforge tracking up` serves that same store over HTTP on 127.0.0.1 (see `server.py`),
or a shared one (PostgreSQL, artifacts in S3); while it runs, its URL is the default, so
the dashboard and jobs share one writer. Its record (`SERVER`,
`$LMFORGE_HOME/tracking.json`) lives here, where the default is chosen; `server.py` starts
and stops it.

Credentials for a server with MLflow's basic-auth app come from the environment of each
process (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, read by MLflow's own client),
never from a config, a URI, MLflow params or a log; `credential_env()` hands them to Ray's
workers.

Resolution order: the config's `tracking.tracking_uri`, then MLFLOW_TRACKING_URI, then the
running embedded server, then the SQLite file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from lmforge import paths
from lmforge.services import ManagedProcess, ServiceRecord, http_ok

# What MLflow's client needs to authenticate to a tracking server, passed on to workers.
CREDENTIAL_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_INSECURE_TLS",
)


@dataclass(frozen=True)
class TrackingServerInfo(ServiceRecord):
    url: str
    store: str = ""  # the backend store, password masked; "" for the embedded SQLite
    artifacts: str = ""  # the artifacts destination; "" for the embedded folder
    auth: bool = False  # MLflow's basic-auth app


SERVER = ManagedProcess("tracking", "the MLflow server", TrackingServerInfo)


def root() -> Path:
    return paths.home() / "mlflow"


def db_path() -> Path:
    return root() / "mlflow.db"


def sqlite_uri() -> str:
    return f"sqlite:///{db_path()}"


def artifact_root() -> Path:
    return root() / "artifacts"


def embedded_server_url() -> str | None:
    """The URL of the server `lmforge tracking up` started, if it is still running."""
    info = SERVER.running()
    return info.url if info else None


def resolve_uri(configured: str | None = None) -> str:
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or embedded_server_url()
    if uri:
        return uri
    root().mkdir(parents=True, exist_ok=True)
    return sqlite_uri()


def is_embedded(uri: str) -> bool:
    """True for the embedded SQLite store, or the server `tracking up` started over it."""
    if uri == sqlite_uri():
        return True
    info = SERVER.recorded()
    return info is not None and info.url == uri.rstrip("/") and not info.store


def masked(uri: str) -> str:
    """`uri` with the password of its user part replaced, for messages and records."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def credential_env() -> dict[str, str]:
    """The MLflow credentials of this process, for Ray's runtime env of the workers (never
    for logs, configs or MLflow)."""
    return {k: os.environ[k] for k in CREDENTIAL_ENV if os.environ.get(k)}


def reachable(uri: str, timeout_s: float = 3.0) -> bool:
    """Whether an HTTP tracking server answers its health check (other stores: True)."""
    if not uri.startswith(("http://", "https://")):
        return True
    return http_ok(f"{uri.rstrip('/')}/health", timeout_s=timeout_s)


def client(uri: str):
    """An MlflowClient for tracking and registry on `uri`.

    MLflow's HTTP client retries a dead server for minutes by default; lmforge callers
    retry on their own terms (or fail with a clear message), so one retry is enough here.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # noise in job logs
    from mlflow import MlflowClient

    # "Creating initial MLflow database tables..." on a new SQLite store: not news to a user.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(mlflow_client, name: str, uri: str) -> str:
    """The experiment's id, creating it if needed.

    In the embedded store, artifacts go to a plain folder, whether a process writes through
    the server or straight to SQLite, so both ways of talking to it see the same files.
    Elsewhere the server decides (e.g. proxied object storage).
    """
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (artifact_root() / name).as_uri() if is_embedded(uri) else None
    try:
        return mlflow_client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        exp = mlflow_client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
