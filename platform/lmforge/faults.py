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
                                               checkpoint is being written); <dir>/ (a
                                               trailing slash): each holding process its own
                                               file <dir>/<pid>, so a test can tell holders
                                               apart and release them one by one

    LMFORGE_FAULT=nan:step:<step>              rank 0's loss of optimizer step <step> is NaN
                                               (its gradients too: the all-reduce makes them
                                               every rank's)
    LMFORGE_FAULT=spike:step:<step>:<factor>   every rank's loss of that step x <factor>
                                               (each loss fault fires once per process: the
                                               step a guard rolled back is not hit again)

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


LOSS_FAULTS = ("nan", "spike")
_fired: set[tuple[str, int]] = set()  # loss faults that fired in this process


def parse(spec: str) -> list[tuple[str, int, int]]:
    """The kill faults of a spec (its loss faults are `parse_loss`'s)."""
    faults = []
    for item in spec.split(","):
        if item.strip().split(":")[0] in LOSS_FAULTS:
            parse_loss(item)
            continue
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


def parse_loss(spec: str) -> list[tuple[str, int, float]]:
    """(kind, step, factor) of each loss fault: `nan:step:N`, `spike:step:N:F`."""
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if parts[0] not in LOSS_FAULTS:
            continue
        try:
            kind, point, step, *rest = parts
            if point != "step" or len(rest) != (kind == "spike"):
                raise ValueError
            out.append((kind, int(step), float(rest[0]) if rest else float("nan")))
        except ValueError:
            raise UsageError(
                f"LMFORGE_FAULT={spec!r}: expected nan:step:<step> or spike:step:<step>:<factor>"
            ) from None
    return out


def corrupt_loss(loss, step: int, rank: int):
    """`loss` as a loss fault of `step` leaves it: NaN on rank 0, or times a factor."""
    spec = os.environ.get("LMFORGE_FAULT")
    if not spec:
        return loss
    for kind, at, factor in parse_loss(spec):
        if at != step or (kind, at) in _fired or (kind == "nan" and rank != 0):
            continue
        _fired.add((kind, at))
        print(f"fault injection: {kind} in the loss of step {step} on rank {rank}", flush=True)
        return loss * float("nan") if kind == "nan" else loss * factor
    return loss


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
        if hold.endswith(("/", os.sep)):
            flag.mkdir(parents=True, exist_ok=True)
            flag = flag / str(os.getpid())
        flag.write_text(f"pid {os.getpid()}, rank {rank}, {point} {step}\n")
        print(f"fault injection: worker rank {rank} holds at {point} {step} until {flag} "
              "is deleted", flush=True)  # fmt: skip
        deadline = time.monotonic() + HOLD_MAX_S
        while flag.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    print(f"fault injection: SIGKILL to worker rank {rank} at {point} {step}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
