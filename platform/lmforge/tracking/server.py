"""`lmforge tracking up|down|status`: a real `mlflow server`, over the embedded store or a
shared one.

    lmforge tracking up      # http://127.0.0.1:5000: the MLflow UI, REST API and artifacts
    lmforge tracking status
    lmforge tracking down

    # shared: runs and the registry in PostgreSQL, artifacts in S3 (proxied by the server,
    # so jobs need no S3 credentials), MLflow's basic-auth app in front
    lmforge tracking up --backend-store-uri postgresql://mlflow@db:5432/mlflow \\
        --artifacts-destination s3://bucket/mlflow --auth --host 0.0.0.0

By default it serves `store.sqlite_uri()` and proxies `store.artifact_root()`, so the UI,
the dashboard and jobs submitted to the cluster (`--set tracking.tracking_uri=http://...`)
see the same runs and models as processes that open the SQLite file directly. A PostgreSQL
store or S3 artifacts need psycopg and boto3, which the training env lacks (botocore's
python-dateutil pin), so that server runs from the services env `.venv-services` (built
by scripts/setup.sh; LMFORGE_SERVICES_ENV names another). The database password is best
left to libpq (PGPASSWORD, ~/.pgpass); one in the URI reaches the server through its
environment, never its command line, is masked in the record and messages, and is in
basic auth's config file (mode 600) only with `--auth`. S3
credentials and endpoint are the server's own AWS_* variables.

`--auth` starts MLflow's basic-auth app: every request but /health needs a user's
credentials (clients: MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD). The admin is
created on the first start from MLFLOW_AUTH_ADMIN_USERNAME (default admin) and
MLFLOW_AUTH_ADMIN_PASSWORD; users live in the backend database (for the embedded store,
`basic_auth.db` beside it). MLflow's CSRF key is MLFLOW_FLASK_SERVER_SECRET_KEY, else one
generated once into `$LMFORGE_HOME/mlflow/flask_secret_key` (mode 600).

It binds to 127.0.0.1 unless told otherwise, and to another address only with `--auth`;
for a shared cluster see cluster/README.md (TLS in front of it). Like the Ray head, it runs
in its own session and is recorded in `$LMFORGE_HOME/tracking.json` by pid and start time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import shutil
import sys
from pathlib import Path

import lmforge
from lmforge.errors import LmforgeError
from lmforge.services import http_ok, port_in_use
from lmforge.tracking import store
from lmforge.tracking.store import SERVER, TrackingServerInfo

log = logging.getLogger(__name__)

SERVICES_ENV = ".venv-services"  # at the checkout's root (scripts/setup.sh builds it)
DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy stores: the registry needs one


class TrackingServerError(LmforgeError):
    pass


def running() -> TrackingServerInfo | None:
    """The server `up` started, if it is still alive."""
    return SERVER.running()


def services_env() -> Path:
    """The virtualenv with the MLflow server's database and S3 drivers."""
    if named := os.environ.get("LMFORGE_SERVICES_ENV"):
        return Path(named)
    return Path(lmforge.__file__).resolve().parents[2] / SERVICES_ENV


def _mlflow_bin(drivers: tuple[str, ...] = ()) -> str:
    """The `mlflow` CLI to run: this environment's, unless it lacks a module the server
    needs (psycopg, boto3, flask_wtf); then the services env's."""
    here = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    missing = [d for d in drivers if importlib.util.find_spec(d) is None]
    if not missing:
        return here
    there = services_env() / "bin" / "mlflow"
    if there.is_file():
        return str(there)
    raise TrackingServerError(
        f"this store needs {' and '.join(missing)}, which this environment lacks and {there} "
        "does not exist: run `bash scripts/setup.sh` (it builds .venv-services), or set "
        "LMFORGE_SERVICES_ENV to a virtualenv with mlflow[auth], psycopg[binary] and boto3"
    )


def drivers_for(
    backend_store_uri: str, artifacts_destination: str, auth: bool = False
) -> tuple[str, ...]:
    """The Python modules the server needs for this store, these artifacts and auth."""
    scheme = backend_store_uri.split(":", 1)[0]
    needs = []
    if scheme in ("postgresql", "postgresql+psycopg"):
        needs.append("psycopg")  # SQLAlchemy 2 reads postgresql:// as psycopg 3
    elif scheme == "postgresql+psycopg2":
        needs.append("psycopg2")
    if artifacts_destination.startswith("s3://"):
        needs.append("boto3")
    if auth:
        needs.append("flask_wtf")  # mlflow[auth]: the basic-auth app's CSRF protection
    return tuple(needs)


def up(
    port: int = 5000,
    host: str = "127.0.0.1",
    timeout_s: float = 120,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    auth: bool = False,
) -> TrackingServerInfo:
    """Start the server (or return the one already running, if it serves the same store)."""
    info = running()
    if info is not None:
        wanted = (store.masked(backend_store_uri or ""), artifacts_destination or "", auth)
        if (info.store, info.artifacts, info.auth) != wanted:
            raise TrackingServerError(
                f"an MLflow server is already running at {info.url} over "
                f"{info.store or 'the embedded store'}; stop it first (lmforge tracking down)"
            )
        log.info("the MLflow server is already running at %s (pid %d)", info.url, info.pid)
        return info
    return _start(port, host, timeout_s, backend_store_uri, artifacts_destination, auth)


def _start(
    port: int,
    host: str,
    timeout_s: float,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    auth: bool = False,
) -> TrackingServerInfo:
    """Start `mlflow server` and wait until it answers its health check."""
    if not auth and host not in ("127.0.0.1", "localhost", "::1"):
        raise TrackingServerError(
            f"--host {host} without --auth would let anyone who reaches it read and change "
            "every run and model; add --auth (and TLS in front, see cluster/README.md)"
        )
    if port_in_use(host, port):
        raise TrackingServerError(
            f"port {port} on {host} is already in use; choose another with --port"
        )
    backend = backend_store_uri or store.sqlite_uri()
    if backend.split(":", 1)[0].split("+", 1)[0] not in DATABASES:
        raise TrackingServerError(
            f"--backend-store-uri {store.masked(backend)}: not a database URI (e.g. "
            "postgresql://user@host:5432/mlflow); the model registry needs a database"
        )
    artifacts = artifacts_destination or str(store.artifact_root())
    if artifacts_destination is None:
        store.artifact_root().mkdir(parents=True, exist_ok=True)
    store.root().mkdir(parents=True, exist_ok=True)
    cmd = [
        _mlflow_bin(drivers_for(backend, artifacts, auth)), "server",
        "--artifacts-destination", artifacts, "--serve-artifacts",
        "--host", host, "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    # MLflow 3's server also starts a job runner with several huey worker pools (GenAI
    # evaluation, prompt optimisation): ~2 GB of processes lmforge never uses. The store
    # URI goes by the environment: a password in it stays off the command line.
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_BACKEND_STORE_URI": backend,
    }
    if auth:
        cmd += ["--app-name", "basic-auth"]
        env.update(_auth_env(backend_store_uri))
    url = f"http://{host}:{port}"
    return SERVER.start(
        cmd,
        env=env,
        log_file=store.root() / "server.log",
        ready=lambda: http_ok(f"{url}/health"),
        timeout_s=timeout_s,
        error=TrackingServerError,
        url=url,
        store=store.masked(backend_store_uri or ""),
        artifacts=artifacts_destination or "",
        auth=auth,
    )


AUTH_CACHE_TTL_S = 60


def _auth_env(backend_store_uri: str | None) -> dict[str, str]:
    """The environment of MLflow's basic-auth app: its config file (users in the backend
    database, or beside the embedded one) and its CSRF secret."""
    users_db = backend_store_uri or f"sqlite:///{store.root() / 'basic_auth.db'}"
    config = store.root() / "basic_auth.ini"
    _write_private(
        config,
        "[mlflow]\n"
        "default_permission = READ\n"  # a user reads every experiment, writes their own
        f"database_uri = {users_db.replace('%', '%%')}\n"
        "admin_username = admin\n"  # MLFLOW_AUTH_ADMIN_USERNAME overrides it
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # MLflow checks the password hash (scrypt: 0.12 s of the server's CPU here) on every
        # request; a run logs, registers and uploads through hundreds. A verified credential
        # is reused for 60 s (MLflow's own cache, per server worker): a changed password
        # or a deleted user is refused at once by the worker that made the change, by the
        # others within the minute.
        f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n",
    )
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(config)}
    if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        key = store.root() / "flask_secret_key"
        if not key.is_file():
            _write_private(key, secrets.token_hex(32))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = key.read_text().strip()
    return env


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it may hold a database password or a key)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def down() -> bool:
    """Stop the server `up` started; False when none was running."""
    return SERVER.stop()


def describe(info: TrackingServerInfo) -> str:
    where = (
        f"store: {info.store or store.sqlite_uri()}, "
        f"artifacts in {info.artifacts or store.artifact_root()} (proxied)"
    )
    use = f"--set tracking.tracking_uri={info.url} or MLFLOW_TRACKING_URI={info.url}"
    if info.auth:
        where += "\n  basic auth: clients set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    return (
        f"MLflow server: {info.url} (pid {info.pid})\n"
        f"  {where}\n"
        f"  log: {info.log_file}\n"
        f"  use it: {use}\n"
        "  (lmforge commands on this machine use it by default while it runs)"
    )


def status() -> str:
    info = running()
    return describe(info) if info else "no MLflow server is running (lmforge tracking up)"
