"""The local services lmforge starts (the Ray head, the MLflow server), managed one way.

    HEAD = ManagedProcess("cluster", "the Ray head", ClusterInfo)
    info = HEAD.start(cmd, env=env, log_file=log, ready=lambda: http_ok(url), timeout_s=180,
                      error=ClusterError, address=..., dashboard_url=...)
    HEAD.running()   # the record, while that very process lives; else None
    HEAD.stop()      # SIGTERM (then SIGKILL) its process group; False when none ran

Each service runs in its own session (process group) and is recorded in
`$LMFORGE_HOME/<name>.json` by pid and process start time, so a reused pid is never ours
and stopping one never touches anything else (never `ray stop`, which stops every Ray on
the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Generic, TypeVar

from lmforge import paths


@dataclass(frozen=True)
class ServiceRecord:
    """What is kept of a started service; each service adds its addresses."""

    pid: int
    started: float  # the process's start time: a reused pid is not our service
    log_file: str


R = TypeVar("R", bound=ServiceRecord)


class ManagedProcess(Generic[R]):
    """One local service: started in its own session, found again by its state file."""

    def __init__(self, name: str, what: str, record: type[R]) -> None:
        self.name = name  # the state file is $LMFORGE_HOME/<name>.json
        self.what = what  # for messages: "the Ray head"
        self.record = record

    @property
    def state_file(self) -> Path:
        return paths.home() / f"{self.name}.json"

    def recorded(self) -> R | None:
        """The last record written, whether or not its process still lives."""
        try:
            return self.record(**json.loads(self.state_file.read_text()))
        except (OSError, json.JSONDecodeError, TypeError):
            return None  # none, unreadable, or of an older layout: as good as none

    def running(self) -> R | None:
        """The record, if the process it names is still the one that was started."""
        rec = self.recorded()
        if rec is None:
            return None
        now = process_start_time(rec.pid)
        return rec if now is not None and abs(now - rec.started) < START_TIME_SLACK_S else None

    def start(
        self,
        cmd: list[str],
        *,
        env: dict[str, str],
        log_file: Path,
        ready: Callable[[], bool],
        timeout_s: float,
        error: type[Exception],
        poll_s: float = 0.5,
        **fields,
    ) -> R:
        """Start `cmd` (output to `log_file`), wait until `ready()`, record it.

        A process that exits or is not ready within `timeout_s` is killed, and `error` is
        raised with the last lines of its log.
        """
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "w") as out:
            proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        rec = self.record(
            pid=proc.pid,
            started=process_start_time(proc.pid) or 0.0,
            log_file=str(log_file),
            **fields,
        )
        deadline = time.monotonic() + timeout_s
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                kill_group(proc.pid)
                raise error(f"{self.what} did not start (see {log_file}): {log_tail(log_file)}")
            time.sleep(poll_s)
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(asdict(rec), indent=2) + "\n")
        return rec

    def stop(self, timeout_s: float = 30) -> bool:
        """Stop the recorded process group; False when none was running."""
        rec = self.running()
        self.state_file.unlink(missing_ok=True)
        if rec is None:
            return False
        kill_group(rec.pid, timeout_s)
        return True


def log_tail(path: str | os.PathLike, lines: int = 5) -> str:
    """The last non-empty lines of a log, joined by ` | ` for a one-line error."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(tail) or "(empty log)"


def http_ok(url: str, headers: dict[str, str] | None = None, timeout_s: float = 2) -> bool:
    """Whether `url` answers 200 (a health check)."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


# A process's start time is the boot time plus its ticks since boot, and the kernel's boot
# time moves when the wall clock is stepped (NTP, a VM resumed from a pause): the same
# process then reads a start time shifted by the step. A pid reused by another process
# started within this many seconds of the recorded one is what the slack lets through.
START_TIME_SLACK_S = 120.0


def process_start_time(pid: int) -> float | None:
    """The process's start time, or None when there is no such process."""
    import psutil  # a Ray dependency

    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def kill_group(pid: int, timeout_s: float = 30) -> None:
    """SIGTERM the process group led by `pid`, then SIGKILL what is left after `timeout_s`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # A leader started by this very process stays a zombie (and its group alive to
        # killpg) until it is reaped.
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False
