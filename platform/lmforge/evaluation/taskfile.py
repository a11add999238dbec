"""Reading one lm-evaluation-harness task file as the harness does, and naming a place in
it (`file:line`) in an error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LmforgeError


class TaskError(LmforgeError, ValueError):
    pass


def line_of(text: str, pattern: str) -> int | None:
    for i, line in enumerate(text.splitlines(), 1):
        if re.search(pattern, line):
            return i
    return None


def where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line else str(path)


def read_task_yaml(path: Path) -> dict[str, Any]:
    """The task file's mapping as the harness reads it (`include` merged, `!function` left
    as the path it names)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise TaskError(f"{path}: task file not found")
    try:
        cfg = load_yaml(path, resolve_func=False)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise TaskError(f"{where(path, line)}: not valid YAML ({problem})") from None
    except (ValueError, OSError) as err:
        raise TaskError(f"{path}: {str(err).splitlines()[0]}") from None
    return cfg
