"""A sweep's search space (SPACE.yaml), checked against the config schema before any trial.

    train.lr: {loguniform: [1.0e-4, 3.0e-3]}
    train.warmup_steps: {choice: [0, 20, 50]}
    train.lora.r: {choice: [4, 8, 16]}
    model.d_model: {grid: [64, 128]}

Each key is a dotted config key (as `--set` takes); each value one distribution:
`loguniform: [lo, hi]`, `uniform: [lo, hi]` (floats), `randint: [lo, hi]` (whole numbers
lo..hi-1, as Tune's), `choice: [v, ...]` (sampled) or `grid: [v, ...]` (every value tried;
several grid keys: every combination).

`check_space` settles, before Ray is touched, that every value the space can produce makes
a valid config: each key exists, each choice/grid value and each bound of a range passes the
schema (its type, its range, the checks across keys), together with every other key's
extremes. A float distribution over a whole-number key is refused (use randint or choice).
With a memory budget per worker it also asks the launch estimate (`lmforge.estimate`)
whether each point fits: a grid point that cannot is named and skipped, a distribution
whose bounds do not fit is refused. All refusals are one `ConfigError` line naming the
SPACE file, its line and the key.
"""

from __future__ import annotations

import itertools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lmforge.config import Config, ConfigError, config_from_dict, merge, parse_overrides

KINDS = ("loguniform", "uniform", "randint", "choice", "grid")
MAX_CORNERS = 4096  # points the schema and the estimate check; a bigger space is refused
GRID_KEY = "__grid__"  # the Tune config key that carries one grid point ({key: value})


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key
    kind: str  # one of KINDS
    values: tuple  # [lo, hi] for the ranges, the values of choice/grid
    where: str = ""  # "SPACE.yaml:3" for messages

    @property
    def ranged(self) -> bool:
        return self.kind in ("loguniform", "uniform", "randint")

    def extremes(self) -> list[Any]:
        """The values that bound what this parameter can produce."""
        if self.kind == "randint":
            return [int(self.values[0]), int(self.values[1]) - 1]
        if self.ranged:
            return [float(self.values[0]), float(self.values[1])]
        return list(self.values)

    def describe(self) -> str:
        return f"{self.kind}{list(self.values)}"


@dataclass
class Space:
    params: list[Param]
    path: str = "SPACE"
    skipped: list[dict[str, Any]] = field(default_factory=list)  # grid points that cannot fit
    grid_points: list[dict[str, Any]] | None = None  # after the check (None: no grid keys)

    @property
    def grid(self) -> list[Param]:
        return [p for p in self.params if p.kind == "grid"]

    @property
    def sampled(self) -> list[Param]:
        return [p for p in self.params if p.kind != "grid"]

    def to_dict(self) -> dict[str, dict[str, list]]:
        """The space as SPACE.yaml has it (for the MLflow parent run, the dashboard)."""
        return {p.key: {p.kind: list(p.values)} for p in self.params}

    def all_grid_points(self) -> list[dict[str, Any]]:
        grid = self.grid
        return [
            dict(zip([p.key for p in grid], combo, strict=True))
            for combo in itertools.product(*(p.values for p in grid))
        ]


def load_space(path: str | Path) -> Space:
    """Read SPACE.yaml (its shape only; `check_space` checks it against a config)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: space file not found")
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for k, _ in node.value:
            lines[str(k.value)] = k.start_mark.line + 1
    raw = yaml.safe_load(path.read_text())
    return parse_space(raw, str(path), lines)


def _number(v: Any) -> Any:
    """YAML 1.1 (PyYAML) reads `1e-3` as a string (a float needs a dot: `1.0e-3`); a bound
    written that way is the number a user means."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def parse_space(raw: Any, path: str = "SPACE", lines: dict[str, int] | None = None) -> Space:
    """A space from its mapping {dotted.key: {kind: values}}."""
    lines = lines or {}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{path}: expected a mapping of config keys to distributions, e.g. "
            "train.lr: {loguniform: [1.0e-4, 3.0e-3]}"
        )
    params = []
    for key, spec in raw.items():
        where = f"{path}:{lines[str(key)]}" if str(key) in lines else path
        params.append(_param(str(key), spec, where))
    return Space(params, path)


def _param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{where}: {key}: expected one distribution, {{kind: values}} with kind one of "
            f"{', '.join(KINDS)} (got {spec!r})"
        )
    ((kind, values),) = spec.items()
    if kind not in KINDS:
        raise ConfigError(
            f"{where}: {key}: unknown distribution {kind!r} (known: {', '.join(KINDS)})"
        )
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {key}: {kind} takes a list (got {values!r})")
    if kind in ("loguniform", "uniform", "randint"):
        values = [_number(v) for v in values]
        if len(values) != 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values
        ):
            raise ConfigError(
                f"{where}: {key}: {kind} takes [low, high], two numbers (got {values!r})"
            )
        lo, hi = values
        if kind == "randint" and not all(float(v).is_integer() for v in values):
            raise ConfigError(f"{where}: {key}: randint takes whole numbers (got {values!r})")
        if not lo < hi or (kind == "randint" and hi - lo < 1):
            raise ConfigError(f"{where}: {key}: {kind} needs low < high (got {values!r})")
        if kind == "loguniform" and lo <= 0:
            raise ConfigError(f"{where}: {key}: loguniform needs low > 0 (got {lo!r})")
        if not all(math.isfinite(float(v)) for v in values):
            raise ConfigError(f"{where}: {key}: {kind} bounds must be finite (got {values!r})")
    return Param(key, kind, tuple(values), where)


def field_type(key: str, arch: str | None) -> Any:
    """The annotation of config key `key` (None when it is not a config key)."""
    from lmforge import models

    *sections, leaf = key.split(".")
    model: Any = Config
    for part in sections:
        info = model.model_fields.get(part) if isinstance(model, type) else None
        if info is None:
            return None
        model = _section_type(info.annotation)
        if model is None:
            return None
    if model is models.ModelConfig and arch is not None:
        model = models.settings(arch)
    info = model.model_fields.get(leaf)
    return None if info is None else info.annotation


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """`LoraConfig | None` -> LoraConfig; the model class of a nested section."""
    args = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    for a in args:
        a = typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a
        if isinstance(a, type) and issubclass(a, BaseModel):
            return a
    return None


def _is_union(t: Any) -> bool:
    return typing.get_origin(t) in (typing.Union, types.UnionType)


def _whole_only(annotation: Any) -> bool:
    """A key that takes whole numbers and no floats (int, int | None)."""
    args = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return int in args and float not in args


def overrides_of(values: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1e-3} -> {"train": {"lr": 1e-3}} (values kept as they are)."""
    nested: dict[str, Any] = {}
    for key, value in values.items():
        *sections, leaf = key.split(".")
        node = nested
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def trial_config(base: dict[str, Any], values: dict[str, Any]) -> Config:
    """The config of one trial: the base mapping with the trial's values on top."""
    return config_from_dict(merge(base, overrides_of(values)))


def base_mapping(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The base config mapping with `--set` overrides (validated as a whole config)."""
    merged = merge(raw, parse_overrides(overrides))
    config_from_dict(merged)  # the base itself must be a valid config
    return merged


@dataclass(frozen=True)
class Fit:
    """What the launch estimate says of one point: its per-worker bytes against the budget."""

    point: dict[str, Any]
    need: float
    budget: float

    @property
    def fits(self) -> bool:
        return self.need <= self.budget


def check_space(
    space: Space,
    base: dict[str, Any],
    worker_memory: float | None = None,
    vocab_size: int | None = None,
) -> Space:
    """Refuse a space that can produce an invalid config (one line), or, with a per-worker
    memory budget (bytes), one whose distributions reach points the estimate says cannot
    fit; grid points that cannot fit are skipped (named in `space.skipped`). Returns the
    space with `grid_points` settled."""
    base_cfg = config_from_dict(base)
    arch = base_cfg.model.arch
    for p in space.params:
        if p.key == "model.arch" or p.key.startswith(("run.", "tracking.")):
            raise ConfigError(
                f"{p.where}: {p.key}: not sweepable (each trial's run, tracking and "
                "architecture are the sweep's)"
            )
        ann = field_type(p.key, arch)
        if ann is None:
            # The schema's own message names the known keys of the section.
            try:
                trial_config(base, {p.key: p.extremes()[0]})
            except ConfigError as err:
                raise ConfigError(f"{p.where}: {err}") from None
            raise ConfigError(f"{p.where}: {p.key}: not a config key")
        if ann is not None and p.kind in ("uniform", "loguniform") and _whole_only(ann):
            raise ConfigError(
                f"{p.where}: {p.key}: {p.kind} gives floats, but the key takes whole numbers; "
                "use randint or choice"
            )
        for v in p.extremes():  # each value alone, the rest of the config as the base has it
            _validate(base, {p.key: v}, p)
    grid_keys = [p.key for p in space.grid]
    corners_of = [p.extremes() for p in space.sampled]
    n = math.prod(len(c) for c in corners_of) * max(1, len(space.all_grid_points()))
    if n > MAX_CORNERS:
        raise ConfigError(
            f"{space.path}: the space has {n} extreme points to check (grid points x each "
            f"distribution's bounds and choices), more than {MAX_CORNERS}; make it smaller"
        )
    keep, skipped = [], []
    for g in space.all_grid_points() if grid_keys else [{}]:
        fits: list[Fit] = []
        for combo in itertools.product(*corners_of):
            point = {**g, **dict(zip([p.key for p in space.sampled], combo, strict=True))}
            cfg = _validate(base, point, None, space)
            if worker_memory is not None:
                fits.append(Fit(point, _need(cfg, vocab_size), worker_memory))
        if worker_memory is None or all(f.fits for f in fits):
            keep.append(g)
            continue
        bad = next(f for f in fits if not f.fits)
        if grid_keys and not any(f.fits for f in fits):
            skipped.append({**g, "_need": bad.need, "_budget": bad.budget})
            continue
        varied = {k: v for k, v in bad.point.items() if k not in g}
        from lmforge.estimate import human_bytes

        raise ConfigError(
            f"{space.path}: {_point_text(varied)}"
            + (f" (with {_point_text(g)})" if g else "")
            + f" needs {human_bytes(bad.need)} per worker by the launch estimate, more than "
            f"the {human_bytes(bad.budget)} a worker has: narrow that distribution's range"
        )
    if grid_keys and not keep:
        raise ConfigError(
            f"{space.path}: no grid point fits a worker's memory by the launch estimate "
            f"(skipped: {'; '.join(_point_text(_clean(s)) for s in skipped)})"
        )
    space.skipped = skipped
    space.grid_points = keep if grid_keys else None
    return space


def _clean(point: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in point.items() if not k.startswith("_")}


def _point_text(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in point.items())


def _need(cfg: Config, vocab_size: int | None) -> float:
    from lmforge.estimate import estimate

    return estimate(cfg, vocab_size=vocab_size or cfg.model.vocab_size or 8192).per_worker_bytes[
        "total"
    ]


def _validate(
    base: dict[str, Any], point: dict[str, Any], p: Param | None, space: Space | None = None
) -> Config:
    try:
        return trial_config(base, point)
    except ConfigError as err:
        if p is not None:
            raise ConfigError(
                f"{p.where}: {p.key}: {p.describe()} gives {point[p.key]!r}: {err}"
            ) from None
        where = space.path if space is not None else "SPACE"
        raise ConfigError(f"{where}: the point {_point_text(point)}: {err}") from None
