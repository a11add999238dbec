"""The Ray Jobs API as lmforge uses it: submit a `JobSpec`, list jobs, read logs, stop.

    client = JobClient()                      # the Jobs API of `lmforge cluster up`
    sid = client.submit(train_job(cfg))
    client.jobs(); client.logs(sid); client.stop(sid)
    for text in client.follow(sid): print(text, end="")   # the log as it grows

Where the Jobs API is: the `address` given, else RAY_JOBS_ADDRESS, else RAY_ADDRESS when
it is an http(s) URL (as `ray job submit` reads it), else the cluster `lmforge cluster up`
started, else http://127.0.0.1:8265. Ray's token is sent (RAY_AUTH_MODE=token is set for
this process, as for every lmforge client). Every failure of Ray (down, unreachable,
unknown job, refused) becomes a `JobClientError` with one line saying what and where.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from lmforge.errors import LmforgeError, first_line
from lmforge.jobspec import JobSpec

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class JobClientError(LmforgeError):
    """The Jobs API could not do what was asked; one line, naming the address or job."""


@dataclass(frozen=True)
class JobRow:
    submission_id: str | None
    job_id: str | None
    kind: str  # SUBMISSION or DRIVER
    status: str
    entrypoint: str
    message: str
    start: float | None  # seconds since the epoch
    end: float | None
    metadata: dict[str, str]

    @property
    def duration_s(self) -> float | None:
        if self.start is None:
            return None
        return (self.end or time.time()) - self.start

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


def jobs_address(address: str | None = None) -> str:
    if address:
        return address.rstrip("/")
    env = os.environ.get("RAY_JOBS_ADDRESS") or ""
    ray_address = os.environ.get("RAY_ADDRESS") or ""
    if not env and ray_address.startswith(("http://", "https://")):
        env = ray_address
    if env:
        return env.rstrip("/")
    from lmforge import cluster

    info = cluster.running()
    return info.dashboard_url if info else DEFAULT_ADDRESS


class JobClient:
    def __init__(self, address: str | None = None) -> None:
        from lmforge import cluster

        self.address = jobs_address(address)
        cluster.set_client_env({"RAY_AUTH_MODE": "token"}, override=True)
        from ray.job_submission import JobSubmissionClient

        try:
            self._client = JobSubmissionClient(self.address)
        except Exception as err:  # ConnectionError, auth errors, RuntimeError(version)
            raise JobClientError(
                f"Ray Jobs API at {self.address} is not reachable: {first_line(err)}"
            ) from None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise JobClientError(f"{what} ({self.address}): {first_line(err)}") from None

    def submit(self, spec: JobSpec, submission_id: str | None = None) -> str:
        return self._call(
            "submitting the job",
            self._client.submit_job,
            entrypoint=spec.entrypoint,
            runtime_env=spec.runtime_env,
            metadata=spec.metadata,
            submission_id=submission_id,
        )

    def jobs(self) -> list[JobRow]:
        """Every job the cluster knows, newest first."""
        details = self._call("listing jobs", self._client.list_jobs)
        rows = [
            JobRow(
                submission_id=d.submission_id,
                job_id=d.job_id,
                kind=str(getattr(d.type, "value", d.type)),
                status=str(getattr(d.status, "value", d.status)),
                entrypoint=d.entrypoint or "",
                message=d.message or "",
                start=d.start_time / 1000 if d.start_time else None,
                end=d.end_time / 1000 if d.end_time else None,
                metadata=dict(d.metadata or {}),
            )
            for d in details
        ]
        return sorted(rows, key=lambda r: r.start or 0, reverse=True)

    def job(self, submission_id: str) -> JobRow:
        for row in self.jobs():
            if submission_id in (row.submission_id, row.job_id):
                return row
        raise JobClientError(f"no job {submission_id!r} on the cluster at {self.address}")

    def status(self, submission_id: str) -> str:
        s = self._call(f"job {submission_id}", self._client.get_job_status, submission_id)
        return str(getattr(s, "value", s))

    def logs(self, submission_id: str) -> str:
        """The job's whole log, without the terminal colour codes Ray puts in worker lines."""
        text = self._call(f"logs of {submission_id}", self._client.get_job_logs, submission_id)
        return ANSI.sub("", text)

    def tail(self, submission_id: str, lines: int = 200) -> str:
        return "\n".join(self.logs(submission_id).splitlines()[-lines:])

    def follow(self, submission_id: str) -> Iterator[str]:
        """The job's log as it is written, until the job ends (Ray's `tail_job_logs`
        websocket). Leaving the loop early (Ctrl-C) closes the connection; the job runs on."""
        loop = asyncio.new_event_loop()
        chunks = self._client.tail_job_logs(submission_id)
        try:
            while True:
                step = loop.create_task(_next(chunks))
                try:
                    chunk = loop.run_until_complete(step)
                except StopAsyncIteration:
                    return
                except KeyboardInterrupt:
                    step.cancel()  # unwinds the websocket and its session inside Ray
                    with contextlib.suppress(BaseException):
                        loop.run_until_complete(step)
                    raise
                except Exception as err:
                    raise JobClientError(
                        f"following the log of {submission_id} ({self.address}): {first_line(err)}"
                    ) from None
                yield ANSI.sub("", chunk)
        finally:
            with contextlib.suppress(BaseException):
                loop.run_until_complete(chunks.aclose())
            loop.close()

    def stop(self, submission_id: str) -> bool:
        return self._call(f"stopping {submission_id}", self._client.stop_job, submission_id)

    def wait(self, submission_id: str, timeout_s: float = 600, poll_s: float = 2) -> str:
        """Block until the job ends; its final status."""
        deadline = time.monotonic() + timeout_s
        while (status := self.status(submission_id)) not in TERMINAL:
            if time.monotonic() > deadline:
                raise JobClientError(f"job {submission_id} still {status} after {timeout_s:.0f} s")
            time.sleep(poll_s)
        return status


def failure_line(message: str) -> str:
    """The line of a failed job's message that says why: lmforge's one-line error
    (`lmforge train: error: zero.stage: ...`) if there is one, else Ray's last line."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ": error: " in ln:
            return ln.split(": error: ", 1)[1]
    return lines[-1] if lines else "no message from Ray"


async def _next(chunks):
    return await chunks.__anext__()
