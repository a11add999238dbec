"""The one base class of the errors a user can cause, and the one-line rendering of any error.

Every error a person can fix (a wrong config key, a missing file, a corrupt shard, a model
URI that does not resolve, a cluster that is not up) is an `LmforgeError` whose message is
one line naming the culprit. The CLI and the dashboard print that line; anything else is a
bug and keeps its traceback (`lmforge -v` shows it for user errors too).

    raise ConfigError("train.lr=2: must be <= 1")
    print(first_line(err))
"""

from __future__ import annotations


class LmforgeError(Exception):
    """An error the user can fix; its message is one line that names what is wrong."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """The first non-empty line of an error's message, or its type name when it has none."""
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else type(err).__name__
    return line if limit is None else line[:limit]


class UsageError(LmforgeError, ValueError):
    """An argument out of its range (a sampling setting, a prepare option, an output dir)."""


class ConfigError(LmforgeError, ValueError):
    """A config that cannot run; the message names the key (`lmforge.config` and the model
    architectures in `lmforge.models` raise it)."""
