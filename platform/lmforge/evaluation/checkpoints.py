"""Every checkpoint a run persists, evaluated beside training (issue 26).

On Ray this is Ray Train's own checkpoint validation (`ray.train.v2`, Ray 2.60): the
launcher hands `TorchTrainer` a `ValidationConfig(fn=validate)` (`validation_config`), each
checkpoint report asks for it (`RaySession`: `ray.train.report(..., validation=True)`), and
Ray's controller runs `validate` as a Ray task of its own (`eval.cpus`, retried
`eval.max_retries` times when killed) on the persisted checkpoint, at most one at a time,
while the workers train on; it waits for the last before the run ends, and keeps the
returned scores with the checkpoint. A local run (`lmforge train --local`, the trainer
tests) does the same from its driver: `LocalValidator` watches the run's record and
evaluates each new checkpoint in a thread. Both call `evaluate_persisted`:

1. the tasks (`eval.tasks`, harness's evaluator) and the probes (`eval.probes`) on the
   checkpoint's model, in its own template (`eval.template`);
2. the version the tracker registers for that checkpoint (waited for: registration is
   asynchronous too) gets the scores, results JSON and probes (`record`), the training run
   the metrics `eval/<task>/<metric>` at the checkpoint's step; `best` follows
   `eval.select`;
3. an evaluation that fails leaves `eval.warning` on the version and returns no scores:
   training goes on. Ray keeps a checkpoint until its validation is done, and only then
   deletes it under `run.checkpoints_to_keep`; a local run deletes it when the next is
   recorded, so one gone before its turn is skipped with a log line, never a failure.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    """What evaluating one checkpoint needs; plain data (Ray passes it to the task as JSON)."""

    tasks: list[str]
    limit: int | None = None
    num_fewshot: int | None = None
    template: str = "own"
    probes: list[str] | None = None  # the prompts, read once by the launcher
    probe_samples: int = 2
    probe_max_new_tokens: int = 32
    select: str = "val_loss"
    select_mode: str = "min"
    tracking_uri: str | None = None  # None: tracking off, scores only returned
    experiment: str = ""
    registered_model: str = ""
    run_dir: str = ""  # the run's MLflow run is found by it
    wait_version_s: float = 600.0  # how long to wait for the tracker's registration

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def settings_of(cfg, tracking=None) -> EvalSettings | None:
    """The run's evaluation settings (every check made: tasks, probes, select), or None
    when `eval` asks for nothing. `tracking`: the run's `TrackingSettings` (None: off)."""
    e = cfg.eval
    if not e.enabled:
        return None
    from lmforge.evaluation.probes import read_probes
    from lmforge.evaluation.tasks import check_tasks

    sources = check_tasks(e.tasks) if e.tasks else []
    probes = read_probes(e.probes) if e.probes else None
    mode = e.select_mode or select_direction(e.select, sources)
    return EvalSettings(
        tasks=list(e.tasks), limit=e.limit, num_fewshot=e.num_fewshot, template=e.template,
        probes=probes, probe_samples=e.probe_samples,
        probe_max_new_tokens=e.probe_max_new_tokens, select=e.select, select_mode=mode,
        tracking_uri=tracking.uri if tracking else None,
        experiment=tracking.experiment if tracking else "",
        registered_model=tracking.registered_model if tracking else "",
        run_dir=tracking.run_dir if tracking else "",
    )  # fmt: skip


def select_direction(select: str, sources) -> str:
    """min for val_loss; for a score, the harness's direction of its metric. A select
    naming no task of eval.tasks is refused."""
    if select == "val_loss":
        return "min"
    task, _, metric = select.partition("/")
    names = [s.name for s in sources]
    if task not in names:
        raise LmforgeError(
            f"eval.select={select!r}: task {task!r} is not one of eval.tasks ({', '.join(names) or 'none'})"
        )
    from lm_eval.api.registry import higher_is_better_registry

    higher = higher_is_better_registry.get(metric.split(".")[0], True)
    return "max" if higher else "min"


def evaluate_persisted(local: Path, s: EvalSettings) -> dict[str, float]:
    """Evaluate the checkpoint at `local` (see the module doc); its scores by MLflow key."""
    from lmforge import checkpoint as ckpt_io

    if not local.is_dir() or not (local / ckpt_io.STATE).is_file():
        log.warning("evaluation: %s is gone (checkpoints_to_keep?); skipped", local)
        return {}
    step = ckpt_io.read_state(local).step
    t0 = time.perf_counter()
    try:
        scores, raw, table = _run(local, s)
    except Exception as err:  # noqa: BLE001 - any failure: a warning, training goes on
        reason = f"evaluation of step {step} failed: {first_line(err)}"
        log.warning("%s", reason)
        version = _version(s, step)
        if version is not None:
            from lmforge.evaluation import record

            record.warn(version, reason, s.tracking_uri)
        return {}
    print(
        f"evaluated checkpoint step {step} in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(f"{x.task}/{x.metric} {x.value:.4f}" for x in scores),
        flush=True,
    )
    version = _version(s, step)
    if version is not None:
        from lmforge.evaluation import record

        record.set_selection(version.name, s.select, s.select_mode, s.tracking_uri)
        if table is not None:
            record.log_probes(version, table, s.tracking_uri)
        record.log_scores(version, scores, raw, s.tracking_uri)
    return {x.key: x.value for x in scores}


def _run(local: Path, s: EvalSettings):
    from lmforge.evaluation.harness import EvalResult, run_tasks
    from lmforge.evaluation.lm import LmforgeLM
    from lmforge.evaluation.tasks import check_tasks

    lm = LmforgeLM.from_checkpoint(local, s.template)
    result = EvalResult([])
    if s.tasks:
        result = run_tasks(lm, check_tasks(s.tasks), s.limit, s.num_fewshot)
    table = None
    if s.probes:
        from lmforge.evaluation.probes import answer

        table = answer(lm.model, lm.tok, lm.template, s.probes, s.probe_samples,
                       s.probe_max_new_tokens)  # fmt: skip
    return result.scores, result.raw, table


def _version(s: EvalSettings, step: int):
    """The version the run's tracker registers for `step` (waited for), or None."""
    if not s.tracking_uri:
        return None
    from lmforge.tracking import registry, store
    from lmforge.tracking.tracker import find_run_id

    deadline = time.monotonic() + s.wait_version_s
    client = store.client(s.tracking_uri)
    while True:
        run_id = find_run_id(s.tracking_uri, s.experiment, s.run_dir)
        if run_id is not None:
            version = registry.find_version(client, s.registered_model, run_id, step)
            if version is not None:
                return version
        if time.monotonic() > deadline:
            log.warning("evaluation: no version of step %d registered in %.0f s; scores "
                        "kept with the checkpoint only", step, s.wait_version_s)  # fmt: skip
            return None
        time.sleep(1.0)


# -- Ray Train's checkpoint validation ---------------------------------------------------
def validate(checkpoint, settings: dict[str, Any], on_scores=None) -> dict[str, float]:
    """Ray Train's `validate_fn`: `checkpoint` is the persisted `ray.train.Checkpoint`.
    `on_scores(step, scores)`, when given, gets the scores too (a sweep's trial hands them
    to Tune: `lmforge.sweeps.trial.EvalToTune`)."""
    s = EvalSettings(**settings)
    try:
        with checkpoint.as_directory() as d:
            scores = evaluate_persisted(Path(d), s)
            if scores and on_scores is not None:
                from lmforge import checkpoint as ckpt_io

                on_scores(ckpt_io.read_state(Path(d)).step, scores)
            return scores
    except FileNotFoundError as err:  # deleted under checkpoints_to_keep before its turn
        log.warning("evaluation: %s is gone (%s); skipped", checkpoint.path, first_line(err))
        return {}


def validation_config(s: EvalSettings, cpus: float, max_retries: int, on_scores=None):
    """The `ValidationConfig` handed to `TorchTrainer` (Ray must be importable);
    `on_scores`: `validate`'s (picklable: it travels to the validation task)."""
    from ray.train.v2.api.validation_config import ValidationConfig, ValidationTaskConfig
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    kwargs: dict[str, Any] = {"settings": s.to_dict()}
    if on_scores is not None:
        kwargs["on_scores"] = on_scores
    return ValidationConfig(
        fn=validate,
        task_config=ValidationTaskConfig(fn_kwargs=kwargs),
        ray_remote_kwargs={
            "num_cpus": cpus,
            "max_retries": max_retries,
            # Outside any placement group the controller's own runs in: a sweep's trial
            # reserves Tune a bundle of 0.01 CPU that captures its child tasks, which the
            # task's `eval.cpus` cannot fit in ("cannot fit into any bundles").
            "scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=None),
        },
    )


# -- a local run's driver ------------------------------------------------------------------
class LocalValidator:
    """What Ray's controller does for a Ray run, for a local one: each checkpoint the run
    records, evaluated in one background thread, in order; `close()` waits for the last."""

    def __init__(self, run_dir: Path, s: EvalSettings, poll_s: float = 0.5, on_scores=None) -> None:
        self.run_dir, self.s, self.poll_s = Path(run_dir), s, poll_s
        self.on_scores = on_scores  # as `validate`'s
        self.seen: set[str] = set(self._recorded())  # a resumed run's earlier ones: done
        self.results: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="lmforge-eval", daemon=True)
        self._thread.start()

    def _recorded(self) -> list[str]:
        from lmforge import checkpoint as ckpt_io

        record = self.run_dir / ckpt_io.LOCAL_RECORD
        try:
            return json.loads(record.read_text())["checkpoints"]
        except (OSError, ValueError, KeyError):
            return []

    def _work(self) -> None:
        while True:
            stopping = self._stop.is_set()
            for name in self._recorded():
                if name not in self.seen:
                    self.seen.add(name)
                    try:
                        scores = evaluate_persisted(self.run_dir / name, self.s)
                        self.results[name] = scores
                        if scores and self.on_scores is not None:
                            from lmforge import checkpoint as ckpt_io

                            step = ckpt_io.read_state(self.run_dir / name).step
                            self.on_scores(step, scores)
                    except Exception:  # a bug here must not end the run's other evaluations
                        log.exception("evaluation of %s failed", name)
            if stopping:
                return
            self._stop.wait(self.poll_s)

    def close(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return self.results
