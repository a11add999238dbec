"""Where lmforge keeps its data on this machine: one project data folder.

`LMFORGE_HOME` (default `~/.lmforge`) holds prepared datasets, run storage (checkpoints)
and the local cluster's state. Relative paths in a config resolve against it, so the same
config works from the CLI, from `ray job submit` (whose working directory is a copy of the
repo) and from the dashboard.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The project data folder (`$LMFORGE_HOME`, default `~/.lmforge`)."""
    return Path(os.environ.get("LMFORGE_HOME", "~/.lmforge")).expanduser().resolve()


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path: `path` itself if absolute (or `~`), else relative to `home()`.

    Remote URIs (`s3://...`, `gs://...`) are not paths; callers keep them as strings.
    """
    p = Path(path).expanduser()
    return p if p.is_absolute() else home() / p


def is_uri(path: str) -> bool:
    return "://" in str(path)
