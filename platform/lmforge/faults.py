"""Fault injection, for the resilience tests and for trying recovery on a real cluster.

    LMFORGE_FAULT=<point>:<step>:<rank>[,...]  kill that worker's process with SIGKILL at
                                               <point> of optimizer step <step>
    LMFORGE_FAULT_ONCE=<prefix>                each fault fires only while the file
                                               <prefix>.<point>-<step>-<rank> does not exist (it
                                               is created just before the kill), so the
                                               restarted worker runs on

Points: `step` (right after the step, between checkpoints) and `checkpoint` (while that
step's checkpoint is being written: after DeepSpeed saved the engine state, before the
checkpoint is handed to Ray). SIGKILL, as the OOM killer or a lost node would do: no
Python cleanup runs. Set them in a job's runtime env (`env_vars`); unset, this is a no-op.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lmforge.errors import UsageError

POINTS = ("step", "checkpoint")


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
    spec = os.environ.get("LMFORGE_FAULT")
    if not spec or (point, step, rank) not in parse(spec):
        return
    once = os.environ.get("LMFORGE_FAULT_ONCE")
    if once:
        marker = Path(f"{once}.{point}-{step}-{rank}")
        if marker.exists():
            return
        marker.write_text(f"pid {os.getpid()}\n")
    print(f"fault injection: SIGKILL to worker rank {rank} at {point} {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
