"""Every use of Ray's private modules and file names, in one place.

Written against Ray 2.60 (`WRITTEN_FOR`): a Ray of another minor version may have moved
any of them, so `check_version` refuses it in one line instead of failing somewhere deep
inside a worker. Nothing else in lmforge imports `ray._private` or `ray.*._internal`, or
names a file Ray Train writes.
"""

from __future__ import annotations

import logging

from lmforge.errors import LmforgeError

WRITTEN_FOR = "2.60"  # major.minor of the Ray these internals were read from

# Ray Train's record of a run's checkpoints, in its run dir (its CheckpointManager's
# snapshot): Ray writes it once every rank's copy of a checkpoint finished.
TRAIN_RECORD = "checkpoint_manager_snapshot.json"


class RayVersionError(LmforgeError):
    """The installed Ray is not the one lmforge's use of its internals was written for."""


def check_version(version: str | None = None) -> None:
    """Refuse a Ray whose major.minor is not `WRITTEN_FOR` (`version`: Ray's, by default)."""
    if version is None:
        import ray

        version = ray.__version__
    if ".".join(version.split(".")[:2]) != WRITTEN_FOR:
        raise RayVersionError(
            f"ray=={version} is installed, but lmforge is written for Ray {WRITTEN_FOR}.x "
            f"(it uses Ray internals, lmforge/raycompat.py): install ray=={WRITTEN_FOR}.0 "
            "(constraints.txt)"
        )


def quiet_train_reports() -> None:
    """Drop Ray Train's INFO line per `report()`, which would drown our progress lines.

    Ray 2.60 names that logger by file path (`logging.getLogger(__file__)` in its
    execution/context.py), so RunConfig's LoggingConfig, which filters `ray.train.*`
    records, does not reach it.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def worker_output_dispatcher():
    """Ray's dispatcher of the worker output a driver prints (`ray_print_logs` is its
    handler, added by `ray.init`): `.handlers` [(name, fn)], guarded by `._lock`."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher
