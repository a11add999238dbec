"""Job specs for the Ray Jobs API, built only from validated values.

The dashboard (and anything else that submits on a person's behalf) never puts text a
person typed into a shell line. A training job's entrypoint is

    python jobs/train.py --set model.n_layer=4 --set data.path=/abs/dataset ...

rendered from a validated `Config`: every value must survive a round trip through the
YAML parser the job uses for `--set`, and every token must consist of characters that
mean nothing to a shell (`SAFE_TOKEN`); anything else is refused with `JobSpecError`
naming the key. Dataset paths (and uploaded corpora) must stay inside the allowed data
roots: `LMFORGE_DATA_ROOTS` (paths joined by `:`) or, by default, `$LMFORGE_HOME/datasets`
and `$LMFORGE_HOME/uploads`. The runtime env is `cluster/runtime_env.yaml`, the same one
`ray job submit` users pass, with its paths made absolute.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import lmforge
from lmforge import paths
from lmforge.config import Config, SourceConfig
from lmforge.errors import LmforgeError

# Letters, digits and _ . , : / @ % + = - only: no spaces, quotes, $, `, ;, |, &, <, >, etc.
SAFE_TOKEN = re.compile(r"^[A-Za-z0-9_.,:/@%+=-]+$")


class JobSpecError(LmforgeError, ValueError):
    """A value that cannot go into a job safely; the message names the key."""


@dataclass(frozen=True)
class JobSpec:
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)


def repo_root() -> Path:
    """The checkout that holds `jobs/` and `cluster/` (lmforge is installed editable from it)."""
    root = Path(lmforge.__file__).resolve().parents[2]
    if not (root / "jobs" / "train.py").is_file():
        raise JobSpecError(f"{root}: no jobs/train.py; run the dashboard from an lmforge checkout")
    return root


def data_roots() -> list[Path]:
    """Folders that datasets and uploads must live in."""
    raw = os.environ.get("LMFORGE_DATA_ROOTS")
    if raw:
        return [paths.resolve(p).resolve() for p in raw.split(os.pathsep) if p.strip()]
    return [(paths.home() / "datasets").resolve(), (paths.home() / "uploads").resolve()]


def inside_roots(path: str | os.PathLike, key: str) -> Path:
    """`path` resolved (symlinks, `..`), refused unless it lies inside a data root."""
    if paths.is_uri(str(path)):
        raise JobSpecError(f"{key}={path}: remote paths are not allowed here")
    p = paths.resolve(path).resolve()
    roots = data_roots()
    if not any(p == r or p.is_relative_to(r) for r in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise JobSpecError(f"{key}={path}: outside the allowed data roots ({allowed})")
    return p


def safe_token(key: str, value: Any) -> str:
    """`key=value` as one shell-inert token that `--set` parses back to `value`."""
    text = _render(value)
    token = f"{key}={text}"
    # A list of numbers ([1,2]: elastic num_workers) keeps its brackets; shlex.join quotes
    # the token, and what is inside them must be as inert as any other value.
    inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if not SAFE_TOKEN.match(f"{key}={inner}"):
        bad = "".join(sorted({c for c in text if not SAFE_TOKEN.match(c)}))
        raise JobSpecError(f"{key}: {text!r} holds characters not allowed in a job ({bad!r})")
    if _parsed(key, yaml.safe_load(text)) != value:
        raise JobSpecError(f"{key}: {text!r} would be read back as a different value")
    return token


def _parsed(key: str, value: Any) -> Any:
    """A --set value as the config will hold it (data.sources' short form as mappings)."""
    if key == "data.sources" and isinstance(value, list):
        return [SourceConfig.model_validate(v).model_dump() for v in value]
    return value


def _render(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exp = text.partition("e")
        # PyYAML reads 1e-05 as a string; 1.0e-05 as a float.
        return f"{mantissa}.0e{exp}" if e and "." not in mantissa else text
    if isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return "[" + ",".join(map(str, value)) + "]"
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, dict) and "path" in v for v in value)
    ):
        # data.sources: NAME:WEIGHT:PATH each (config.SourceConfig reads it back)
        return "[" + ",".join(SourceConfig.model_validate(v).short for v in value) + "]"
    return str(value)


def _leaves(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.extend(_leaves(v, f"{key}.") if isinstance(v, dict) else [(key, v)])
    return out


def runtime_env(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """cluster/runtime_env.yaml with absolute paths (the client uploads them)."""
    root = repo_root()
    env = yaml.safe_load((root / "cluster" / "runtime_env.yaml").read_text())
    env["working_dir"] = str(root)
    env["py_modules"] = [str(root / m) for m in env.get("py_modules", [])]
    env["env_vars"] = {**env.get("env_vars", {}), **(extra_env or {})}
    return env


def train_job(
    cfg: Config,
    tracking_uri: str | None = None,
    resume: str | bool | None = None,
    init_from: str | None = None,
    any_path: bool = False,
    env_vars: dict[str, str] | None = None,
) -> JobSpec:
    """A training job for a validated config: every non-default key as a `--set`.
    `env_vars`: added to the job's runtime env (`submitter_env`: credentials, never in
    the entrypoint).

    `data.path` must lie inside the data roots and is passed absolute, so the job reads
    the dataset the form showed, whatever its working dir. `resume` and `init_from` take
    registered versions (`models:/NAME/VERSION` or `models:/NAME@ALIAS`) only.

    `any_path=True` is for `lmforge submit`, whose user could run the job by hand anyway:
    `data.path` is passed as given (a relative path resolves in the job's LMFORGE_HOME, a
    URI stays one), and `resume` may also be True (the run of run.name, else the newest) or
    a run name or run dir, `init_from` a checkpoint dir, as `lmforge train` takes them.
    Every token must still be shell-inert.
    """
    mixture = bool(cfg.data.sources)  # data.path unused then
    data = cfg.data.path if any_path or mixture else inside_roots(cfg.data.path, "data.path")
    sources = [
        s.model_copy(update={
            "path": s.path if any_path else str(inside_roots(s.path, f"data.sources[{i}].path")),
            "name": s.label,
        })
        for i, s in enumerate(cfg.data.sources or [])
    ] or None  # fmt: skip
    name = cfg.run.name or (None if resume else time.strftime("run-%Y%m%d-%H%M%S"))
    updates: dict[str, Any] = {
        "data": cfg.data.model_copy(update={"path": str(data), "sources": sources}),
        "run": cfg.run.model_copy(update={"name": name}),
    }
    if tracking_uri:
        updates["tracking"] = cfg.tracking.model_copy(update={"tracking_uri": tracking_uri})
    cfg = cfg.model_copy(update=updates)
    default = Config().to_dict()
    default_leaves = dict(_leaves(default))
    args = ["python", "jobs/train.py"]
    for key, value in _leaves(cfg.to_dict()):
        if key in default_leaves and default_leaves[key] == value:
            continue
        args += ["--set", safe_token(key, value)]
    if resume is True:
        if not any_path:
            raise JobSpecError("--resume: name a registered version (models:/NAME/VERSION)")
        args.append("--resume")  # the run of run.name, else the newest in storage
    for flag, uri in (("--resume", resume), ("--init-from", init_from)):
        if uri and uri is not True:
            from lmforge.tracking.registry import parse_model_uri

            if not (any_path and not str(uri).startswith("models:/")):
                parse_model_uri(uri)  # RegistryError (a ValueError) names a malformed URI
            args += [flag, safe_token(flag.lstrip("-"), uri).split("=", 1)[1]]
    meta = {
        "lmforge.kind": "train",
        "lmforge.run_name": name or "(resumed)",
        "lmforge.experiment": cfg.tracking.experiment,
    }
    if resume or init_from:
        meta["lmforge.from"] = str(resume or init_from)
    return JobSpec(entrypoint(args), runtime_env(env_vars), meta)


def submitter_env(cfg: Config, *paths_used: str | None) -> dict[str, str]:
    """What a job submitted from this process gets of its environment, as `lmforge train`
    hands it to its workers: the MLflow credentials, and the AWS_* variables when the
    config (or a resume or init source in `paths_used`) is on S3. For the job's runtime
    env only (which `lmforge.cluster` passes on to Ray Train): never printed or logged."""
    from lmforge import storage
    from lmforge.tracking import store

    used = (*cfg.data.paths, cfg.run.storage_path, *paths_used)
    on_s3 = any(str(p).startswith(storage.SCHEME) for p in used if p)
    return {**(storage.runtime_env_vars() if on_s3 else {}), **store.credential_env()}


# Built-in SFT templates the dashboard offers: few-shot needs an examples file, which the
# upload form does not take.
DASHBOARD_TEMPLATES = ("plain", "instruct", "chat", "chain-of-thought")


def prepare_job(
    inputs: list[str | os.PathLike],
    output: str | os.PathLike,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    seq_tokens: int = 1024,
    rows_per_group: int = 16,
    data_format: str = "text",
    template: str | None = None,
    prompt_policy: str = "drop",
) -> JobSpec:
    """A `jobs/prepare.py` job: every path inside the data roots, every number checked.
    `data_format="sft"`: instruction rows rendered with a built-in `template` (a template
    file or a tokenizer's chat template stays with the CLI: nothing to upload them with)."""
    from lmforge.data.prepare import PrepareOptions

    PrepareOptions(  # the same checks as `lmforge prepare`
        vocab_size=vocab_size,
        val_fraction=val_fraction,
        seq_tokens=seq_tokens,
        rows_per_group=rows_per_group,
        format=data_format,
        template=template,
        prompt_policy=prompt_policy,
    )
    if data_format in ("sft", "preference") and template not in DASHBOARD_TEMPLATES:
        raise JobSpecError(
            f"template {template!r}: one of {', '.join(DASHBOARD_TEMPLATES)} here "
            f"(a .jinja file, few-shot examples or chat_template: `lmforge prepare`)"
        )
    args = ["python", "jobs/prepare.py", "--input"]
    args += [_path_arg(p, "input") for p in inputs]
    out = inside_roots(output, "output")
    args += ["--output", _path_arg(out, "output")]
    args += ["--vocab-size", str(int(vocab_size)), "--val-fraction", repr(float(val_fraction))]
    args += ["--seq-tokens", str(int(seq_tokens)), "--rows-per-group", str(int(rows_per_group))]
    if data_format in ("sft", "preference"):  # preference: prompt/chosen/rejected pairs
        args += ["--format", data_format, "--template", template, "--prompt-policy", prompt_policy]
    meta = {"lmforge.kind": "prepare", "lmforge.dataset": out.name}
    return JobSpec(entrypoint(args), runtime_env(), meta)


def entrypoint(args: list[str]) -> str:
    """The shell line Ray runs for `args`: `exec` first, so the shell becomes the job.

    Ray's job supervisor runs the entrypoint with `/bin/sh -c` and, to stop a job, signals
    that shell and the children it has at that moment. A job stopped in its first second
    (Submit, then Stop) caught the shell before it had started Python, and the orphaned
    driver trained on to its last step. With `exec` there is one process from the start.
    """
    return "exec " + shlex.join(args)


def _path_arg(path: str | os.PathLike, key: str) -> str:
    p = str(inside_roots(path, key))
    return safe_token(key, p).split("=", 1)[1]
