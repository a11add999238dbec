"""A sweep's driver as a Ray job (`lmforge sweep --submit`, the dashboard's Launch page).

The job runs `python jobs/sweep.py --name NAME --set K=V ... [options]`, the same code path
as `lmforge sweep`; the base config travels as `--set` tokens (`jobspec.train_job`'s
rendering: every token shell-inert) and the space, which holds YAML a shell must not see,
as JSON in the job's environment (`SPACE_ENV`), never in its command line.
"""

from __future__ import annotations

import json
import shlex

from lmforge.config import Config
from lmforge.jobspec import JobSpec, entrypoint, runtime_env, safe_token, train_job
from lmforge.sweeps.space import Space

SPACE_ENV = "LMFORGE_SWEEP_SPACE"


def sweep_job(
    name: str,
    cfg: Config,
    space: Space,
    options,  # driver.SweepOptions
    tracking_uri: str | None = None,
    any_path: bool = False,
    env_vars: dict[str, str] | None = None,
) -> JobSpec:
    """The job of a checked sweep (`plan_sweep` first: it refuses a bad space)."""
    base = train_job(cfg, tracking_uri, any_path=any_path, env_vars=env_vars)
    args = shlex.split(base.entrypoint.removeprefix("exec "))
    args[1] = "jobs/sweep.py"
    kept: list[str] = []
    it = iter(args)
    for tok in it:  # each trial names its own run: no run.name
        if tok == "--set":
            value = next(it)
            if not value.startswith("run.name="):
                kept += [tok, value]
        else:
            kept.append(tok)
    o = options
    kept += ["--name", safe_token("name", name).split("=", 1)[1]]
    kept += ["--trials", str(o.trials), "--max-concurrent", str(o.max_concurrent)]
    kept += ["--scheduler", o.scheduler, "--search", o.search, "--mode", o.mode]
    kept += ["--metric", safe_token("metric", o.metric).split("=", 1)[1]]
    kept += ["--reduction-factor", repr(float(o.reduction_factor))]
    if o.grace_period is not None:
        kept += ["--grace-period", str(o.grace_period)]
    if o.seed is not None:
        kept += ["--seed", str(o.seed)]
    if o.register_all:
        kept.append("--register-all")
    if o.init_from:
        kept += ["--init-from", safe_token("init_from", o.init_from).split("=", 1)[1]]
    env = {**base.runtime_env}
    env["env_vars"] = {**env.get("env_vars", {}), SPACE_ENV: json.dumps(space.to_dict())}
    meta = {
        "lmforge.kind": "sweep",
        "lmforge.sweep": name,
        "lmforge.run_name": f"sweep {name}",
        "lmforge.experiment": cfg.tracking.experiment,
    }
    return JobSpec(entrypoint(kept), env, meta)


def resume_job(
    name: str, env_vars: dict[str, str] | None = None, sweep_dir: str | None = None
) -> JobSpec:
    """The job that continues sweep `name` (`jobs/sweep.py --resume NAME`): in the run
    storage its state is in (`sweep_dir`, `<run storage>/sweeps/<name>`, as the sweep's
    MLflow parent run records it), else in the job's default run storage. A sweep on S3
    hands the job this process's AWS_* variables (`env_vars` adds to them)."""
    from lmforge import storage

    args = ["python", "jobs/sweep.py", "--resume", safe_token("name", name).split("=", 1)[1]]
    env = dict(env_vars or {})
    if sweep_dir:
        root = str(sweep_dir).rstrip("/").rsplit("/", 2)[0]  # <run storage>/sweeps/<name>
        args += ["--set", safe_token("run.storage_path", root)]
        if storage.is_s3(root):
            env = {**storage.runtime_env_vars(), **env}
    meta = {"lmforge.kind": "sweep", "lmforge.sweep": name, "lmforge.run_name": f"sweep {name}"}
    return JobSpec(entrypoint(args), runtime_env(env), meta)
