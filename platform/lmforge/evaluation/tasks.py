"""Evaluation tasks: lm-evaluation-harness task YAML files (or the harness's task names),
checked before any work starts.

    sources = check_tasks("tasks/copy.yaml,tasks/copy_mc.yaml")   # or a list of them
    [s.name for s in sources]            # the harness's task names: ["copy", "copy_mc"]
    manager = task_manager(sources)      # its TaskManager, with the files' folders included

A task file is the harness's own format, unchanged (`task`, `dataset_path` with local
`dataset_kwargs.data_files`, `output_type`, `doc_to_text`, `doc_to_target`,
`doc_to_choice`, `metric_list`, `generation_kwargs`, `num_fewshot`, `include`,
`!function`). What `check_tasks` refuses, in one line naming the file (and line):
YAML that does not parse, a key the harness does not know, an unknown `output_type` or
metric (the harness's, or lmforge's ROUGE), a data file that is missing, and the first rows
of each data file when one is not a record (JSON object, CSV row) or lacks a field that
`doc_to_text` / `doc_to_target` / `doc_to_choice` reads. Data files are read as the
harness reads them: a relative path from the working directory. A task file on S3
(`s3://bucket/tasks/x.yaml`) is checked and run from a local copy of it, its sibling task
files and its data files (lmforge.evaluation.fetch: there, a relative data file is read from
beside the task file).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from lmforge import storage
from lmforge.evaluation.taskfile import TaskError, line_of, read_task_yaml, where

OUTPUT_TYPES = ("generate_until", "multiple_choice", "loglikelihood", "loglikelihood_rolling")
FIRST_ROWS = 5  # rows of each data file read by the check
LOCAL_BUILDERS = {"json": "json", "csv": "csv", "parquet": "parquet", "text": "text"}


@dataclass(frozen=True)
class TaskSource:
    name: str  # the harness's task name
    file: Path | None = None  # its YAML file; None: a task the harness knows by name


def split_specs(specs: str | list[str] | tuple[str, ...]) -> list[str]:
    """`"a.yaml,b"` or `["a.yaml", "b"]` -> `["a.yaml", "b"]` (empty items dropped)."""
    items = specs.split(",") if isinstance(specs, str) else list(specs)
    return [s.strip() for s in items if s and s.strip()]


def is_file_spec(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml"))


def check_tasks(specs: str | list[str] | tuple[str, ...]) -> list[TaskSource]:
    """Every task checked (files: parsed, keys, metrics, data files and their first rows;
    names: known to the harness); their sources, in order."""
    items = split_specs(specs)
    if not items:
        raise TaskError("no evaluation task given (a task YAML file or a task name)")
    sources = [check_spec(s) if is_file_spec(s) else TaskSource(s) for s in items]
    names = [s.name for s in sources if s.file is None]
    if names:
        known = harness_task_names()
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, list(known), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise TaskError(
                    f"evaluation task {name!r}: not a task of lm-evaluation-harness nor a "
                    f"YAML file (a task file's name ends in .yaml){hint}"
                )
    seen: dict[str, TaskSource] = {}
    for s in sources:
        if s.name in seen:
            raise TaskError(f"task {s.name!r} is given twice ({seen[s.name].file or s.name})")
        seen[s.name] = s
    return sources


def check_spec(spec: str) -> TaskSource:
    """A task file, local or on S3 (checked in its local copy, errors naming the S3
    object: lmforge.evaluation.fetch)."""
    if not storage.is_s3(spec):
        return check_file(Path(spec))
    from lmforge.evaluation import fetch

    local, shown = fetch.fetch_task(spec)
    try:
        return check_file(local)
    except TaskError as err:
        raise fetch.shown_as(err, shown) from None


@functools.cache
def harness_task_names() -> frozenset[str]:
    """The names of the harness's own tasks and groups (indexing them takes seconds: once
    per process)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_defaults=True).all_tasks)


def task_manager(sources: list[TaskSource]):
    """The harness's TaskManager: the folders of the task files included; its own tasks
    indexed only when a task is named (indexing them takes seconds)."""
    from lm_eval.tasks import TaskManager

    from lmforge.evaluation import metrics

    metrics.register()
    folders = sorted({str(s.file.resolve().parent) for s in sources if s.file is not None})
    return TaskManager(
        include_path=folders or None, include_defaults=any(s.file is None for s in sources)
    )


def check_file(path: Path) -> TaskSource:
    """One task file, every check; its source."""
    from lm_eval.api.registry import metric_registry
    from lm_eval.config.task import TaskConfig

    from lmforge.evaluation import metrics

    metrics.register()
    cfg = read_task_yaml(path)
    text = path.read_text()
    known = {f.name for f in dataclasses.fields(TaskConfig)} | {"group", "class", "include"}
    for key in cfg:
        if key not in known:
            line = line_of(text, rf"^\s*{re.escape(str(key))}\s*:")
            raise TaskError(
                f"{where(path, line)}: unknown key {key!r} for an lm-evaluation-harness task "
                f"(known: {', '.join(sorted(known - {'custom_dataset'}))})"
            )
    name = cfg.get("task")
    if not isinstance(name, str) or not name:
        raise TaskError(f"{path}: no `task:` name (every task file names its task)")
    output_type = cfg.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        line = line_of(text, r"^\s*output_type\s*:")
        raise TaskError(
            f"{where(path, line)}: output_type {output_type!r} is not one of "
            f"{', '.join(OUTPUT_TYPES)}"
        )
    for entry in cfg.get("metric_list") or []:
        metric = entry.get("metric") if isinstance(entry, dict) else entry
        if isinstance(metric, str) and "/" not in metric and metric not in metric_registry:
            line = line_of(text, rf"metric\s*:\s*['\"]?{re.escape(metric)}\b")
            raise TaskError(
                f"{where(path, line)}: unknown metric {metric!r} (known: "
                f"{', '.join(sorted(metric_registry.keys()))}; or a !function)"
            )
    for file in data_files(cfg, path, text):
        check_rows(file, cfg, path)
    return TaskSource(name, path)


def data_files(cfg: dict[str, Any], path: Path, text: str) -> list[Path]:
    """The local data files a task reads (its dataset_kwargs.data_files), each existing."""
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is None:
        return []  # a dataset by name (e.g. a standard task's): read where it is reachable
    if isinstance(files, dict):
        listed = [f for v in files.values() for f in (v if isinstance(v, list) else [v])]
    else:
        listed = files if isinstance(files, list) else [files]
    out = []
    for f in listed:
        if storage.is_s3(f):
            line = line_of(text, re.escape(str(f)))
            raise TaskError(
                f"{where(path, line)}: data file {f} is in S3 and this task file is local: "
                "put the task file beside its data in S3 (s3://.../task.yaml), or download the data"
            )
        p = Path(str(f)).expanduser()
        if not p.is_file():
            line = line_of(text, re.escape(str(f)))
            raise TaskError(f"{where(path, line)}: data file {f} not found")
        out.append(p)
    return out


def first_rows(file: Path, builder: str) -> list[tuple[int, dict[str, Any]]]:
    """(line, row) of the first rows of a data file, as the harness's dataset builder reads
    it; a row that is not a record is a TaskError naming file:line."""
    rows: list[tuple[int, dict[str, Any]]] = []
    if builder == "csv":
        with open(file, newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise TaskError(
                        f"{file}:{reader.line_num}: a row whose fields do not match the header"
                    )
                rows.append((reader.line_num, row))
                if len(rows) >= FIRST_ROWS:
                    break
        return rows
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(file).read_row_group(0)
        except Exception as err:
            raise TaskError(f"{file}: not readable Parquet ({err})") from None
        return [(i + 1, r) for i, r in enumerate(table.slice(0, FIRST_ROWS).to_pylist())]
    if builder == "text":
        with open(file) as fh:
            for i, line in enumerate(fh, 1):
                rows.append((i, {"text": line.rstrip("\n")}))
                if len(rows) >= FIRST_ROWS:
                    break
        return rows
    with open(file) as fh:  # json: JSON lines, or one JSON array
        head = fh.read(1)
        fh.seek(0)
        if head == "[":
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise TaskError(f"{file}:{err.lineno}: not JSON ({err.msg})") from None
            items = [(1, r) for r in data[:FIRST_ROWS]]
        else:
            items = []
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    items.append((i, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise TaskError(f"{file}:{i}: not a JSON line ({err.msg})") from None
                if len(items) >= FIRST_ROWS:
                    break
    for line, row in items:
        if not isinstance(row, dict):
            raise TaskError(f"{file}:{line}: a row must be a JSON object (got {row!r:.40})")
        rows.append((line, row))
    return rows


_STRICT = jinja2.Environment(undefined=jinja2.StrictUndefined)


def check_rows(file: Path, cfg: dict[str, Any], path: Path) -> None:
    """The first rows of `file` as records with the fields the task's templates read."""
    builder = LOCAL_BUILDERS.get(str(cfg.get("dataset_path")), "json")
    rows = first_rows(file, builder)
    if not rows:
        raise TaskError(f"{file}: no rows (task file {path})")
    if cfg.get("process_docs") is not None:
        return  # the rows are reshaped by a !function first: its fields are its own
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        tpl = cfg.get(key)
        if not isinstance(tpl, str) or tpl.startswith(str(path.parent)):
            continue  # a literal list/int, or a !function
        for line, row in rows:
            if "{{" in tpl or "{%" in tpl:
                try:
                    _STRICT.from_string(tpl).render(**row)
                except jinja2.UndefinedError as err:
                    raise TaskError(
                        f"{file}:{line}: {key} of {path} reads a field this row lacks "
                        f"({err.message})"
                    ) from None
                except jinja2.TemplateError as err:
                    raise TaskError(f"{path}: {key} is not a valid template ({err})") from None
            elif (
                key != "doc_to_text"
                and tpl not in row
                and cfg.get("output_type") == ("multiple_choice")
            ):
                raise TaskError(
                    f"{file}:{line}: {key} of {path} names the field {tpl!r}, which this row "
                    f"lacks (fields: {', '.join(row)})"
                )
