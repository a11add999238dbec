"""Task files on S3: a local copy of each, since the harness reads only local files.

    local, shown = fetch_task("s3://bucket/tasks/copy.yaml")   # a Path in a temp dir

What is copied: the task file and the other task files and Python modules beside it (its
`include`s and `!function`s name them relative to it), and the data files its
`dataset_kwargs.data_files` names: an `s3://` URI as it is, a relative path from beside the
task file (a worker has no working directory a user chose). The copy's `data_files` name
the local copies; the user's file stays as it is. `shown` maps each local path back to what
the user wrote, so an error about the copy names the S3 object.

Done once per process and task file (the driver checks tasks before training, each
evaluating worker again), in its own temp dir, so two processes never write one file.
"""

from __future__ import annotations

import functools
import hashlib
import re
import tempfile
from pathlib import Path
from typing import Any

from lmforge import storage
from lmforge.evaluation.taskfile import TaskError, line_of, read_task_yaml

SIBLINGS = (".yaml", ".yml", ".py")  # what an `include` or a `!function` can name


def fetch_task(uri: str) -> tuple[Path, dict[str, str]]:
    """The local copy of the S3 task file `uri`, and {local path: what the user wrote}."""
    local, shown = _fetch(uri)
    return local, dict(shown)


@functools.cache
def _fetch(uri: str) -> tuple[Path, tuple[tuple[str, str], ...]]:
    path = storage.resolve(uri)
    if not path.is_file():
        raise TaskError(f"{uri}: task file not found")
    folder, d = path.parent, Path(tempfile.mkdtemp(prefix="lmforge-tasks-"))
    shown: dict[str, str] = {}
    for name in folder.files():
        if "/" not in name and name.endswith(SIBLINGS):
            shown[str(storage.download(folder / name, d / name))] = str(folder / name)
    local = d / path.name
    text = local.read_text()
    for _split, f in _data_files(read_task_yaml(local)):
        copy = _fetch_data(f, folder, d, uri, line_of(text, re.escape(f)))
        if copy is not None:
            shown[str(copy)] = f if storage.is_s3(f) else str(folder / f)
            text = _replace_scalar(text, f, str(copy))
    local.write_text(text)
    return local, tuple(shown.items())


def _data_files(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(split, file) of every data file a task names, as written."""
    kwargs = cfg.get("dataset_kwargs") or {}
    files = kwargs.get("data_files") if isinstance(kwargs, dict) else None
    if files is None:
        return []
    if isinstance(files, dict):
        return [(k, str(f)) for k, v in files.items() for f in (v if isinstance(v, list) else [v])]
    return [("", str(f)) for f in (files if isinstance(files, list) else [files])]


def _fetch_data(f: str, folder, d: Path, uri: str, line: int | None) -> Path | None:
    """A local copy of data file `f` of the task file `uri` in `folder`; None: `f` is a
    local absolute path, read where it is."""
    if storage.is_s3(f):
        src = storage.resolve(f)
        digest = hashlib.sha256(f.encode()).hexdigest()[:12]
        dst = d / "data" / digest / src.name
    elif Path(f).is_absolute():
        return None
    else:
        src, dst = folder / f, d / f
    if not src.is_file():
        where = f"{uri}:{line}" if line else uri
        raise TaskError(f"{where}: data file {src} not found")
    return storage.download(src, dst)


def _replace_scalar(text: str, value: str, new: str) -> str:
    """`value` replaced where it stands as a whole YAML scalar (bare or quoted)."""
    pattern = rf"(?<=[\s\[,:'\"-]){re.escape(value)}(?=['\"]?\s*(?:[,\]#]|$))"
    return re.sub(pattern, lambda _: new, text, flags=re.MULTILINE)


def shown_as(err: TaskError, shown: dict[str, str]) -> TaskError:
    """`err` naming the user's files instead of their local copies."""
    text = str(err)
    for local in sorted(shown, key=len, reverse=True):
        text = text.replace(local, shown[local])
    return TaskError(text)
