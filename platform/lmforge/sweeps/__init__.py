"""Sweeps (issue 28): Ray Tune over whole lmforge training jobs, stopped early by ASHA,
searched at random or by Optuna, tracked as one MLflow parent run with a child per trial.

The one interface the CLI (`lmforge sweep`), `jobs/sweep.py` and the dashboard call:

    from lmforge import sweeps
    plan = sweeps.plan_sweep(name, "base.yaml", "space.yaml", ["train.max_steps=60"],
                             sweeps.SweepOptions(trials=8, max_concurrent=2))  # checks only
    result = sweeps.run_sweep(plan)           # Tune; the best registered as @sweep-<name>
    result = sweeps.resume_sweep(name)        # after the driver died
    sweeps.list_sweeps(uri), sweeps.trials_of(uri, experiment, name)   # reading back

`space` (SPACE.yaml and its checks), `plan` (the options and every check before Ray),
`trial` (one trial: a whole training job under Tune), `driver` (the Tuner), `record` (MLflow and the registry). Importing this package imports
no Ray: the driver is imported on first use.
"""

from __future__ import annotations

from typing import Any

from lmforge.sweeps.space import Space, check_space, load_space, parse_space

__all__ = [
    "Space",
    "SweepOptions",
    "check_space",
    "list_sweeps",
    "load_space",
    "parse_space",
    "plan_sweep",
    "resume_sweep",
    "run_sweep",
    "trials_of",
]


def __getattr__(name: str) -> Any:
    if name in ("SweepOptions", "SweepPlan", "SweepResult", "plan_sweep"):
        from lmforge.sweeps import plan

        return getattr(plan, name)
    if name in ("run_sweep", "resume_sweep"):
        from lmforge.sweeps import driver

        return getattr(driver, name)
    if name in ("list_sweeps", "trials_of", "curves_of"):
        from lmforge.sweeps import record

        return getattr(record, name)
    raise AttributeError(name)
