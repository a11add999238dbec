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
