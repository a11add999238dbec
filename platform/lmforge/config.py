"""The one config schema for every lmforge job.

A config is YAML with the sections below; `--set section.key=value` overrides any key
(the value is parsed as YAML, so `--set train.lr=3e-4` is a float). Everything is
validated before Ray is touched: an unknown key, a wrong type or an out-of-range value
raises `ConfigError` with one line naming the key and what to do.

    cfg = load_config("jobs/configs/tiny.yaml", ["train.max_steps=20"])

The `model` section is `lmforge.models.ModelConfig`: the keys every architecture has, and
those of its `model.arch`, which its own file declares (`lmforge/models/<arch>.py`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from lmforge.errors import ConfigError
from lmforge.models import ModelConfig


class _Section(BaseModel):
    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Section):
    """One dataset of a mixture (`data.sources`)."""

    path: str = Field(description="A dataset dir made by `lmforge prepare` (as data.path).")
    weight: float = Field(
        1.0,
        description="Its share of the training TOKENS, relative to the others' (0.3 of a sum "
        "of 1: 30% of every step's tokens, whatever its documents' lengths).",
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Its name in metrics (data/<name>/tokens, val_loss/<name>); the dir's "
        "name when unset.",
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        """`NAME:WEIGHT:PATH` (what --set data.sources=[a:0.7:DIR,b:0.3:DIR] gives) or PATH."""
        if not isinstance(v, str):
            return v
        parts = v.split(":", 2)
        if len(parts) == 3 and "/" not in parts[0] and "/" not in parts[1]:
            try:
                return {"name": parts[0], "weight": float(parts[1]), "path": parts[2]}
            except ValueError:
                pass
        return {"path": v}

    @property
    def label(self) -> str:
        return self.name or self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def short(self) -> str:
        """NAME:WEIGHT:PATH, what `_short_form` reads back."""
        return f"{self.label}:{self.weight!r}:{self.path}"


class SchedulePoint(_Section):
    """The mixture's weights from one step on (`data.schedule`)."""

    step: int = Field(ge=0, description="The optimizer step these weights hold at.")
    weights: dict[str, float] = Field(
        description="Weight per source name; a source left out has weight 0 here."
    )


class DataConfig(_Section):
    path: str = Field(
        "datasets/shakespeare",
        description="A dataset dir made by `lmforge prepare`; relative to LMFORGE_HOME, or "
        "s3://bucket/prefix (streamed from S3). Unused when data.sources is set.",
    )
    sources: list[SourceConfig] | None = Field(
        None,
        description="A mixture instead of data.path: several datasets prepared with the same "
        "tokenizer, [{path, weight, name}], mixed by token weight into one stream.",
    )
    schedule: list[SchedulePoint] | None = Field(
        None,
        description="Mixture weights that change with the step: [{step, weights: {name: w}}] "
        "in step order; before the first point its weights, after the last the last's.",
    )
    schedule_interpolation: Literal["linear", "step"] = Field(
        "linear",
        description="Between two schedule points: linear (weights move step by step) or "
        "step (a point's weights hold until the next point).",
    )
    document_mask: bool = Field(
        False,
        description="Attention never crosses a document boundary (the token after each eos "
        "starts a new one; positions restart there). Always on for SFT datasets.",
    )

    @model_validator(mode="after")
    def _mixture(self) -> DataConfig:
        if self.sources is None:
            if self.schedule is not None:
                raise ValueError("data.schedule: needs data.sources (a mixture) to weight")
            return self
        if not self.sources:
            raise ValueError("data.sources: empty; name at least one dataset, or use data.path")
        names = [s.label for s in self.sources]
        for i, (s, name) in enumerate(zip(self.sources, names, strict=True)):
            if names.index(name) != i:
                raise ValueError(
                    f"data.sources[{i}].name={name!r}: another source has that name; give "
                    "each a distinct name"
                )
            if not s.weight >= 0:  # NaN too
                raise ValueError(f"data.sources[{i}].weight={s.weight} ({name}): must be >= 0")
        if self.schedule is None and sum(s.weight for s in self.sources) <= 0:
            raise ValueError(
                "data.sources: the weights sum to 0; give at least one source a positive weight"
            )
        for i, point in enumerate(self.schedule or []):
            if i and point.step <= self.schedule[i - 1].step:
                raise ValueError(
                    f"data.schedule[{i}].step={point.step}: out of order, after step "
                    f"{self.schedule[i - 1].step}; list the points by increasing step"
                )
            for name, w in point.weights.items():
                if name not in names:
                    raise ValueError(
                        f"data.schedule[{i}].weights: no source named {name!r} (sources: "
                        f"{', '.join(names)})"
                    )
                if not w >= 0:
                    raise ValueError(f"data.schedule[{i}].weights.{name}={w}: must be >= 0")
            if sum(point.weights.values()) <= 0:
                raise ValueError(
                    f"data.schedule[{i}] (step {point.step}): the weights sum to 0; give at "
                    "least one source a positive weight"
                )
        return self

    @property
    def paths(self) -> list[str]:
        """Every dataset dir the run reads (one, or each source's)."""
        return [s.path for s in self.sources] if self.sources else [self.path]


class DPOConfig(_Section):
    """`train.dpo`: the preference loss of `train.objective: dpo` (lmforge.preference)."""

    beta: float = Field(
        0.1, gt=0, description="How far the policy may move from the reference (DPO's beta; "
        "IPO's tau; SimPO's reward scale, which its paper sets to about 2)."
    )  # fmt: skip
    loss: Literal["sigmoid", "ipo", "simpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, or simpo (length-normalised, no reference)."
    )
    gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin (TRL's simpo_gamma).")


class LoraConfig(_Section):
    r: int = Field(8, ge=1, description="Rank of each low-rank adapter.")
    alpha: float = Field(16.0, gt=0, description="Scale: the update is (alpha/r)·B·A.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input.")
    target_modules: list[str] | None = Field(
        None,
        description="Linear layers to adapt, by their last name (e.g. c_attn, q_proj); "
        "default every linear layer but the output head.",
    )


class SpikeConfig(_Section):
    factor: float = Field(
        5.0, gt=1, description="A step's loss above factor x the median of the last window."
    )
    window: int = Field(20, ge=2, description="Steps whose median loss a step is compared with.")


class GuardConfig(_Section):
    """What the guard does when a run diverges (`lmforge.guard`). It looks at the steps'
    losses and grad norms where the loop syncs them anyway (the log steps), on every rank
    alike, so it adds no collective and no host sync."""

    nonfinite: Literal["rollback", "stop", "off"] = Field(
        "rollback",
        description="A NaN/inf loss or grad norm (on any rank): roll back to the last sound "
        "checkpoint and go on, stop the run, or do nothing. A spike does the same (off: "
        "rollback).",
    )
    spike: SpikeConfig | None = Field(
        None, description="Also act on a loss spike: {factor: F, window: W}; unset: not."
    )
    max_rollbacks: int = Field(
        3, ge=0, description="Rollbacks allowed; the next trigger stops the run, saying why."
    )
    skip_batches: bool = Field(
        True,
        description="After a rollback, skip the data from the checkpoint to the trigger "
        "(recorded in the run, so a resume skips it too); false: read it again.",
    )
    lr_scale_after: float = Field(
        1.0, gt=0, le=1, description="Multiply the learning rate by this after each rollback."
    )


class TrainConfig(_Section):
    max_steps: int = Field(200, ge=1, description="Optimizer steps to train for.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per micro-step.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    lr: float = Field(1e-3, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps before cosine decay.")
    min_lr: float = Field(1e-4, ge=0, description="Learning rate at the end of cosine decay.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (2-D weights only).")
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Clip the global grad norm; 0 disables.")
    eval_every: int = Field(50, ge=1, description="Evaluate on the val split every N steps.")
    eval_steps: int = Field(10, ge=1, description="Micro-batches per worker per evaluation.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at end).")
    log_every: int = Field(10, ge=1, description="Print a progress line every N steps.")
    seed: int = Field(1337, ge=0, description="Seeds init, dropout and the data order.")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Compute dtype.")
    lora: LoraConfig | None = Field(
        None,
        description="Train low-rank adapters (peft) on a frozen base instead of every weight; "
        "needs a base to start from (--init-from). Works under ZeRO 0-3 (the optimizer and "
        "its state hold only the adapters); a checkpoint stores only the adapters and a "
        "reference to the base. Not for lstm (no linear layers to adapt).",
    )
    guard: GuardConfig | None = Field(
        None,
        description="Guardrails against divergence: roll back past a NaN/inf or a loss "
        "spike to the last sound checkpoint, skip that data, optionally lower the LR, or "
        "stop; unset: no guard.",
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward (less memory)."
    )
    compile: bool = Field(False, description="torch.compile the model before training.")
    objective: Literal["lm", "dpo"] = Field(
        "lm",
        description="lm: next-token loss on the data's targets; dpo: preference tuning on a "
        "`prepare --format preference` dataset from --init-from (the reference), with "
        "train.dpo's loss (DPO, IPO or SimPO; `ipo` and `simpo` here are short for dpo with "
        "that loss).",
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig)

    @model_validator(mode="before")
    @classmethod
    def _objective_shorthand(cls, data: Any) -> Any:
        """`objective: ipo` / `simpo` is `objective: dpo` with that `dpo.loss`."""
        if not isinstance(data, dict) or data.get("objective") not in ("ipo", "simpo"):
            return data
        kind, dpo = data["objective"], dict(data.get("dpo") or {})
        if dpo.get("loss", kind) != kind:
            raise ValueError(
                f"train.objective={kind} with train.dpo.loss={dpo['loss']}: give one of them"
            )
        return {**data, "objective": "dpo", "dpo": {**dpo, "loss": kind}}

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(
                f"train.warmup_steps={self.warmup_steps} exceeds train.max_steps={self.max_steps}"
            )
        return self


class ZeroConfig(_Section):
    stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="ZeRO-Offload.")
    offload_params: Literal["none", "cpu"] = Field("none", description="ZeRO-3 param offload.")

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> ZeroConfig:
        if self.offload_optimizer != "none" and self.stage < 1:
            raise ValueError("zero.offload_optimizer needs zero.stage >= 1")
        if self.offload_params != "none" and self.stage != 3:
            raise ValueError("zero.offload_params needs zero.stage = 3")
        return self


class ScalingConfig(_Section):
    num_workers: int | tuple[int, int] = Field(
        2,
        description="Ray Train workers (one per GPU on GPUs), or [min, max] for elastic "
        "training: Ray Train starts with as many as the cluster fits (at most max), goes on "
        "with fewer (at least min) from the latest checkpoint when a node is lost, and grows "
        "back when nodes return. The micro-batch per worker stays fixed, so a step's global "
        "batch (micro_batch_size x grad_accum_steps x workers) follows the worker count.",
    )
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places the workers on nodes: PACK (as few nodes as fit), SPREAD "
        "(as many as it can), STRICT_SPREAD (each worker on its own node; fails to start "
        "with fewer nodes than workers).",
    )
    elastic_resize_interval_s: float = Field(
        60.0,
        gt=0,
        description="Elastic num_workers only: how often (seconds) Ray Train checks whether "
        "the cluster fits more workers than run now, and if so restarts them, more of them, "
        "from the latest checkpoint.",
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _num_workers(cls, v: Any) -> Any:
        def whole(x: Any) -> bool:  # 2.0 from a form's number field is 2; True is not
            return not isinstance(x, bool) and (
                isinstance(x, int) or (isinstance(x, float) and x.is_integer())
            )

        if isinstance(v, list | tuple):
            if len(v) != 2 or not all(map(whole, v)):
                raise ValueError("expected a whole number or a [min, max] pair of them")
            lo, hi = int(v[0]), int(v[1])
            if not 1 <= lo <= hi:
                raise ValueError("[min, max] needs 1 <= min <= max")
            return lo if lo == hi else (lo, hi)
        if not whole(v):
            raise ValueError("expected a whole number or a [min, max] pair of them")
        if v < 1:
            raise ValueError("needs at least 1 worker")
        return int(v)

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers


class RunConfig(_Section):
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="Run name (folder under storage_path); generated when unset.",
    )
    storage_path: str = Field(
        "runs",
        description="Ray Train storage: a local dir (relative to LMFORGE_HOME) or "
        "s3://bucket/prefix (see the storage section).",
    )
    checkpoints_to_keep: int | None = Field(
        None, ge=1, description="Keep only the newest N checkpoints; all when unset."
    )
    max_failures: int = Field(
        0,
        ge=-1,
        description="Restart the workers after a worker or node dies (or raises) up to N "
        "times, from the latest checkpoint; -1: no limit.",
    )
    shared_filesystem: bool = Field(
        False,
        description="Declare a local storage_path shared by every node (an NFS-style mount); "
        "without it a local path is refused on a cluster of more than one node.",
    )


class StorageConfig(_Section):
    """How to reach an S3-compatible store for `s3://` paths (run.storage_path, data.path).
    Unset keys fall back to the standard AWS_* variables; credentials never go here, only
    in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN)."""

    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint, http(s)://host:port (MinIO, Ceph, moto); AWS_ENDPOINT_URL_S3 "
        "or AWS_ENDPOINT_URL when unset, else AWS itself.",
    )
    region: str | None = Field(
        None, description="S3 region; AWS_REGION or AWS_DEFAULT_REGION when unset."
    )
    force_path_style: bool | None = Field(
        None,
        description="Path-style addressing (host/bucket/key); when unset, path-style with an "
        "endpoint_url, virtual-hosted (bucket.host/key) on AWS.",
    )

    @model_validator(mode="after")
    def _endpoint(self) -> StorageConfig:
        from lmforge.storage import StorageError, check_endpoint

        try:
            check_endpoint(self.endpoint_url)
        except StorageError as err:
            raise ValueError(str(err)) from None
        return self


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="Log the run to MLflow and register checkpoints.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; when unset, MLFLOW_TRACKING_URI, else the server of "
        "`lmforge tracking up`, else the SQLite store under LMFORGE_HOME.",
    )
    experiment: str = Field(
        "lmforge", min_length=1, max_length=200, description="MLflow experiment of the run."
    )
    registered_model: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$",
        description="Registered model that gets a version per checkpoint; the experiment "
        "name when unset.",
    )
    outage_wait_s: float = Field(
        600.0,
        ge=0,
        description="At the end of a run, how long rank 0 waits for an MLflow server that "
        "answered before and is down now to come back and take the rest (metrics, versions); "
        "a server that never answered gets one last try, then one warning, no wait.",
    )

    @model_validator(mode="after")
    def _no_credentials(self) -> TrackingConfig:
        # A model check, not a field one: a field's error would echo the value (the secret).
        scheme, _, rest = (self.tracking_uri or "").partition("://")
        user_info, at, _ = rest.split("/", 1)[0].rpartition("@")
        # A server: no user-info at all (a token as user name too); a database: no password.
        if at and (scheme.startswith("http") or ":" in user_info):
            raise ValueError(
                "tracking.tracking_uri: holds credentials (user:password@); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in the environment "
                "instead (a database store: its own, e.g. PGPASSWORD)"
            )
        return self


class EvalConfig(_Section):
    """Evaluation of every checkpoint, beside training (issue 26): Ray Train's checkpoint
    validation runs these on each persisted checkpoint and logs the scores on its version."""

    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks run on every checkpoint: task YAML files "
        "(local data_files) or the harness's task names; checked before training starts.",
    )
    limit: int | None = Field(None, ge=1, description="At most N examples of each task.")
    num_fewshot: int | None = Field(
        None, ge=0, description="Worked examples before each question (default: the task's)."
    )
    template: str = Field(
        "own",
        description="How prompts are given to the model: own (the template the run trains "
        "with, raw text without one), none, or a built-in template's name.",
    )
    select: str = Field(
        "val_loss",
        pattern=r"^(val_loss|[A-Za-z0-9_.-]+/[A-Za-z0-9_.+-]+)$",
        description="What the registry's `best` alias follows: val_loss, or a score "
        "<task>/<metric> of eval.tasks (e.g. copy/exact_match).",
    )
    select_mode: Literal["min", "max"] | None = Field(
        None,
        description="Whether the lowest or the highest eval.select wins; default: min for "
        "val_loss, else the harness's direction of that metric.",
    )
    probes: str | None = Field(
        None,
        description="A file of prompts (one a line, or JSON lines with a `prompt`) answered "
        "on every checkpoint, greedily and by eval.probe_samples seeded samples; stored on "
        "the version as an MLflow table.",
    )
    probe_samples: int = Field(2, ge=0, le=16, description="Sampled answers per probe.")
    probe_max_new_tokens: int = Field(32, ge=1, le=1024, description="Tokens per answer.")
    cpus: float = Field(
        1.0, gt=0, description="CPUs Ray reserves for each checkpoint's evaluation task."
    )
    max_retries: int = Field(
        2, ge=0, description="Times a killed evaluation task is retried (Ray's task retries)."
    )

    @property
    def enabled(self) -> bool:
        return bool(self.tasks or self.probes)


class Config(_Section):
    # The `Settings` of model.arch (`lmforge.models`), dumped with its own keys; built when
    # first needed, as that imports the architecture's file (and torch).
    model: SerializeAsAny[ModelConfig] = Field(default_factory=ModelConfig)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    zero: ZeroConfig = ZeroConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            raise ValueError("train.precision=fp16 needs scaling.use_gpu=true; use bf16 on CPU")
        sources = [
            (f"data.sources[{i}].path", s.path) for i, s in enumerate(self.data.sources or [])
        ]
        for key, value in (
            ("run.storage_path", self.run.storage_path),
            ("data.path", self.data.path),
            *sources,
        ):
            if "://" in value and not re.fullmatch(r"s3://[a-z0-9][a-z0-9.-]{1,62}(/.*)?", value):
                raise ValueError(
                    f"{key}={value!r}: expected a local path or s3://bucket/prefix (the only "
                    "URI scheme supported)"
                )
        if self.tracking.registered_model is None and not re.fullmatch(
            r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.tracking.experiment
        ):
            raise ValueError(
                f"tracking.experiment={self.tracking.experiment!r} is not a valid model name; "
                "set tracking.registered_model (letters, digits, _ . -)"
            )
        return self

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or self.tracking.experiment

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _problems(err: ValidationError) -> list[tuple[str, str]]:
    """(key, message) per problem; a cross-key check is filed under the first key it names."""
    out = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = ".".join(str(p) for p in e["loc"][:-1])
            known = _known_keys(section)
            msg = f"unknown key (known: {', '.join(known)})" if known else "unknown key"
        elif "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        named = re.search(r"\b([a-z]+\.[a-z_0-9]+)=", msg)
        if named and (not key or "." not in key):
            key = named.group(1)
        out.append((key, msg))
    return out


def _one_line(err: ValidationError) -> str:
    """Pydantic's report as one line: `key: message (got value)` per problem."""
    # A section's own checks already name their keys ("train.min_lr=... is above ...").
    return "; ".join(
        msg if not key or msg.startswith(f"{key}") else f"{key}: {msg}"
        for key, msg in _problems(err)
    )


def field_errors(raw: dict[str, Any]) -> tuple[Config | None, dict[str, str]]:
    """Validate a config mapping; the config, or each problem under its dotted key.

    For forms that show an error next to its field (the dashboard's launch page).
    """
    try:
        return Config.model_validate(raw), {}
    except ValidationError as err:
        errors: dict[str, str] = {}
        for key, msg in _problems(err):
            errors.setdefault(key, msg)
        return None, errors


def _known_keys(section: str) -> list[str]:
    model: type[BaseModel] = Config
    for part in filter(None, section.split(".")):
        field = model.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type):
            return []
        model = field.annotation
    return list(model.model_fields)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-4", "model.n_layer=4"]` -> nested dict; values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section (neither is changed)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> Config:
    merged = merge(raw, parse_overrides(overrides or []))
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping, with its `base:` file (relative to it) merged underneath."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: `base:` files include each other")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    base = raw.pop("base", None)
    if base is None:
        return raw
    return merge(read_yaml(path.parent / str(base), (*chain, path.resolve())), raw)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or only defaults when `path` is None), apply overrides, validate.

    A config may start from another with `base: other.yaml` and change only what differs.
    """
    raw = read_yaml(Path(path)) if path is not None else {}
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None
