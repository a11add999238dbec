"""The sweep's driver: check everything, then Ray Tune over whole lmforge training jobs.

    plan = plan_sweep("lr", "jobs/configs/tiny.yaml", "space.yaml", ["train.max_steps=60"],
                      SweepOptions(trials=8, max_concurrent=2))
    result = run_sweep(plan)            # or resume_sweep("lr") after the driver died

`plan_sweep` refuses, in one line and before Ray is touched, a bad name, bad options, a base
config or a space that does not validate (`space.check_space`). `run_sweep` connects to
Ray, checks each point of the space against a worker's memory (the launch estimate),
creates the MLflow parent run, and runs `tune.Tuner` with the trial trainable
(`trial.trial_main`) under ASHA (`ASHAScheduler`, time in training steps) or none, searched
at random (Tune's `BasicVariantGenerator`) or by Optuna (Tune's `OptunaSearch`, TPE), at most
`max_concurrent` trials at once. Tune keeps its experiment state in the run storage
(`<run.storage_path>/sweeps/<name>`), with this sweep's own description beside it
(`lmforge-sweep.json`), so `resume_sweep` continues a sweep whose driver died: finished
trials stay finished, the others resume from their jobs' checkpoints.

The driver logs one line per trial event (started, reported, stopped by the scheduler,
finished, failed) and, at the end, a table of every trial.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from ray.tune import Callback

from lmforge import storage
from lmforge.config import Config, config_from_dict, read_yaml
from lmforge.errors import UsageError, first_line
from lmforge.sweeps import record
from lmforge.sweeps.plan import (
    STATE_FILE,
    SweepOptions,
    SweepPlan,
    SweepResult,
    grace_steps,
    sweeps_root,
)
from lmforge.sweeps.space import (
    GRID_KEY,
    Space,
    base_mapping,
    check_space,
    parse_space,
    trial_config,
)
from lmforge.sweeps.tags import ALIAS_PREFIX
from lmforge.sweeps.trial import DRIVER_CPUS, TrialSetup, run_name, trial_main, trial_values

log = logging.getLogger(__name__)


def worker_memory(cfg: Config, nodes: list[dict[str, float]]) -> float | None:
    """The memory one worker has: a CPU worker's share (by its CPUs) of the roomiest node's
    Ray memory; None for GPU workers (Ray does not report GPU memory)."""
    if cfg.scaling.use_gpu:
        return None
    shares = [
        n["memory"] * cfg.scaling.cpus_per_worker / n["CPU"]
        for n in nodes
        if n.get("memory") and n.get("CPU")
    ]
    return max(shares, default=None)


def say_concurrency(name: str, cfg: Config, nodes: list[dict[str, float]], k: int) -> None:
    """One line when fewer than `k` trials' worker groups fit on the cluster at once (the
    others' drivers then wait for workers, which Tune does not know)."""
    from lmforge.training.placement import placeable, worker_bundle

    fit = placeable(worker_bundle(cfg), nodes, cfg.scaling.placement_strategy)
    at_once = fit // max(1, cfg.scaling.min_workers)
    if at_once < k:
        log.warning(
            "sweep %s: --max-concurrent %d, but the cluster fits the workers of %d trial(s) "
            "at once (%d workers of %s CPU each); the others wait for workers",
            name, k, at_once, cfg.scaling.min_workers, cfg.scaling.cpus_per_worker,
        )  # fmt: skip


def _vocab(cfg: Config) -> int | None:
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    try:
        from lmforge.data.mixture import open_data

        return open_data(cfg.data).vocab_size
    except Exception as err:  # the trial's own plan names a missing dataset
        log.debug("no vocab size for the estimate (%s)", first_line(err))
        return None


def _connect() -> list[dict[str, float]]:
    from lmforge import raycompat
    from lmforge.cluster import connect
    from lmforge.training.launch import alive_node_resources, skip_preemption_watcher

    raycompat.check_version()
    where = connect()
    nodes = alive_node_resources()
    skip_preemption_watcher(nodes)
    log.info("sweep on %s", where)
    return nodes


def run_sweep(plan: SweepPlan) -> SweepResult:
    """Connect, check the space against a worker's memory, create the parent run, tune."""
    o = plan.options
    nodes = _connect()
    base_cfg = plan.base_config
    from lmforge.training.placement import autoscaler_configured, check_placement

    check_placement(base_cfg, nodes, autoscaling=autoscaler_configured)
    say_concurrency(plan.name, base_cfg, nodes, o.max_concurrent)
    budget = o.worker_memory if o.worker_memory is not None else worker_memory(base_cfg, nodes)
    if budget is None:
        log.info(
            "sweep %s: GPU workers: the memory check of the space is left to each trial", plan.name
        )
    else:
        check_space(plan.space, plan.base, budget, _vocab(base_cfg))
    for s in plan.space.skipped:
        from lmforge.estimate import human_bytes

        point = {k: v for k, v in s.items() if not k.startswith("_")}
        log.warning(
            "sweep %s: skipped grid point %s: needs %s per worker by the launch estimate, a "
            "worker has %s",
            plan.name, json.dumps(point), human_bytes(s["_need"]), human_bytes(s["_budget"]),
        )  # fmt: skip
    base = _pin_tracking(plan.base)
    parent = _parent(plan.name, base, plan.space, o, plan.sweep_dir)
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "name": plan.name,
        "options": dataclasses.asdict(o),
        "base": base,
        "space": plan.space.to_dict(),
        "grid_points": plan.space.grid_points,
        "parent_run_id": parent,
    }
    (plan.sweep_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
    tuner = _tuner(plan.name, base, plan.space, o, parent, plan.sweep_dir.parent)
    return _finish(plan.name, base, o, parent, tuner, plan.space.skipped)


def resume_sweep(name: str, config: str | os.PathLike | None = None, overrides=None) -> SweepResult:
    """Continue sweep `name` from Tune's experiment state in the run storage (the base
    config's, `config`/`overrides` only for where that storage is): finished trials stay."""
    raw = read_yaml(Path(config)) if config is not None else {}
    root = sweeps_root(config_from_dict(base_mapping(raw, overrides or [])))
    state_file = root / name / STATE_FILE
    if not state_file.is_file():
        known = sorted(p.name for p in _children(root) if (p / STATE_FILE).is_file())
        raise UsageError(
            f"--resume {name}: no sweep of that name under {root} (sweeps there: "
            f"{', '.join(known) or 'none'}; --config names another run storage)"
        )
    state = json.loads(state_file.read_text())
    o = SweepOptions(**state["options"])
    space = parse_space(state["space"], str(state_file))
    space.grid_points = state.get("grid_points")
    _connect()
    import ray.tune

    log.info("sweep %s: resuming from %s", name, root / name)
    path, filesystem = storage.ray_storage(root / name)  # s3://: through its S3FileSystem
    tuner = ray.tune.Tuner.restore(
        path,
        trainable=_trainable(name, state["base"], o, state.get("parent_run_id")),
        resume_unfinished=True,
        resume_errored=True,
        storage_filesystem=filesystem,
    )
    parent = state.get("parent_run_id")
    if parent:
        record.reopen(config_from_dict(state["base"]).tracking.tracking_uri, parent)
    return _finish(name, state["base"], o, parent, tuner, [], resumed=True)


def _children(root: Path | storage.S3Path) -> list:
    try:
        return [p for p in root.iterdir() if p.is_dir()]
    except OSError:  # no sweeps dir yet
        return []


def _pin_tracking(base: dict[str, Any]) -> dict[str, Any]:
    """The base mapping with the MLflow URI resolved once (every trial logs to that store)."""
    from lmforge.tracking import run_setup

    cfg = run_setup.pin_uri(config_from_dict(base))
    if not cfg.tracking.enabled:
        return base
    return {
        **base,
        "tracking": {**base.get("tracking", {}), "tracking_uri": cfg.tracking.tracking_uri},
    }


def _parent(
    name: str, base: dict[str, Any], space: Space, o: SweepOptions, sweep_dir=None
) -> str | None:
    cfg = config_from_dict(base)
    if not cfg.tracking.enabled:
        return None
    params = {
        "scheduler": o.scheduler, "search": o.search, "metric": o.metric, "mode": o.mode,
        "trials": o.trials, "max_concurrent": o.max_concurrent,
        "grace_period": grace_steps(o, cfg),
        "reduction_factor": o.reduction_factor, "register_all": o.register_all,
        "registered_model": cfg.registered_model,
        **{f"space.{p.key}": p.describe() for p in space.params},
    }  # fmt: skip
    try:
        return record.parent_run(
            cfg.tracking.tracking_uri, cfg.tracking.experiment, name,
            {"params": params, "space": space.to_dict(), "base": base, "dir": sweep_dir},
        )  # fmt: skip
    except Exception as err:  # tracking trouble never stops the sweep
        log.warning("sweep %s: no MLflow parent run (%s)", name, first_line(err))
        return None


def _trainable(name: str, base: dict[str, Any], o: SweepOptions, parent: str | None):
    import ray.tune

    setup = TrialSetup(name, base, o.metric, o.mode, o.register_all, parent, o.init_from)
    return ray.tune.with_resources(
        ray.tune.with_parameters(trial_main, setup=setup), {"CPU": DRIVER_CPUS}
    )


def param_space(space: Space) -> dict[str, Any]:
    """Tune's search space: one sampler per key; the grid's points as one grid_search."""
    from ray import tune

    out: dict[str, Any] = {}
    for p in space.sampled:
        out[p.key] = sampler(p)
    if space.grid_points:
        out[GRID_KEY] = tune.grid_search(space.grid_points)
    return out


def sampler(p):
    """Tune's sampler of one parameter (randint's high excluded, as in SPACE.yaml)."""
    from ray import tune

    if p.kind == "choice":
        return tune.choice(list(p.values))
    lo, hi = p.values
    if p.kind == "randint":
        return tune.randint(int(lo), int(hi))
    return (tune.loguniform if p.kind == "loguniform" else tune.uniform)(lo, hi)


def _tuner(name, base, space: Space, o: SweepOptions, parent, root: Path | storage.S3Path):
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    cfg = config_from_dict(base)
    scheduler = FIFOScheduler()
    if o.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="step",
            max_t=cfg.train.max_steps,
            grace_period=grace_steps(o, cfg),
            reduction_factor=o.reduction_factor,
        )
    storage_path, filesystem = storage.ray_storage(root)
    search = None
    if o.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(seed=o.seed)
    elif o.seed is not None:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        search = BasicVariantGenerator(random_state=o.seed)
    return ray.tune.Tuner(
        _trainable(name, base, o, parent),
        param_space=param_space(space),
        tune_config=ray.tune.TuneConfig(
            metric=o.metric,
            mode=o.mode,
            num_samples=o.trials,
            max_concurrent_trials=o.max_concurrent,
            scheduler=scheduler,
            search_alg=search,
        ),  # fmt: skip
        run_config=ray.tune.RunConfig(
            name=name,
            # s3://: Tune writes its experiment state through the run storage's S3FileSystem
            storage_path=storage_path,
            storage_filesystem=filesystem,
            verbose=0,
            failure_config=ray.tune.FailureConfig(max_failures=0),
        ),
    )


class TrialLog(Callback):
    """Tune callback of the driver: one line per trial event; each ended trial tagged in
    MLflow (state, last step, stopped early)."""

    def __init__(self, name: str, base: dict[str, Any], o: SweepOptions) -> None:
        self.name, self.base, self.o = name, base, o
        self.cfg = config_from_dict(base)

    def _values(self, trial) -> str:
        return json.dumps(trial_values(trial.config), sort_keys=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        log.info("sweep %s: trial %s started %s", self.name, trial.trial_id, self._values(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.o.metric in result:
            log.info(
                "sweep %s: trial %s step %s %s %.4f", self.name, trial.trial_id,
                result.get("step"), self.o.metric, result[self.o.metric],
            )  # fmt: skip

    def on_trial_complete(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step")
        max_steps = trial_config(self.base, trial_values(trial.config)).train.max_steps
        early = step is not None and step < max_steps
        what = (
            f"stopped by {self.o.scheduler} at step {step}" if early else f"finished at step {step}"
        )
        log.info("sweep %s: trial %s %s", self.name, trial.trial_id, what)
        self._mark(trial, "STOPPED" if early else "TERMINATED", step, early)

    def on_trial_error(self, iteration, trials, trial, **info):
        step = (trial.last_result or {}).get("step")
        log.warning(
            "sweep %s: trial %s failed at step %s (its log: %s)",
            self.name, trial.trial_id, step, trial.path,
        )  # fmt: skip
        self._mark(trial, "ERROR", step, False)

    def _mark(self, trial, state, step, early):
        if self.cfg.tracking.enabled:
            record.mark_trial(
                self.cfg.tracking.tracking_uri, self.cfg.tracking.experiment,
                self.name, trial.trial_id, state, step, early,
            )  # fmt: skip


class ReplayRungs(Callback):
    """Tune saves no scheduler state: a resumed sweep's ASHA starts with empty rungs, and a
    bad trial that resumes would then never be stopped (nothing to rank it against). Before
    the first step of a resumed sweep this hands ASHA every ended trial's reports, from the
    trial's own result.json in the run storage, as if it had seen them."""

    def __init__(self, name: str, scheduler, metric: str) -> None:
        self.name, self.scheduler, self.metric, self.done = name, scheduler, metric, False

    def on_step_begin(self, iteration, trials, **info):
        if self.done:
            return
        self.done = True
        n = 0
        for trial in trials:
            if trial.status not in ("TERMINATED", "ERROR"):
                continue
            results = _results_of(trial)
            reported = [r for r in results if self.metric in r and "step" in r]
            if not reported:
                continue
            self.scheduler.on_trial_add(None, trial)
            for r in reported:
                self.scheduler.on_trial_result(None, trial, r)
            self.scheduler.on_trial_remove(None, trial)
            n += 1
        log.info("sweep %s: ASHA's rungs rebuilt from %d ended trial(s)", self.name, n)


def _results_of(trial) -> list[dict[str, Any]]:
    """A trial's reports, from Tune's result.json (one JSON per line) in its dir, through
    the experiment's filesystem (local, or the run storage's S3)."""
    fs = trial.storage.storage_filesystem
    try:
        with fs.open_input_stream(f"{trial.path}/result.json") as f:
            text = f.read().decode()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _finish(name, base, o: SweepOptions, parent, tuner, skipped, resumed=False) -> SweepResult:
    """Run the tuner (with the trial log), then the table, the best and its registration."""
    # Tune's RunConfig of the (new or restored) experiment: this driver's trial log, once.
    run_config = tuner._local_tuner.get_run_config()
    mine = (TrialLog, ReplayRungs)
    run_config.callbacks = [
        *(c for c in run_config.callbacks or [] if not isinstance(c, mine)),
        TrialLog(name, base, o),
    ]
    if resumed and o.scheduler == "asha":
        scheduler = tuner._local_tuner._tune_config.scheduler  # the one fit() will use
        run_config.callbacks.append(ReplayRungs(name, scheduler, o.metric))
    grid = tuner.fit()
    cfg = config_from_dict(base)
    from lmforge.training.plan import storage_dir

    rows = []
    for r in grid:
        trial_id = (r.metrics or {}).get("trial_id") or _trial_id_of(r.path)
        values = trial_values(r.config or {})
        df = r.metrics_dataframe
        best_v = last_v = math.nan
        if df is not None and o.metric in df:
            col = df[o.metric].dropna()
            if len(col):
                best_v = float(col.min() if o.mode == "min" else col.max())
                last_v = float(col.iloc[-1])
        step = (r.metrics or {}).get("step")
        max_steps = trial_config(base, values).train.max_steps
        state = (
            "ERROR"
            if r.error
            else ("STOPPED" if step is not None and step < max_steps else "TERMINATED")
        )
        rows.append({
            "trial": trial_id, "values": values, "state": state, "last_step": step,
            "best": best_v, "last": last_v, "run_dir": str(storage_dir(cfg) / run_name(name, trial_id)),
        })  # fmt: skip
    sign = 1 if o.mode == "min" else -1
    sane = [r for r in rows if math.isfinite(r["best"]) and abs(r["best"]) < 1e8]
    best = min(sane, key=lambda r: sign * r["best"]) if sane else None
    result = SweepResult(name, rows, None, parent, skipped)
    print(table(rows, o.metric), flush=True)
    if best is not None:
        tcfg = trial_config(base, best["values"])
        out = {
            "trial_id": best["trial"], "values": best["values"], "value": best["best"],
            "metric": o.metric, "run_dir": best["run_dir"], "config": tcfg.to_dict(),
        }  # fmt: skip
        if cfg.tracking.enabled:
            try:
                got = record.register_best(
                    cfg.tracking.tracking_uri, cfg.tracking.experiment, cfg.registered_model,
                    name, storage.resolve(best["run_dir"]), o.metric, o.mode,
                )  # fmt: skip
            except Exception as err:
                log.warning(
                    "sweep %s: the best checkpoint was not registered (%s)", name, first_line(err)
                )
                got = None
            if got is not None:
                out["version"], out["checkpoint"] = got[0], str(got[1])
                log.info(
                    "sweep %s: best trial %s (%s %.4f) registered as models:/%s/%s, alias @%s%s",
                    name, best["trial"], o.metric, best["best"], cfg.registered_model, got[0],
                    ALIAS_PREFIX, name,
                )  # fmt: skip
        result.best = out
    if parent:
        errors = any(r["state"] == "ERROR" for r in rows)
        record.finish_parent(
            cfg.tracking.tracking_uri,
            parent,
            result.best,
            "FAILED" if errors and best is None else "FINISHED",
        )
    return result


def _trial_id_of(path: str) -> str:
    """The trial id in a Tune trial dir's name (`trial_main_<id>_<n>_<values>_<date>`; a searcher's ids are 8 hex), for a
    trial that never reported."""
    m = re.search(r"^trial_main_([0-9a-f]{5}_\d{5}|[0-9a-f]{8})_", Path(path).name)
    return m.group(1) if m else Path(path).name


def table(rows: list[dict[str, Any]], metric: str) -> str:
    """The final table: one line per trial."""
    keys = sorted({k for r in rows for k in r["values"]})
    head = ["trial", *keys, "state", "step", f"last {metric}", f"best {metric}"]
    body = [
        [
            r["trial"],
            *(_fmt(r["values"].get(k)) for k in keys),
            r["state"],
            str(r["last_step"]),
            _fmt(r.get("last")),
            _fmt(r["best"]),
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True))
        for line in [head, *body]
    ]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
