"""Run checked tasks on a checkpoint through lm-evaluation-harness's own evaluator, and
turn its results into scores.

    sources = check_tasks("tasks/copy.yaml")
    result = run_tasks(LmforgeLM.from_checkpoint(ckpt), sources, limit=50)
    result.scores      # [Score(task="copy", metric="exact_match", value=0.9, stderr=0.03)]
    result.raw         # the harness's results JSON (results, configs, versions, n-samples)

A score's metric is the harness's key without its filter (`exact_match,none` ->
`exact_match`; another filter stays: `exact_match,strict` -> `exact_match.strict`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

from lmforge.evaluation.lm import LmforgeLM
from lmforge.evaluation.tasks import TaskSource, task_manager

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Score:
    task: str
    metric: str
    value: float
    stderr: float | None = None

    @property
    def key(self) -> str:
        """How it is named in MLflow: `eval/<task>/<metric>` (a run metric)."""
        return f"eval/{self.task}/{self.metric}"

    @property
    def tag(self) -> str:
        """... and `eval.<task>.<metric>` (a version tag)."""
        return f"eval.{self.task}.{self.metric}"


@dataclass
class EvalResult:
    scores: list[Score]
    raw: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def value(self, task: str, metric: str) -> float:
        for s in self.scores:
            if (s.task, s.metric) == (task, metric):
                return s.value
        raise KeyError(f"{task}/{metric}")


def metric_name(key: str) -> str:
    name, _, filt = key.partition(",")
    return name if filt in ("", "none") else f"{name}.{filt}"


def scores_of(results: dict[str, dict[str, Any]]) -> list[Score]:
    """The harness's `results` section as scores (numbers only, stderr beside its metric)."""
    out = []
    for task, row in results.items():
        for key, value in row.items():
            if "_stderr," in key or key in ("alias", "name", "sample_len", " ", "samples"):
                continue
            if not isinstance(value, int | float) or isinstance(value, bool):
                continue
            name, _, filt = key.partition(",")
            err = row.get(f"{name}_stderr,{filt}")
            stderr = float(err) if isinstance(err, int | float) and math.isfinite(err) else None
            out.append(Score(task, metric_name(key), float(value), stderr))
    return out


def run_tasks(
    lm: LmforgeLM,
    sources: list[TaskSource],
    limit: int | None = None,
    num_fewshot: int | None = None,
    seed: int = 1234,
) -> EvalResult:
    """The tasks on `lm` (`limit`: at most that many examples a task) with the version's
    template when `lm` has one; the harness's own evaluator does the rest."""
    import lm_eval

    # The harness bootstraps stderrs in a fork()ed multiprocessing pool unless told not to;
    # a fork of a threaded process (a Ray worker, a local run's driver with its evaluation
    # thread) can deadlock in the child, as it did here in a Ray validation task. Its own
    # single-process loop instead.
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    names = [s.name for s in sources]
    t0 = time.perf_counter()
    log.info("evaluating %s on %s%s", lm.name, ", ".join(names),
             f" (at most {limit} examples each)" if limit else "")  # fmt: skip
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=task_manager(sources),
        apply_chat_template=lm.uses_template,
        fewshot_as_multiturn=lm.uses_template,
        log_samples=False,
        bootstrap_iters=1000,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    raw = json.loads(json.dumps(_public(out), default=str))
    result = EvalResult(scores_of(raw.get("results", {})), raw, time.perf_counter() - t0)
    log.info("evaluated %s: %d scores in %.1f s", lm.name, len(result.scores), result.seconds)
    return result


def _public(out: dict[str, Any]) -> dict[str, Any]:
    """What the results JSON keeps: the harness's results, configs, versions and counts."""
    keep = ("results", "groups", "configs", "versions", "n-shot", "higher_is_better",
            "n-samples", "config")  # fmt: skip
    return {k: out[k] for k in keep if k in out}


def table(columns: dict[str, EvalResult]) -> str:
    """task | metric | value ± stderr per column (one column per model), aligned."""
    keys: list[tuple[str, str]] = []
    for result in columns.values():
        for s in result.scores:
            if (s.task, s.metric) not in keys:
                keys.append((s.task, s.metric))
    heads = ["task", "metric", *columns]
    rows = []
    for task, metric in keys:
        cells = [task, metric]
        for result in columns.values():
            s = next((x for x in result.scores if (x.task, x.metric) == (task, metric)), None)
            if s is None:
                cells.append("-")
            else:
                cells.append(f"{s.value:.4f}" + (f" ± {s.stderr:.4f}" if s.stderr else ""))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([fmt(heads), fmt(["-" * w for w in widths]), *map(fmt, rows)])
