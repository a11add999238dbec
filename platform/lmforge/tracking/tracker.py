"""Rank 0's MLflow writer: metrics per step, the run's params and artifacts, registrations.

Everything goes through one background thread, so a slow or unreachable tracking server
never stalls or fails training. While the server is unreachable (a refused connection, a
timeout, a 5xx) the work waits, in order, and is retried with back-off until it answers:
metric values stay buffered (at most MAX_QUEUED_METRICS, the newest kept) and the
checkpoints to register stay staged. Nothing is sent twice: a metric batch whose answer
was lost is checked against the run's history before it is sent again, and a registration
looks up the version of its checkpoint before it makes one (`registry.register_checkpoint`).
A call MLflow refuses (a bad request, no permission) is tried `retries` more times, then
reported and dropped; a checkpoint stays safe in the run dir whatever happens to its
registration. `close()` waits, bounded (`tracking.outage_wait_s`), for the rest when the
server went away after answering; a server that never answered is given one last try at
`close()`, then reported in one line, without waiting.

The MLflow run of a training run is found by its tag `lmforge.run_dir`, so a resumed job
logs into the same MLflow run instead of starting a new one.
"""

from __future__ import annotations

import logging
import math
import queue
import shutil
import tempfile
import threading
import time
from collections import deque
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
    outage_wait_s: float = 600.0  # close(): the bound on waiting for a server that went away
    # False: no version per checkpoint (a sweep's trials; the sweep registers its best once).
    register_checkpoints: bool = True


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

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def stage(self, checkpoint: Path, step: int) -> None:
        return None

    def register(self, staged: Path | None, checkpoint: Path, state: TrainerState) -> None:
        pass

    def register_restored(
        self, checkpoint: Path, state: TrainerState, files: Path | None = None
    ) -> None:
        pass

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        pass


class Tracker:
    """Queue MLflow work on rank 0; `close()` waits (bounded) for it to finish."""

    def __init__(
        self,
        settings: TrackingSettings,
        retries: int = 3,
        backoff_s: float = 1.0,
        flush_every_s: float = 2.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.s = settings
        self.retries, self.backoff_s, self.flush_every_s = retries, backoff_s, flush_every_s
        self.max_backoff_s = max_backoff_s
        self.run_id: str | None = None
        self.failures: list[str] = []
        self._dropped = 0
        self.registered: list[tuple[int, str]] = []  # (step, version)
        self._metrics: list = []  # mlflow.entities.Metric, oldest first, not yet logged
        # A resumed run (after a crash, or a restart by Ray Train) replays the steps since
        # its checkpoint, and a batch whose answer was lost may have been stored: the points
        # MLflow already has (a step at or below its last for that key) are not sent again.
        self._logged_through: dict[str, int] = {}
        self._recheck = False  # a metric batch failed: ask MLflow what it has before resending
        self._pending: deque[tuple[str, Callable[[], None]]] = deque()  # in order, not yet done
        self._refusals: dict[str, int] = {}  # failed tries of each piece of work, not outages
        self._delay = 0.0  # back-off before the next try; 0 while MLflow answers
        self._outage: str | None = None  # the first error of the current outage
        self._answered = False  # the server has answered once: an outage is worth waiting for
        self._unanswered_tries = 0  # attempts the server did not answer, all told
        self._abandoned = False
        self._lock = threading.Lock()
        self._tasks: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue()
        self._stage = Path(tempfile.mkdtemp(prefix="lmforge-register-"))
        self.client = store.client(settings.uri)  # first: it bounds MLflow's own HTTP retries
        self._thread = threading.Thread(target=self._work, name="lmforge-mlflow", daemon=True)
        self._thread.start()

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

    def set_tags(self, tags: dict[str, str]) -> None:
        """Queue tags for the run (set again on a restart: the latest value wins)."""

        def task() -> None:
            for k, v in tags.items():
                self.client.set_tag(self.run_id, k, v)

        self._tasks.put(("tag the run", task))

    def stage(self, checkpoint: Path, step: int) -> Path | None:
        """Keep a copy of a checkpoint's servable files for `register` (call before Ray
        persists the checkpoint; hard links when the filesystem allows)."""
        if not self.s.register_checkpoints:
            return None
        return registry.stage_servable(checkpoint, self._stage / f"step-{step}")

    def register(self, staged: Path | None, checkpoint: Path, state: TrainerState) -> None:
        """Queue the registration of the persisted `checkpoint` (its files in `staged`);
        an incomplete one (a copy cut short, see `checkpoint.incomplete`) is never registered."""
        if staged is None:  # registration off (`register_checkpoints`)
            return
        if why := ckpt_io.incomplete(checkpoint):
            self.failures.append(f"not registered: {checkpoint} is incomplete ({why})")
            log.warning(
                "MLflow: not registering %s: an incomplete checkpoint (%s)", checkpoint, why
            )
            shutil.rmtree(staged.parent, ignore_errors=True)
            return
        unsound = [k for k in ("loss", "val_loss") if not math.isfinite(state.metrics.get(k, 0))]
        if unsound:  # written after a non-finite step: weights nobody should serve
            self.failures.append(f"not registered: {checkpoint} has a non-finite {unsound[0]}")
            print(
                f"not registering {checkpoint}: its {unsound[0]} is "
                f"{state.metrics[unsound[0]]} (a non-finite step before it)",
                flush=True,
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

    def register_restored(
        self, checkpoint: Path, state: TrainerState, files: Path | None = None
    ) -> None:
        """Register the checkpoint a run resumes from unless it has a version already: a job
        that died between `ray.train.report` and the end of its registration left none.
        `files`: a local copy of it (a checkpoint in S3 is staged from there)."""
        self.register(self.stage(files or checkpoint, state.step), checkpoint, state)

    def close(self, status: str = "FINISHED", timeout_s: float | None = None) -> None:
        """Flush everything, mark the run ended, report what failed. A server that answered
        before and is down now is waited for, at most `timeout_s` (the settings'
        `outage_wait_s` when None); one that never answered gets one last try, no more."""
        timeout_s = self.s.outage_wait_s if timeout_s is None else timeout_s

        def end() -> None:
            self._flush_metrics()
            self.client.set_terminated(self.run_id, status)

        tries = self._unanswered_tries
        self._tasks.put(("end the MLflow run", end))
        self._tasks.put(None)  # also ends a back-off: the last try is made now
        deadline, said = time.monotonic() + timeout_s, False
        while self._thread.is_alive() and time.monotonic() < deadline:
            if not self._answered and self._unanswered_tries > tries:
                break  # the last try found nobody either: no use waiting
            if self._outage is not None and self._answered and not said:
                said = True
                print(
                    f"MLflow at {self.s.uri} is unreachable: waiting up to {timeout_s:.0f} s "
                    "for it to take the rest of this run",
                    flush=True,
                )
            self._thread.join(min(0.1, max(0.0, deadline - time.monotonic())))
        if self._thread.is_alive() and not self._answered and self._outage is not None:
            self._never_answered()
            return
        if self._thread.is_alive():
            self._abandoned = True
            with self._lock:
                undone = ["start the MLflow run"] if self.run_id is None else []
                undone += [what for what, _ in self._pending]
            self.failures.append(
                f"gave up after {timeout_s:.0f} s ({self._outage or 'MLflow busy'}); "
                f"left undone: {', '.join(undone) or 'logging metrics'}"
            )
        else:  # what was queued after the thread stopped (no MLflow run could be made)
            left = [self._tasks.get_nowait() for _ in range(self._tasks.qsize())]
            self.failures += [f"could not {item[0]}: no MLflow run" for item in left if item]
        with self._lock:
            if self._metrics or self._dropped:
                lost = len(self._metrics) + self._dropped
                self.failures.append(f"{lost} metric values not logged")
        for f in self.failures:
            log.warning("MLflow (%s): %s", self.s.uri, f)
        if not self._thread.is_alive():
            shutil.rmtree(self._stage, ignore_errors=True)

    def _never_answered(self) -> None:
        """The server never answered, not even at close: say so in one line and stop."""
        self._abandoned = True
        with self._lock:
            undone = [what for what, _ in self._pending]
            lost = len(self._metrics) + self._dropped
        while True:
            try:
                item = self._tasks.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                undone.append(item[0])
        steps = [w.rsplit(" ", 1)[-1] for w in undone if w.startswith("register the checkpoint")]
        line = (
            f"MLflow at {self.s.uri} never answered: nothing of this run was logged there "
            f"(metric values: {lost}; checkpoints not registered, kept in the run dir: steps "
            f"{', '.join(steps) or 'none'}); check tracking.tracking_uri or start the server "
            "(`lmforge tracking up`)"
        )
        for f in self.failures:  # earlier trouble (e.g. an incomplete checkpoint)
            log.warning("MLflow (%s): %s", self.s.uri, f)
        self.failures.append(line)
        print(f"warning: {line}", flush=True)

    # -- the background thread ------------------------------------------------------------
    def _work(self) -> None:
        closing = False
        while not self._abandoned:
            closing = self._collect(closing)
            if self._abandoned:
                return
            if self._run_pending():
                if self._outage is not None:
                    print(f"MLflow at {self.s.uri} answers again; caught up", flush=True)
                self._outage, self._delay = None, 0.0
                if closing:
                    return
            else:
                self._delay = min(self.max_backoff_s, max(self.backoff_s, 2 * self._delay))

    def _collect(self, closing: bool) -> bool:
        """Move queued work into `_pending`, waiting for the back-off while MLflow fails,
        else until something arrives or it is time to flush metrics; True once closing."""
        with self._lock:
            has_work = bool(self._pending)
        wait = self._delay or (0.0 if has_work or closing else self.flush_every_s)
        deadline = time.monotonic() + wait
        while True:
            try:
                left = deadline - time.monotonic()
                item = self._tasks.get(timeout=left) if left > 0 else self._tasks.get_nowait()
            except queue.Empty:
                return closing
            if item is None:  # closing: try once more now, whatever the back-off
                closing, deadline = True, time.monotonic()
            else:
                with self._lock:
                    self._pending.append(item)
            if not self._delay:  # MLflow answers: do it now (and take what else is queued)
                deadline = time.monotonic()

    def _run_pending(self) -> bool:
        """The run, the metrics, then each pending task in order; False at the first that
        must wait (everything after it waits too, so the order holds)."""
        if self.run_id is None and not self._attempt("start the MLflow run", self._start_run):
            if self._given_up("start the MLflow run"):  # refused: nothing can be logged
                self._abandon_all()
                return True
            return False
        if not self._attempt("log metrics", self._flush_metrics):
            if not self._given_up("log metrics"):
                return False
            with self._lock:  # refused: these values will never be taken
                self._dropped += len(self._metrics)
                self._metrics.clear()
        while True:
            with self._lock:
                if not self._pending:
                    return True
                what, fn = self._pending[0]
            if not self._attempt(what, fn) and not self._given_up(what):
                return False
            with self._lock:
                self._pending.popleft()

    def _given_up(self, what: str) -> bool:
        """Whether `what` failed more than `retries` times for reasons other than an outage."""
        if self._refusals.get(what, 0) <= self.retries:
            return False
        del self._refusals[what]
        return True

    def _abandon_all(self) -> None:
        """No MLflow run could be made: report each piece of work as not done, and stop."""
        with self._lock:
            undone, self._pending = list(self._pending), deque()
        self.failures += [f"could not {what}: no MLflow run" for what, _ in undone]
        self._abandoned = True

    def _attempt(self, what: str, fn: Callable[[], None]) -> bool:
        """One try. A server that does not answer starts (or continues) an outage; a refusal
        or a bug counts against the task (`retries`), then it is reported and dropped."""
        try:
            fn()
            self._refusals.pop(what, None)
            return True
        except Exception as err:  # MLflow raises many types; none may reach training
            last = f"{type(err).__name__}: {first_line(err, 300)}"
            if unreachable(err):
                self._unanswered_tries += 1
                if self._outage is None:
                    self._outage = last
                    print(
                        f"warning: MLflow at {self.s.uri} is unreachable ({last}); training "
                        "goes on, rank 0 keeps the metrics and checkpoints to register and "
                        "retries",
                        flush=True,
                    )
                return False
            self._refusals[what] = self._refusals.get(what, 0) + 1
            if self._refusals[what] <= self.retries:
                log.warning("MLflow: could not %s (%s); retrying", what, last)
                return False
            self.failures.append(f"could not {what}: {last}")
            print(f"warning: MLflow at {self.s.uri}: could not {what}: {last}", flush=True)
            return False

    def _start_run(self) -> None:
        if self.run_id is not None:
            return
        c, s = self.client, self.s
        exp_id = store.ensure_experiment(c, s.experiment, s.uri)
        self._answered = True  # from here on an unanswered request is an outage, waited for
        # A run created by an attempt whose answer was lost is found here, not made twice.
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
            self._logged_through = self._last_steps(c, run.info.run_id, run.data.metrics)
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            c.log_batch(run.info.run_id, params=items[i : i + 100])
        for name, text in s.artifacts.items():
            c.log_text(run.info.run_id, text, name)
        self.run_id = run.info.run_id  # last: a failed attempt starts over (from find_run)
        print(f"MLflow run {self.run_id} (experiment {s.experiment!r}) at {s.uri}", flush=True)

    @staticmethod
    def _last_steps(c, run_id: str, keys) -> dict[str, int]:
        """The last step MLflow holds for each metric key of the run."""
        return {k: max((m.step for m in c.get_metric_history(run_id, k)), default=-1) for k in keys}

    def _flush_metrics(self) -> None:
        """Log what is queued, in MLflow-sized batches; on failure keep what was not sent."""
        with self._lock:
            batch, self._metrics = self._metrics, []
        try:
            if self._recheck and batch:  # the last batch may have been stored, its answer lost
                keys = {m.key for m in batch}
                self._logged_through.update(self._last_steps(self.client, self.run_id, keys))
                self._recheck = False
            if self._logged_through:
                batch = [m for m in batch if m.step > self._logged_through.get(m.key, -1)]
            while batch:
                self._recheck = True
                self.client.log_batch(self.run_id, metrics=batch[:1000])  # MLflow's limit
                self._recheck = False
                batch = batch[1000:]
        except Exception:
            with self._lock:
                self._metrics = batch + self._metrics
            raise


def unreachable(err: BaseException) -> bool:
    """Whether `err` says the tracking server (or its database) did not answer, as opposed
    to refusing the request: worth waiting for, however long it takes."""
    from mlflow.exceptions import MlflowException, RestException

    response = getattr(err, "response", None)  # requests' HTTPError (artifact uploads)
    if isinstance(err, OSError) and response is not None:
        return getattr(response, "status_code", 500) >= 500
    if isinstance(err, OSError):  # refused, reset, timed out (requests' errors are OSErrors)
        return True
    if isinstance(err, RestException):  # the server answered; 5xx: it (or its store) failed
        return err.get_http_status_code() >= 500
    if isinstance(err, MlflowException):  # "API request to ... failed with exception ..."
        return err.get_http_status_code() >= 500 and "API request to" in err.message
    return type(err).__name__ in ("OperationalError", "DisconnectionError")  # SQLAlchemy
