"""Reading MLflow for people: runs, metric curves, configs, registered versions, aliases.

The dashboard's Runs, Models and Playground pages call these; each takes the tracking URI
(`store.resolve_uri()` picks the default) and returns plain rows, so pages stay thin and
the logic is tested without a browser. MLflow errors (store down, unknown run) become
`BrowseError` with one line.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.errors import LmforgeError, first_line
from lmforge.tracking import store
from lmforge.tracking.registry import NAME_PATTERN

CURVES = ("loss", "val_loss", "lr", "tokens_per_s", "grad_norm", "mfu")
ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
RESERVED_ALIASES = {"latest"}  # MLflow resolves models:/NAME/latest itself and refuses it


class BrowseError(LmforgeError):
    """MLflow could not answer; one line naming the store or the object."""


@dataclass(frozen=True)
class RunRow:
    run_id: str
    name: str
    experiment: str
    status: str
    start: float | None  # seconds since the epoch
    end: float | None
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def submission_id(self) -> str | None:
        return self.tags.get("ray.submission_id")


@dataclass(frozen=True)
class VersionRow:
    name: str
    version: int
    step: int | None
    val_loss: float | None
    tokens_seen: int | None
    aliases: tuple[str, ...]
    run_id: str
    created: float
    run_dir: str | None
    arch: str | None = None  # model.arch: the version's tag (an import's), else its run's param
    source: str | None = None  # the Hugging Face folder an imported version came from
    parent: str | None = None  # the version (or checkpoint) a fine-tune started from
    n_params: int | None = None
    # Evaluation (lmforge.evaluation): scores by "<task>/<metric>", the probes table's
    # artifact, a failed evaluation's warning.
    scores: dict[str, float] = field(default_factory=dict)
    probes: str | None = None
    eval_warning: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def origin(self) -> str:
        """Where the version came from, in a few words: its folder, or its run (and parent)."""
        if self.source:
            return f"imported from {self.source}"
        run = self.run_dir.rsplit("/", 1)[-1] if self.run_dir else self.run_id[:8]
        return f"run {run}" + (f", fine-tuned from {self.parent}" if self.parent else "")


def _client(uri: str | None):
    return store.client(store.resolve_uri(uri))


def _guard(what: str, fn, *args, **kwargs):
    from mlflow.exceptions import MlflowException

    try:
        return fn(*args, **kwargs)
    except MlflowException as err:
        raise BrowseError(f"{what}: {first_line(err.message)}") from None
    except Exception as err:  # requests' ConnectionError, SQLAlchemy's OperationalError, ...
        raise BrowseError(f"{what}: {first_line(err)}") from None


def experiments(uri: str | None = None) -> list[str]:
    c = _client(uri)
    exps = _guard("listing experiments", c.search_experiments)
    return sorted(e.name for e in exps if e.name != "Default")


def runs(uri: str | None = None, experiments_: list[str] | None = None, limit: int = 200):
    """Runs of the given experiments (all when None), newest first."""
    c = _client(uri)
    exps = _guard("listing experiments", c.search_experiments)
    by_id = {e.experiment_id: e.name for e in exps}
    ids = [i for i, n in by_id.items() if experiments_ is None or n in experiments_]
    if not ids:
        return []
    found = _guard(
        "listing runs",
        c.search_runs,
        ids,
        max_results=limit,
        order_by=["attributes.start_time DESC"],
    )
    return [_run_row(r, by_id) for r in found]


def _run_row(r, by_id: dict[str, str]) -> RunRow:
    return RunRow(
        run_id=r.info.run_id,
        name=r.info.run_name or r.info.run_id[:8],
        experiment=by_id.get(r.info.experiment_id, r.info.experiment_id),
        status=r.info.status,
        start=r.info.start_time / 1000 if r.info.start_time else None,
        end=r.info.end_time / 1000 if r.info.end_time else None,
        metrics=dict(r.data.metrics),
        tags=dict(r.data.tags),
    )


def run_for_submission(uri: str | None, submission_id: str) -> RunRow | None:
    """The MLflow run a Ray job logged to (its `ray.submission_id` tag), if any yet."""
    c = _client(uri)
    exps = _guard("listing experiments", c.search_experiments)
    by_id = {e.experiment_id: e.name for e in exps}
    if not by_id or not re.fullmatch(r"[\w.-]+", submission_id):
        return None
    found = _guard(
        "searching runs",
        c.search_runs,
        list(by_id),
        filter_string=f"tags.`ray.submission_id` = '{submission_id}'",
        max_results=1,
    )
    return _run_row(found[0], by_id) if found else None


SOURCE_CURVES = ("val_loss/", "val_perplexity/", "data/")  # a mixture's, per source


def source_curves(rows: list[RunRow]) -> list[str]:
    """The per-source metrics (`val_loss/<name>`, `data/<name>/tokens`...) the runs have."""
    keys = {k for r in rows for k in r.metrics if k.startswith(SOURCE_CURVES)}
    return sorted(keys)


PREFERENCE_CURVES = ("rewards/", "logps/", "val_rewards/", "val_logps/")  # lmforge.preference


def preference_curves(rows: list[RunRow]) -> list[str]:
    """The preference metrics (TRL's names: `rewards/accuracies`...) the runs have."""
    return sorted({k for r in rows for k in r.metrics if k.startswith(PREFERENCE_CURVES)})


def source_val_curves(keys: list[str]) -> list[str]:
    return [k for k in keys if k.startswith("val_loss/")]


GUARD_EVENT_TAG = "guard/event/"  # lmforge.guard's tag per rollback (its JSON)
GUARD_STOP_TAG = "guard/stopped"


def guard_events(row: RunRow) -> list[tuple[int, str]]:
    """(step, text) of each guard event of a run: its rollbacks, and where it stopped."""
    out = []
    for key, value in row.tags.items():
        if not key.startswith(GUARD_EVENT_TAG):
            continue
        try:
            e = json.loads(value)
            out.append(
                (int(e["step"]), f"rollback {e['n']}: {e['reason']} -> step {e['rolled_back_to']}")
            )
        except (ValueError, KeyError, TypeError):
            continue
    if stop := row.tags.get(GUARD_STOP_TAG):
        m = re.search(r"at step (\d+)", stop)
        if m:
            out.append((int(m.group(1)), "stopped: " + stop.split(";")[0]))
    return sorted(out)


def history(uri: str | None, run_id: str, keys=CURVES) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of each metric the run has, in step order."""
    c = _client(uri)
    out = {}
    for key in keys:
        points = _guard(f"metric {key} of run {run_id}", c.get_metric_history, run_id, key)
        if points:
            out[key] = sorted((int(p.step), float(p.value)) for p in points)
    return out


def run_config(uri: str | None, run_id: str) -> str:
    """The run's resolved config.yaml (the artifact every training run logs)."""
    import mlflow.artifacts

    with tempfile.TemporaryDirectory() as tmp:
        path = _guard(
            f"config of run {run_id}",
            mlflow.artifacts.download_artifacts,
            run_id=run_id,
            artifact_path="config.yaml",
            dst_path=tmp,
            tracking_uri=store.resolve_uri(uri),
        )
        return Path(path).read_text()


def run_link(uri: str | None, row: RunRow, experiment_id: str | None = None) -> str | None:
    """The run's page in the MLflow UI, when the store is a server."""
    resolved = store.resolve_uri(uri)
    if not resolved.startswith(("http://", "https://")):
        return None
    if experiment_id is None:
        c = store.client(resolved)
        exp = _guard("experiment", c.get_experiment_by_name, row.experiment)
        experiment_id = exp.experiment_id if exp else "0"
    return f"{resolved.rstrip('/')}/#/experiments/{experiment_id}/runs/{row.run_id}"


def models(uri: str | None = None) -> list[str]:
    c = _client(uri)
    return sorted(m.name for m in _guard("listing registered models", c.search_registered_models))


def versions(uri: str | None, name: str) -> list[VersionRow]:
    """Versions of a registered model, newest first, with their aliases and tags."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise BrowseError(f"{name!r}: not a registered model name")
    c = _client(uri)
    model = _guard(f"registered model {name}", c.get_registered_model, name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows, arch_of_run = [], {}
    for v in _guard(f"versions of {name}", c.search_model_versions, f"name='{name}'"):
        t = v.tags or {}
        if "arch" not in t and v.run_id not in arch_of_run:  # a trained version: its run's
            arch_of_run[v.run_id] = _run_param(c, v.run_id, "model.arch")
        rows.append(
            VersionRow(
                name=name,
                version=int(v.version),
                step=_num(t.get("step"), int),
                val_loss=_num(t.get("val_loss"), float),
                tokens_seen=_num(t.get("tokens_seen"), int),
                aliases=tuple(sorted(aliases.get(str(v.version), []))),
                run_id=v.run_id,
                created=(v.creation_timestamp or 0) / 1000,
                run_dir=t.get("run_dir"),
                arch=t.get("arch") or arch_of_run.get(v.run_id),
                source=t.get("source"),
                parent=t.get("parent"),
                n_params=_num(t.get("n_params"), int),
                scores=scores_of_tags(t),
                probes=t.get("eval.probes"),
                eval_warning=t.get("eval.warning"),
            )
        )
    return sorted(rows, key=lambda r: r.version, reverse=True)


EVAL_NOT_SCORES = {"eval.results", "eval.probes", "eval.warning"}


def scores_of_tags(tags: dict[str, str]) -> dict[str, float]:
    """A version's evaluation scores, `eval.<task>.<metric>` tags as {"<task>/<metric>": value}."""
    out = {}
    for key, value in tags.items():
        if not key.startswith("eval.") or key in EVAL_NOT_SCORES:
            continue
        task, _, metric = key.removeprefix("eval.").partition(".")
        number = _num(value, float)
        if metric and number is not None:
            out[f"{task}/{metric}"] = number
    return out


def best_by(uri: str | None, name: str) -> str:
    """What the `best` alias of `name` follows, in words."""
    from lmforge.tracking.registry import best_by as selection

    tag, mode = selection(_client(uri), name)
    what = "val loss" if tag == "val_loss" else tag.removeprefix("eval.").replace(".", "/", 1)
    return f"the {'lowest' if mode == 'min' else 'highest'} {what}"


def eval_curves(uri: str | None, run_ids: list[str]) -> list[str]:
    """The evaluation metrics (`eval/<task>/<metric>`) any of these runs has, sorted."""
    c = _client(uri)
    keys: set[str] = set()
    for run_id in run_ids:
        run = _guard(f"run {run_id}", c.get_run, run_id)
        keys |= {k for k in run.data.metrics if k.startswith("eval/")}
    return sorted(keys)


def probe_answers(uri: str | None, row: VersionRow) -> list[dict[str, str]]:
    """The version's probes table (prompt, kind, answer, seed): [] when it has none."""
    import json

    import mlflow.artifacts

    if not row.probes:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = _guard(
            f"probes of {row.uri}", mlflow.artifacts.download_artifacts, run_id=row.run_id,
            artifact_path=row.probes, dst_path=tmp, tracking_uri=store.resolve_uri(uri),
        )  # fmt: skip
        table = json.loads(Path(path).read_text())
    return [dict(zip(table["columns"], r, strict=True)) for r in table["data"]]


def compare_probes(a: list[dict], b: list[dict], label_a: str, label_b: str) -> list[dict]:
    """Two versions' answers to the same probes side by side, one row per (prompt, kind)."""
    theirs = {(r["prompt"], r["kind"]): r["answer"] for r in b}
    rows = [
        {"prompt": r["prompt"], "kind": r["kind"], label_a: r["answer"],
         label_b: theirs.pop((r["prompt"], r["kind"]), "")}
        for r in a
    ]  # fmt: skip
    rows += [{"prompt": p, "kind": k, label_a: "", label_b: ans} for (p, k), ans in theirs.items()]
    return rows


def _run_param(c, run_id: str, key: str) -> str | None:
    """A param of a run, None when the run (deleted) or the param is not there."""
    try:
        return _guard(f"run {run_id}", c.get_run, run_id).data.params.get(key)
    except BrowseError:
        return None


def set_alias(uri: str | None, name: str, alias: str, version: int) -> None:
    alias = alias.strip()
    if alias.lower() in RESERVED_ALIASES:
        raise BrowseError(
            f"alias {alias!r} is reserved by MLflow: it always means the newest version"
        )
    if not ALIAS.match(alias) or re.fullmatch(r"v\d+", alias, re.IGNORECASE):
        raise BrowseError(
            f"alias {alias!r}: use letters, digits, _ and - (starting with a letter; not v<number>)"
        )
    c = _client(uri)
    _guard(f"setting {name}@{alias}", c.set_registered_model_alias, name, alias, str(version))


def _num(text: str | None, kind):
    try:
        return kind(text) if text is not None else None
    except ValueError:
        return None
