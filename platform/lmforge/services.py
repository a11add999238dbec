"""Helpers for the local services lmforge starts (Ray head, MLflow server): each runs in
its own session, recorded by pid and process start time, so a reused pid is never ours
and stopping one never touches anything else."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time


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
