"""A sweep's plan: its name, options, base config and space, every check that needs no
Ray (the CLI, jobs/sweep.py and the dashboard's form call `plan_sweep` before anything
starts; `driver.run_sweep` runs the plan). Imports no Ray and no training loop.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import storage
from lmforge.config import Config, ConfigError, config_from_dict, read_yaml
from lmforge.errors import UsageError
from lmforge.sweeps.space import (
    Space,
    base_mapping,
    check_space,
    load_space,
    parse_space,
    trial_config,
)

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STATE_FILE = "lmforge-sweep.json"
SWEEPS_DIR = "sweeps"  # under the run storage
METRIC = re.compile(r"^(val_loss|val_perplexity|loss|val_loss/[A-Za-z0-9_.-]+)$")
EVAL_METRIC = re.compile(r"^eval\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_,.-]+)$")  # eval.<task>.<metric>


@dataclass(frozen=True)
class SweepOptions:
    trials: int = 8  # Tune's num_samples (with grid keys: samples per grid point)
    max_concurrent: int = 2
    scheduler: str = "asha"  # asha | none
    search: str = "random"  # random | optuna
    metric: str = "val_loss"
    mode: str = "min"
    grace_period: int | None = None  # steps before ASHA may stop a trial; default eval_every
    reduction_factor: float = 2.0
    register_all: bool = False
    seed: int | None = None
    worker_memory: float | None = None  # bytes a worker has; None: from the cluster
    init_from: str | None = None  # every trial fine-tunes these weights (a LoRA space needs it)


@dataclass
class SweepPlan:
    name: str
    options: SweepOptions
    base: dict[str, Any]  # the base config mapping, --set applied
    space: Space
    sweep_dir: Path | storage.S3Path

    @property
    def base_config(self) -> Config:
        return config_from_dict(self.base)


@dataclass
class SweepResult:
    name: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None = None
    parent_run_id: str | None = None
    skipped: list[dict[str, Any]] = field(default_factory=list)


def check_options(name: str, o: SweepOptions, base: Config, space: Space) -> None:
    if not NAME.match(name):
        raise UsageError(
            f"--name {name!r}: letters, digits, _ . - (at most 64), starting with a letter or digit"
        )
    if o.trials < 1:
        raise UsageError(f"--trials {o.trials}: at least 1")
    if o.max_concurrent < 1:
        raise UsageError(f"--max-concurrent {o.max_concurrent}: at least 1")
    if o.scheduler not in ("asha", "none"):
        raise UsageError(f"--scheduler {o.scheduler!r}: asha or none")
    if o.search not in ("random", "optuna"):
        raise UsageError(f"--search {o.search!r}: random or optuna")
    if o.mode not in ("min", "max"):
        raise UsageError(f"--mode {o.mode!r}: min or max")
    if o.metric.startswith("eval."):
        check_eval_metric(o.metric, base)
    elif not METRIC.match(o.metric):
        raise UsageError(
            f"--metric {o.metric!r}: one of val_loss, val_perplexity, loss, val_loss/<source>, "
            "eval.<task>.<metric>"
        )
    if o.search == "optuna" and space.grid:
        raise UsageError(
            f"{space.path}: grid keys ({', '.join(p.key for p in space.grid)}) with --search "
            "optuna: Optuna samples; use choice instead of grid, or --search random"
        )
    if o.grace_period is not None and o.grace_period < 1:
        raise UsageError(f"--grace-period {o.grace_period}: at least 1 step")
    if o.reduction_factor <= 1:
        raise UsageError(f"--reduction-factor {o.reduction_factor}: above 1")
    if base.run.name is not None:
        log.info("run.name=%s is ignored: each trial's run is <sweep>-<trial id>", base.run.name)


def grace_steps(o: SweepOptions, base: Config) -> int:
    """ASHA's grace period: --grace-period, else the first report of the metric (the first
    evaluation: each eval_every steps; a score: each checkpoint)."""
    if o.grace_period:
        return o.grace_period
    return base.train.checkpoint_every if o.metric.startswith("eval.") else base.train.eval_every


def check_eval_metric(metric: str, base: Config) -> None:
    """`eval.<task>.<metric>`: a score of each checkpoint's evaluation (lmforge.evaluation),
    so the base config evaluates checkpoints with that task."""
    m = EVAL_METRIC.match(metric)
    if m is None:
        raise UsageError(f"--metric {metric!r}: eval.<task>.<metric>, e.g. eval.copy.acc")
    task = m.group(1)
    from lmforge.evaluation.tasks import check_tasks

    names = [t.name for t in check_tasks(base.eval.tasks)] if base.eval.tasks else []
    if task not in names:
        raise UsageError(
            f"--metric {metric}: task {task!r} is not evaluated by the base config "
            f"(eval.tasks: {', '.join(names) or 'none'}); add it to eval.tasks"
        )
    if base.train.checkpoint_every > base.train.max_steps:
        raise UsageError(
            f"--metric {metric}: scores come with checkpoints, and train.checkpoint_every="
            f"{base.train.checkpoint_every} exceeds train.max_steps={base.train.max_steps}"
        )


def sweeps_root(base: Config) -> Path | storage.S3Path:
    """Where sweeps keep their state: `<run.storage_path>/sweeps`, local or s3://."""
    from lmforge.training.plan import storage_dir

    return storage_dir(base) / SWEEPS_DIR


def plan_sweep(
    name: str,
    config: str | os.PathLike | dict | None,
    space: str | os.PathLike | dict,
    overrides: list[str] | None = None,
    options: SweepOptions | None = None,
) -> SweepPlan:
    """Every check that needs no Ray: the name, the options, the base config, the space."""
    options = options or SweepOptions()
    if isinstance(config, dict):  # a mapping (the dashboard's form), not a file
        raw, config = config, None
    else:
        raw = read_yaml(Path(config)) if config is not None else {}
    try:
        base = base_mapping(raw, overrides or [])
    except ConfigError as err:
        raise ConfigError(f"{config}: {err}" if config else str(err)) from None
    base.setdefault("run", {})
    base["run"] = {k: v for k, v in base["run"].items() if k != "name"}
    base_cfg = config_from_dict(base)
    sp = parse_space(space) if isinstance(space, dict) else load_space(space)
    check_options(name, options, base_cfg, sp)
    check_space(sp, base)  # the schema; the memory check needs the cluster (run_sweep)
    from lmforge.training.plan import check_lora

    for p in sp.params:  # a LoRA trial needs a base (--init-from) and a stage that trains it
        try:
            check_lora(trial_config(base, {p.key: p.extremes()[0]}), False, options.init_from)
        except ConfigError as err:
            raise ConfigError(f"{p.where}: {p.key}: {err}") from None
    sweep_dir = sweeps_root(base_cfg) / name
    if (sweep_dir / STATE_FILE).is_file():
        raise UsageError(
            f"sweep {name!r} exists ({sweep_dir}); continue it with `lmforge sweep --resume "
            f"{name}`, or choose another --name"
        )
    return SweepPlan(name, options, base, sp, sweep_dir)
