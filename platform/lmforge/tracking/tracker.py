"""Rank 0's MLflow writer: metrics per step, the run's params and artifacts, registrations.

Everything goes through one background thread, so a slow or unreachable tracking server
never stalls or fails training: each call is retried with back-off, then reported and
dropped (a checkpoint stays safe in the run dir whatever happens to its registration).

The MLflow run of a training run is found by its tag `lmforge.run_dir`, so a resumed job
logs into the same MLflow run instead of starting a new one.
"""

from __future__ import annotations

import logging
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge import checkpoint as ckpt_io
from lmforge.checkpoint import TrainerState
from lmforge.errors import first_line
from lmforge.tracking import registry, store

log = logging.getLogger(__name__)

RUN_DIR_TAG = "lmforge.run_dir"
MAX_QUEUED_METRICS = 200_000  # values held while MLflow is unreachable (about 40 MB)


@dataclass
class TrackingSettings:
    """What rank 0 needs to track a run; built by the launcher, sent to the workers."""

    uri: str
    experiment: str
    registered_model: str
    run_name: str
    run_dir: str
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> text content


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 0.001}} -> {"train.lr": "0.001"}."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = "" if v is None else str(v)
    return out


def find_run(client, experiment_id: str, run_dir: str):
    quoted = run_dir.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{quoted}'", max_results=1
    )
    return runs[0] if runs else None


def find_run_id(uri: str, experiment: str, run_dir: str) -> str | None:
    """The MLflow run id of a training run dir, if it was tracked."""
    c = store.client(uri)
    exp = c.get_experiment_by_name(experiment)
    run = find_run(c, exp.experiment_id, run_dir) if exp else None
    return run.info.run_id if run else None


class NullTracker:
    """What ranks other than 0, and runs with tracking off, log through: nothing."""

    run_id = None
    failures: list[str] = []

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def stage(self, checkpoint: Path, step: int) -> None:
        return None

    def register(self, staged: Path | None, checkpoint: Path, state: TrainerState) -> None:
        pass

    def register_restored(self, checkpoint: Path, state: TrainerState) -> None:
        pass

    def close(self, status: str = "FINISHED", timeout_s: float = 0.0) -> None:
        pass


class Tracker:
    """Queue MLflow work on rank 0; `close()` waits (bounded) for it to finish."""

    def __init__(
        self,
        settings: TrackingSettings,
        retries: int = 3,
        backoff_s: float = 1.0,
        flush_every_s: float = 2.0,
    ) -> None:
        self.s = settings
        self.retries, self.backoff_s, self.flush_every_s = retries, backoff_s, flush_every_s
        self.run_id: str | None = None
        self.failures: list[str] = []
        self._degraded = False
        self._dropped = 0
        self.registered: list[tuple[int, str]] = []  # (step, version)
        self._metrics: list = []  # mlflow.entities.Metric, oldest first, not yet logged
        # A resumed run (after a crash, or a restart by Ray Train) replays the steps since
        # its checkpoint; the points MLflow already has are not logged twice.
        self._logged_through: dict[str, int] = {}
        self._lock = threading.Lock()
        self._tasks: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._stage = Path(tempfile.mkdtemp(prefix="lmforge-register-"))
        self.client = store.client(settings.uri)  # first: it bounds MLflow's own HTTP retries
        self._thread = threading.Thread(target=self._work, name="lmforge-mlflow", daemon=True)
        self._thread.start()
        self._tasks.put(("start the MLflow run", self._start_run))

    # -- called from the training loop (never blocks on MLflow) ---------------------------
    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        points = [Metric(k, float(v), ms, step) for k, v in metrics.items() if k != "step"]
        with self._lock:
            self._metrics.extend(points)
            if len(self._metrics) > MAX_QUEUED_METRICS:  # MLflow down for long: keep the newest
                drop = len(self._metrics) - MAX_QUEUED_METRICS
                del self._metrics[:drop]
                self._dropped += drop

    def stage(self, checkpoint: Path, step: int) -> Path:
        """Keep a copy of a checkpoint's servable files for `register` (call before Ray
        persists the checkpoint; hard links when the filesystem allows)."""
        return registry.stage_servable(checkpoint, self._stage / f"step-{step}")

    def register(self, staged: Path, checkpoint: Path, state: TrainerState) -> None:
        """Queue the registration of the persisted `checkpoint` (its files in `staged`);
        an incomplete one (a copy cut short, see `checkpoint.incomplete`) is never registered."""
        if why := ckpt_io.incomplete(checkpoint):
            self.failures.append(f"not registered: {checkpoint} is incomplete ({why})")
            log.warning(
                "MLflow: not registering %s: an incomplete checkpoint (%s)", checkpoint, why
            )
            shutil.rmtree(staged.parent, ignore_errors=True)
            return
        progress: dict[str, Any] = {}  # survives retries: nothing is registered twice

        def task() -> None:
            tags = registry.version_tags(state, self.run_id, checkpoint)
            with registry.fluent_uri(self.s.uri):  # registration uses the fluent API
                version = registry.register_checkpoint(
                    self.client, self.run_id, staged, self.s.registered_model, tags,
                    registry.describe_version(state, checkpoint), progress,
                )  # fmt: skip
            self.registered.append((state.step, version.version))
            if progress.get("created"):
                print(
                    f"registered models:/{self.s.registered_model}/{version.version} "
                    f"(step {state.step})",
                    flush=True,
                )
            shutil.rmtree(staged.parent, ignore_errors=True)

        self._tasks.put((f"register the checkpoint of step {state.step}", task))

    def register_restored(self, checkpoint: Path, state: TrainerState) -> None:
        """Register the checkpoint a run resumes from unless it has a version already: a job
        that died between `ray.train.report` and the end of its registration left none."""
        self.register(self.stage(checkpoint, state.step), checkpoint, state)

    def close(self, status: str = "FINISHED", timeout_s: float = 600.0) -> None:
        """Flush everything (at most `timeout_s`), mark the run ended, report what failed."""

        def end() -> None:
            self._flush_metrics()
            self.client.set_terminated(self.run_id, status)

        self._tasks.put(("end the MLflow run", end))
        self._tasks.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self.failures.append(f"gave up after {timeout_s:.0f} s; MLflow work left undone")
        with self._lock:
            if self._metrics or self._dropped:
                lost = len(self._metrics) + self._dropped
                self.failures.append(f"{lost} metric values not logged")
        for f in self.failures:
            log.warning("MLflow (%s): %s", self.s.uri, f)
        if not self._thread.is_alive():
            shutil.rmtree(self._stage, ignore_errors=True)

    # -- the background thread ------------------------------------------------------------
    def _work(self) -> None:
        while True:
            try:
                item = self._tasks.get(timeout=self.flush_every_s)
            except queue.Empty:
                self._attempt("log metrics", self._flush_metrics)
                continue
            if item is None:
                return
            what, fn = item
            if what != "start the MLflow run":
                self._attempt("log metrics", self._flush_metrics)
            self._attempt(what, fn)

    def _attempt(self, what: str, fn: Callable[[], None]) -> bool:
        needs_run = self.run_id is None and fn != self._start_run
        if needs_run and not self._attempt("start the MLflow run", self._start_run):
            self.failures.append(f"could not {what}: no MLflow run")
            return False
        # Once MLflow has failed a whole series of retries, try each later call once until
        # one succeeds, so a server that stays down costs seconds, not minutes per call.
        retries = 0 if self._degraded else self.retries
        delay = self.backoff_s
        for attempt in range(retries + 1):
            try:
                fn()
                self._degraded = False
                return True
            except Exception as err:  # MLflow raises many types; none may reach training
                last = f"{type(err).__name__}: {first_line(err, 300)}"
                if attempt < retries:
                    log.warning("MLflow: could not %s (%s); retrying in %.0f s", what, last, delay)
                    time.sleep(delay)
                    delay *= 2
        self._degraded = True
        self.failures.append(f"could not {what}: {last}")
        print(f"warning: MLflow at {self.s.uri}: could not {what}: {last}", flush=True)
        return False

    def _start_run(self) -> None:
        if self.run_id is not None:
            return
        c, s = self.client, self.s
        exp_id = store.ensure_experiment(c, s.experiment, s.uri)
        run = find_run(c, exp_id, s.run_dir)
        if run is None:
            run = c.create_run(exp_id, run_name=s.run_name, tags={RUN_DIR_TAG: s.run_dir, **s.tags})
            params = s.params
        else:  # a resumed job: keep the run; params are immutable in MLflow, log only new ones
            c.set_terminated(run.info.run_id, "RUNNING")
            for k, v in s.tags.items():
                c.set_tag(run.info.run_id, k, v)
            old = run.data.params
            changed = sorted(k for k, v in s.params.items() if k in old and old[k] != v)
            if changed:
                c.set_tag(
                    run.info.run_id, "lmforge.resumed_with_changes", ", ".join(changed)[:5000]
                )
            params = {k: v for k, v in s.params.items() if k not in old}
            self._logged_through = {
                k: max((m.step for m in c.get_metric_history(run.info.run_id, k)), default=-1)
                for k in run.data.metrics
            }
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            c.log_batch(self.run_id, params=items[i : i + 100])
        for name, text in s.artifacts.items():
            c.log_text(self.run_id, text, name)
        print(f"MLflow run {self.run_id} (experiment {s.experiment!r}) at {s.uri}", flush=True)

    def _flush_metrics(self) -> None:
        """Log what is queued, in MLflow-sized batches; on failure keep what was not sent."""
        with self._lock:
            batch, self._metrics = self._metrics, []
        if self._logged_through:
            batch = [m for m in batch if m.step > self._logged_through.get(m.key, -1)]
        sent = 0
        try:
            while sent < len(batch):
                self.client.log_batch(self.run_id, metrics=batch[sent : sent + 1000])
                sent += 1000  # MLflow's batch limit
        except Exception:
            with self._lock:
                self._metrics = batch[sent:] + self._metrics
            raise
