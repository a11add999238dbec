"""Fault injection, for the resilience tests and for trying recovery on a real cluster.

    LMFORGE_FAULT=<point>:<step>:<rank>[,...]  kill that worker's process with SIGKILL at
                                               <point> of optimizer step <step>
    LMFORGE_FAULT_ONCE=<prefix>                each fault fires only while the file
                                               <prefix>.<point>-<step>-<rank> does not exist (it
                                               is created just before the kill), so the
                                               restarted worker runs on
    LMFORGE_FAULT_HOLD=<file>                  instead of the kill: create <file> and wait
                                               (at most HOLD_MAX_S) until it is deleted, so
                                               something else can be broken at exactly that
                                               point (the object store stopped while a
                                               checkpoint is being written)

    LMFORGE_FAULT_STEP_DELAY_S=<seconds>       every worker sleeps this long after each
                                               optimizer step: a slow run, so that a test
                                               can act mid-run (kill or add a node)

Points: `step` (right after the step, between checkpoints) and `checkpoint` (while that
step's checkpoint is being written: after DeepSpeed saved the engine state, before the
checkpoint is handed to Ray). SIGKILL, as the OOM killer or a lost node would do: no
Python cleanup runs. Set them in a job's runtime env (`env_vars`); unset, this is a no-op.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lmforge.errors import UsageError

POINTS = ("step", "checkpoint")
HOLD_MAX_S = 600.0


def parse(spec: str) -> list[tuple[str, int, int]]:
    faults = []
    for item in spec.split(","):
        try:
            point, step, rank = item.strip().split(":")
            if point not in POINTS:
                raise ValueError
            faults.append((point, int(step), int(rank)))
        except ValueError:
            raise UsageError(
                f"LMFORGE_FAULT={spec!r}: expected <point>:<step>:<rank>[,...], point one of "
                f"{', '.join(POINTS)}"
            ) from None
    return faults


def maybe_kill(point: str, step: int, rank: int) -> None:
    delay = os.environ.get("LMFORGE_FAULT_STEP_DELAY_S")
    if delay and point == "step":
        time.sleep(float(delay))
    spec = os.environ.get("LMFORGE_FAULT")
    if not spec or (point, step, rank) not in parse(spec):
        return
    once = os.environ.get("LMFORGE_FAULT_ONCE")
    if once:
        marker = Path(f"{once}.{point}-{step}-{rank}")
        if marker.exists():
            return
        marker.write_text(f"pid {os.getpid()}\n")
    if hold := os.environ.get("LMFORGE_FAULT_HOLD"):
        flag = Path(hold)
        flag.write_text(f"pid {os.getpid()}, rank {rank}, {point} {step}\n")
        print(f"fault injection: worker rank {rank} holds at {point} {step} until {flag} "
              "is deleted", flush=True)  # fmt: skip
        deadline = time.monotonic() + HOLD_MAX_S
        while flag.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    print(f"fault injection: SIGKILL to worker rank {rank} at {point} {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
