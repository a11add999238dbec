"""A local single-node Ray cluster, and how every lmforge entry point connects to Ray.

    lmforge cluster up        # head on 127.0.0.1, token auth on; prints the address
    lmforge cluster status
    lmforge cluster down

The head runs as `ray start --head --block` in its own session, so `down` stops exactly
this cluster (never `ray stop`, which kills every Ray process on the machine). Its pid and
addresses are kept in `$LMFORGE_HOME/cluster.json` (see `services.ManagedProcess`).

Everything listens on 127.0.0.1: Ray's single-host mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)
keeps GCS, raylet and workers on loopback, and the dashboard/Jobs API is bound there too.
Token auth stays on; clients send the token only with RAY_AUTH_MODE=token in their
environment, so this module sets it for every client it starts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge import paths
from lmforge.errors import LmforgeError
from lmforge.services import ManagedProcess, ServiceRecord, free_port, http_ok

log = logging.getLogger(__name__)

# The environment of every process that talks to the local cluster.
LOCAL_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class ClusterError(LmforgeError):
    pass


@dataclass(frozen=True)
class ClusterInfo(ServiceRecord):
    address: str  # GCS address, for ray.init
    dashboard_url: str  # Jobs API, for ray job submit / JobSubmissionClient


HEAD = ManagedProcess("cluster", "the Ray head", ClusterInfo)


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def ensure_token() -> Path:
    """Create Ray's auth token if there is none yet (owner-only permissions)."""
    path = token_path()
    if not path.is_file() and "RAY_AUTH_TOKEN" not in os.environ:
        from ray._private.authentication.authentication_token_setup import (
            generate_and_save_token,
        )

        generate_and_save_token()
    if path.is_file():
        path.chmod(0o600)
    return path


def auth_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN") or token_path().read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def running() -> ClusterInfo | None:
    """The cluster `up` started, if its head process is still alive."""
    return HEAD.running()


def _ray_bin() -> str:
    """The `ray` CLI of this environment (the one lmforge runs in)."""
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def up(
    port: int = 6379,
    dashboard_port: int = 8265,
    num_cpus: int | None = None,
    timeout_s: float = 180,
) -> ClusterInfo:
    """Start the local head (or return the one already running)."""
    info = running()
    if info is not None:
        log.info("a local Ray cluster is already running (pid %d)", info.pid)
        return info
    ensure_token()
    ray_bin = _ray_bin()
    cmd = [
        ray_bin, "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={port}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # Ray's fixed default (52365) would clash with a second cluster on this machine,
        # whose job submissions then fail with "No available agent to submit job".
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",  # likewise for Ray Client's 10001
    ]  # fmt: skip
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    # Job entrypoints say `python ...`: make that this environment's Python, with lmforge.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **LOCAL_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    return HEAD.start(
        cmd,
        env=env,
        log_file=paths.home() / "cluster" / "ray-head.log",
        ready=lambda: http_ok(f"{dashboard_url}/api/version", headers=auth_headers()),
        timeout_s=timeout_s,
        error=ClusterError,
        poll_s=1,
        address=f"127.0.0.1:{port}",
        dashboard_url=dashboard_url,
    )


def down() -> bool:
    """Stop the cluster `up` started; False when none was running."""
    return HEAD.stop()


def set_client_env(env: dict[str, str], override: bool) -> None:
    """Set Ray client env vars (e.g. RAY_AUTH_MODE=token, so the token is sent); re-read by
    Ray's C++ config if Ray is already imported."""
    for k, v in env.items():
        if override:
            os.environ[k] = v
        else:
            os.environ.setdefault(k, v)
    if "ray" in sys.modules:
        # Ray reads these once, at import: its C++ config (RAY_AUTH_MODE), which Ray itself
        # refreshes this way when it turns token auth on (authentication_token_setup.py), and
        # the single-host switch, which decides whether 127.0.0.1 is replaced by the host IP.
        from ray._private import ray_constants
        from ray._raylet import Config

        Config.initialize("")
        if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in env:
            ray_constants.ENABLE_RAY_CLUSTER = (
                os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
            )


def connect() -> str:
    """Connect this process to Ray; returns a description of where.

    Inside a Ray job (RAY_ADDRESS set) or with an explicit RAY_ADDRESS, use that cluster;
    else the one `lmforge cluster up` started; else start a private local Ray for the
    lifetime of this process.
    """
    # Ray Train prints each worker line twice unless its print patch is off.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    where = _init()
    drop_known_noise()
    return where


# Ray Train 2.60's controller starts a PreemptionWatcher actor with max_restarts=-1 and the
# workers' actor handles as constructor arguments
# (ray/train/v2/_internal/callbacks/preemption_callback.py), so Ray core logs an ERROR line
# "Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the object
# store and max_restarts > 0" for every run (C++ in ray/_raylet.so: core_worker.cc,
# CoreWorker::CreateActor; ray-project/ray#53727). Nothing is wrong: those handles are the
# workers', alive as long as the watcher. C++ logs reach no Python logger, so the line is
# dropped where the driver prints its workers' output: a handler placed before Ray's own
# "ray_print_logs" on ray/_private/ray_logging's global_worker_stdstream_dispatcher (added
# by ray.init, ray/_private/worker.py). It stays in Ray's log files; nothing else is dropped.
KNOWN_NOISE = re.compile(
    r"Actor with class name: 'PreemptionWatcher' .*has constructor arguments in the object store"
)


def drop_known_noise() -> None:
    """Leave KNOWN_NOISE out of the worker output this driver prints (idempotent)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def drop(data: dict) -> None:
        data["lines"] = [ln for ln in data.get("lines", []) if not KNOWN_NOISE.search(ln)]

    with dispatcher._lock:
        if not any(name == "lmforge_known_noise" for name, _ in dispatcher.handlers):
            dispatcher.handlers = [("lmforge_known_noise", drop), *dispatcher.handlers]


def _init() -> str:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return "the Ray instance this process already uses"
    if os.environ.get("RAY_ADDRESS"):
        set_client_env({"RAY_AUTH_MODE": "token"}, override=False)
        import ray

        ray.init(log_to_driver=True)
        return f"Ray cluster at {os.environ['RAY_ADDRESS']}"
    info = running()
    set_client_env(LOCAL_ENV, override=True)
    import ray

    if info is not None:
        ray.init(address=info.address, log_to_driver=True)
        return f"local Ray cluster at {info.address}"
    ensure_token()
    ray.init(address="local", log_to_driver=True)
    return "a private local Ray (no `lmforge cluster up` running)"


def status() -> str:
    info = running()
    if info is None:
        return "no local Ray cluster running (start one with `lmforge cluster up`)"
    env = {**os.environ, **LOCAL_ENV}
    ray_bin = _ray_bin()
    out = subprocess.run(
        [ray_bin, "status", f"--address={info.address}"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    return describe(info) + "\n" + (out.stdout or out.stderr)


def describe(info: ClusterInfo) -> str:
    return (
        f"Ray head pid {info.pid}\n"
        f"  address (ray.init):       {info.address}\n"
        f"  Jobs API (ray job submit): {info.dashboard_url}\n"
        "  submit with: lmforge submit --config FILE (the arguments of lmforge train)\n"
        f"          or: RAY_AUTH_MODE=token ray job submit --address {info.dashboard_url} "
        "--runtime-env cluster/runtime_env.yaml -- python jobs/train.py --config FILE\n"
        f"  log: {info.log_file}"
    )
