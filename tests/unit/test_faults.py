"""The fault-injection switch the resilience tests use: parsed strictly, fires once."""

import os
import signal

import pytest

from lmforge import faults


def test_spec_is_parsed_or_refused_with_the_variable_named():
    assert faults.parse("step:6:1,checkpoint:8:0") == [("step", 6, 1), ("checkpoint", 8, 0)]
    for bad in ("step:6", "boom:1:0", "step:x:0"):
        with pytest.raises(ValueError, match="LMFORGE_FAULT="):
            faults.parse(bad)


def test_fires_once_at_its_point_only(tmp_path, monkeypatch):
    kills = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append((pid, sig)))
    monkeypatch.setenv("LMFORGE_FAULT", "step:3:1")
    monkeypatch.setenv("LMFORGE_FAULT_ONCE", str(tmp_path / "once"))
    faults.maybe_kill("step", 3, 0)  # another rank
    faults.maybe_kill("checkpoint", 3, 1)  # another point
    faults.maybe_kill("step", 2, 1)  # another step
    assert kills == []
    faults.maybe_kill("step", 3, 1)
    assert kills == [(os.getpid(), signal.SIGKILL)]
    assert (tmp_path / "once.step-3-1").exists()
    faults.maybe_kill("step", 3, 1)  # the restarted worker runs on
    assert len(kills) == 1
    monkeypatch.delenv("LMFORGE_FAULT")
    faults.maybe_kill("step", 3, 1)
    assert len(kills) == 1


def test_hold_waits_until_its_file_is_deleted_and_kills_nothing(tmp_path, monkeypatch):
    import threading

    kills = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: kills.append((pid, sig)))
    monkeypatch.setenv("LMFORGE_FAULT", "checkpoint:8:0")
    monkeypatch.setenv("LMFORGE_FAULT_ONCE", str(tmp_path / "once"))
    flag = tmp_path / "held"
    monkeypatch.setenv("LMFORGE_FAULT_HOLD", str(flag))
    held = threading.Thread(target=faults.maybe_kill, args=("checkpoint", 8, 0))
    held.start()
    for _ in range(100):
        if flag.exists():
            break
        held.join(0.05)
    assert flag.exists() and held.is_alive()  # holding at its point
    held.join(0.5)
    assert held.is_alive()
    flag.unlink()
    held.join(5)
    assert not held.is_alive() and kills == []
    faults.maybe_kill("checkpoint", 8, 0)  # once: the restarted worker does not hold
    assert not flag.exists()


def test_a_hold_directory_gives_each_holding_process_its_own_file(tmp_path, monkeypatch):
    import threading

    monkeypatch.setattr(os, "kill", lambda pid, sig: pytest.fail("a hold kills nothing"))
    monkeypatch.setenv("LMFORGE_FAULT", "step:3:0")
    holds = tmp_path / "holds"
    monkeypatch.setenv("LMFORGE_FAULT_HOLD", f"{holds}/")
    held = threading.Thread(target=faults.maybe_kill, args=("step", 3, 0))
    held.start()
    mine = holds / str(os.getpid())
    for _ in range(100):
        if mine.exists():
            break
        held.join(0.05)
    assert [p.name for p in holds.iterdir()] == [mine.name] and held.is_alive()
    mine.unlink()
    held.join(5)
    assert not held.is_alive()
