"""services.ManagedProcess: a real child process started, found again, told apart from a
reused pid, stopped with its whole group, and a failed start named with its log."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace

import pytest

from lmforge.services import (
    START_TIME_SLACK_S,
    ManagedProcess,
    ServiceRecord,
    log_tail,
    process_start_time,
)


@dataclass(frozen=True)
class ToyInfo(ServiceRecord):
    url: str


class ToyError(Exception):
    pass


# A parent that starts a child in its own group, then says it is ready.
SERVE = """
import os, pathlib, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
pathlib.Path(sys.argv[1] + ".tmp").write_text(str(child.pid))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(120)
"""


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    svc = ManagedProcess("toy", "the toy service", ToyInfo)
    yield svc
    svc.stop(timeout_s=5)


def test_start_records_finds_and_stops_the_whole_group(toy, tmp_path):
    ready = tmp_path / "ready"
    info = toy.start(
        [sys.executable, "-c", SERVE, str(ready)],
        env=dict(os.environ),
        log_file=tmp_path / "logs" / "toy.log",
        ready=ready.is_file,
        timeout_s=30,
        error=ToyError,
        poll_s=0.1,
        url="http://127.0.0.1:1",
    )
    assert toy.running() == info and info.url == "http://127.0.0.1:1"
    assert toy.state_file == tmp_path / "home" / "toy.json"
    assert info.started == process_start_time(info.pid)
    child = int(ready.read_text())
    assert toy.stop(timeout_s=10)
    assert process_start_time(info.pid) is None and process_start_time(child) is None
    assert toy.running() is None and not toy.state_file.exists()
    assert not toy.stop()  # nothing left to stop


def test_a_reused_pid_is_not_the_service(toy):
    # This very process, recorded with another start time: alive, but not what was started.
    mine = ToyInfo(pid=os.getpid(), started=process_start_time(os.getpid()), log_file="-", url="u")
    toy.state_file.parent.mkdir(parents=True, exist_ok=True)
    toy.state_file.write_text(json.dumps(asdict(mine)))
    assert toy.running() == mine
    other = replace(mine, started=mine.started - START_TIME_SLACK_S - 1)
    toy.state_file.write_text(json.dumps(asdict(other)))
    assert toy.running() is None and toy.recorded() == other
    # The wall clock stepped by 5 s since the record (NTP, a resumed VM): the kernel's boot
    # time moved with it, and so did this process's start time; it is still the service.
    stepped = replace(mine, started=mine.started + 5)
    toy.state_file.write_text(json.dumps(asdict(stepped)))
    assert toy.running() == stepped
    toy.state_file.write_text('{"pid": 1}')  # an older layout
    assert toy.recorded() is None and toy.running() is None
    toy.state_file.unlink()  # (the fixture's stop() must not signal this process)


def test_a_process_that_exits_is_one_error_with_its_log_tail(toy, tmp_path):
    log = tmp_path / "toy.log"
    code = "import sys; print('binding 127.0.0.1:1'); print('error: address in use'); sys.exit(3)"
    t0 = time.monotonic()
    with pytest.raises(ToyError) as err:
        toy.start(
            [sys.executable, "-c", code],
            env=dict(os.environ),
            log_file=log,
            ready=lambda: False,
            timeout_s=60,
            error=ToyError,
            poll_s=0.1,
            url="u",
        )
    assert time.monotonic() - t0 < 20  # noticed the exit, did not wait for the timeout
    assert str(err.value) == (
        f"the toy service did not start (see {log}): binding 127.0.0.1:1 | error: address in use"
    )
    assert toy.running() is None and not toy.state_file.exists()


def test_a_process_never_ready_is_stopped_after_the_timeout(toy, tmp_path):
    with pytest.raises(ToyError, match="did not start"):
        toy.start(
            [sys.executable, "-c", "import time; time.sleep(120)"],
            env=dict(os.environ),
            log_file=tmp_path / "toy.log",
            ready=lambda: False,
            timeout_s=1,
            error=ToyError,
            poll_s=0.1,
            url="u",
        )
    assert toy.running() is None


def test_log_tail_keeps_the_last_non_empty_lines(tmp_path):
    f = tmp_path / "x.log"
    f.write_text("a\n\nb\nc\n  \nd\n")
    assert log_tail(f, 3) == "b | c | d"
    assert log_tail(tmp_path / "missing.log") == "(no log)"
