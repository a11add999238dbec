"""The dashboard Launch form's logic: presets, datasets in the data roots, uploads, and form
values validated by the config schema.

The form copies nothing from the schema: each widget takes its bounds, default, help text
and choices from the config field it sets (`form_field("train.lr")`), and the values a
person enters are validated by the same `Config` a job validates (`form_config`), each
problem filed under its key so the page can show it next to its field. An architecture's
own settings, with their labels, come from its file (`arch_fields("llama")`).
"""

from __future__ import annotations

import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from lmforge import models
from lmforge.config import Config, field_errors, merge, read_yaml
from lmforge.data.dataset import MANIFEST
from lmforge.jobspec import JobSpecError, data_roots, repo_root

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
UPLOAD_FILE = re.compile(r"^[A-Za-z0-9][\w.-]{0,99}\.(txt|jsonl)$")


@dataclass(frozen=True)
class FormField:
    """What a widget needs to know about the config field it sets.

    `min`/`max` are the schema's bounds (None: unbounded). An exclusive bound (`gt`, `lt`)
    is given as the bound itself: a person can enter it, and the schema's check says why not.
    """

    type: type
    default: Any
    help: str | None
    min: int | float | None = None
    max: int | float | None = None
    choices: tuple | None = None
    label: str | None = None  # the field's title, where the schema gives one


def form_field(key: str, arch: str | None = None) -> FormField:
    """The config field `section.key` as a form widget sees it (bounds, default, help); a
    `model.*` key as architecture `arch`'s `Settings` has it (its own keys included)."""
    *sections, leaf = key.split(".")
    model: Any = Config
    for part in sections:
        section = model.model_fields.get(part)
        model = section.annotation if section else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise KeyError(f"{key}: {part} is not a config section")
    if model is models.ModelConfig and arch is not None:
        model = models.settings(arch)
    info = model.model_fields.get(leaf)
    if info is None:
        raise KeyError(f"{key}: not a config key")
    kind = info.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # `int | None`
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    choices = None
    if typing.get_origin(kind) is typing.Literal:
        choices = typing.get_args(kind)
        kind = type(choices[0])
    elif issubclass(model, models.ModelConfig) and leaf == "arch":
        choices = models.names()  # the files of lmforge/models/
    bound = {  # pydantic keeps each bound as one annotated_types object (Ge, Gt, Le, Lt)
        name: getattr(m, name)
        for m in info.metadata
        for name in ("ge", "gt", "le", "lt")
        if getattr(m, name, None) is not None
    }
    lo, hi = bound.get("ge", bound.get("gt")), bound.get("le", bound.get("lt"))
    if kind in (int, float):
        lo, hi = (None if b is None else kind(b) for b in (lo, hi))
    return FormField(kind, info.default, info.description, lo, hi, choices, info.title)


def arch_fields(arch: str) -> dict[str, FormField]:
    """The settings architecture `arch` adds to the shared `model.*` keys, by dotted key."""
    return {f"model.{k}": form_field(f"model.{k}", arch) for k in models.own_keys(arch)}


def presets() -> dict[str, Path]:
    """The example configs in jobs/configs/, by name (tiny, demo, gpt2-small, ...)."""
    return {p.stem: p for p in sorted((repo_root() / "jobs" / "configs").glob("*.yaml"))}


def known_datasets() -> list[Path]:
    """Prepared dataset dirs (with a manifest) inside the data roots, newest first."""
    found = {
        m.parent.resolve()
        for root in data_roots()
        if root.is_dir()
        for m in [*root.glob(MANIFEST), *root.glob(f"*/{MANIFEST}"), *root.glob(f"*/*/{MANIFEST}")]
    }
    return sorted(found, key=lambda p: (p / MANIFEST).stat().st_mtime, reverse=True)


def preset_config(path: str | os.PathLike) -> dict[str, Any]:
    """A preset's raw mapping (its `base:` chain merged), not yet validated."""
    return read_yaml(Path(path))


def source_name(path: str, paths: list[str]) -> str:
    """A mixture source's name on the form: its dir's name (with its parent's if two share
    it)."""
    p = Path(path)
    if sum(Path(q).name == p.name for q in paths) > 1:
        return f"{p.parent.name}-{p.name}"
    return p.name


def mixture_line(cfg: Config, tokens_per_step: int) -> str:
    """What a mixture's estimate adds: each source's share, its tokens over the run and how
    many passes over its train split that is (more than 1: it starts another epoch)."""
    from lmforge.data.mixture import Mixture

    mix = Mixture(cfg.data)
    shares = mix.weights.at(0)
    total = tokens_per_step * cfg.train.max_steps
    parts = []
    for s, share in zip(mix.sources, shares, strict=True):
        epochs = share * total / max(1, s.dataset.tokens("train"))
        parts.append(f"{s.name} {share:.0%} ({share * total:,.0f} tokens, {epochs:.2f} epochs)")
    return "mixture at step 0: " + " | ".join(parts) + f" | hash {mix.manifest_sha256[:12]}"


def form_config(
    base: dict[str, Any], values: dict[str, Any]
) -> tuple[Config | None, dict[str, str]]:
    """(Config or None, {dotted key: error}) for a base mapping with form values on top."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        node = nested
        *sections, leaf = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    return field_errors(merge(base, nested))


def save_upload(name: str, files: list[tuple[str, bytes]]) -> tuple[Path, Path]:
    """Write uploaded corpus files under the first data root; (corpus dir, dataset dir).

    Names are checked (letters, digits, _ . -), so nothing lands outside the data roots.
    """
    if not NAME.match(name):
        raise JobSpecError(f"dataset name {name!r}: use letters, digits, _ . - only")
    if not files:
        raise JobSpecError("no files uploaded")
    roots = data_roots()
    by_name = {r.name: r for r in roots}
    corpus = by_name.get("uploads", roots[0] / "_uploads") / name
    dataset = by_name.get("datasets", roots[0]) / name
    for fname, _ in files:
        if not UPLOAD_FILE.match(Path(fname).name) or Path(fname).name != fname:
            raise JobSpecError(f"{fname!r}: a .txt or .jsonl file name of letters, digits, _ . -")
    corpus.mkdir(parents=True, exist_ok=True)
    for fname, data in files:
        (corpus / fname).write_bytes(data)
    return corpus, dataset
