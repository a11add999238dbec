"""The checkpoint dir: resumable and servable from the same folder.

    model.safetensors    consolidated fp32 weights (never pickle)
    config.yaml          the resolved config of the run
    tokenizer.json       the dataset's tokenizer (+ its tokenizer_config.json and
                         special_tokens_map.json when it has them: they name its eos)
    trainer_state.json   step, tokens seen, each worker's data position, dataset hashes
    template.json        the prompt template of an SFT dataset it was trained on (if any)
    deepspeed/           DeepSpeed engine state (model, optimizer, LR schedule) to resume
    files.json           every file above (all ranks' engine shards too) with its size

A LoRA run's checkpoint (`train.lora`) holds `adapter.safetensors` (the adapters only)
and `base.json` (its base: the version URI or folder it started from, the folder the run
read it from, the sha256 of its weights) instead of `model.safetensors`; `load_model`
loads the base, adds the adapters and loads them. A version fetched from the registry
keeps a copy of its base beside it (`base/`).

`files.json` is written last, just before Ray copies the dir into the run dir; that copy
(one per rank, files in no set order) can be cut short by a dead worker, so a checkpoint
is complete only when every file it lists is there with its size (`incomplete` says what
is not). Checkpoints from before that listing name no `files` in their trainer state; for
them the servable files must be there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file

from lmforge import models, raycompat, storage
from lmforge.config import Config, ConfigError, config_from_dict
from lmforge.errors import LmforgeError, first_line
from lmforge.templates import TEMPLATE_FILE, Template
from lmforge.templates import save as save_template_file
from lmforge.tokenizer import TOKENIZER, TOKENIZER_EXTRAS, copy_tokenizer, load_tokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"

STATE = "trainer_state.json"
SERVABLE = (WEIGHTS, CONFIG, TOKENIZER, STATE)  # all a model needs, without the engine state
ADAPTER = "adapter.safetensors"  # a LoRA checkpoint's weights: the adapters only
BASE = "base.json"  # a LoRA checkpoint's base (`BaseRef`)
BASE_DIR = "base"  # a fetched adapter version's copy of its base (the registry puts it)
ADAPTER_SERVABLE = (ADAPTER, BASE, CONFIG, TOKENIZER, STATE)
FILES = "files.json"  # {"files": {relative path: size in bytes}}, the last file written
ENGINE_DIR = "deepspeed"
ENGINE_TAG = "state"
log = logging.getLogger(__name__)


class CheckpointError(LmforgeError, ValueError):
    """A checkpoint that cannot be used; the message names the dir or file."""


@dataclass(frozen=True)
class DatasetIdentity:
    """Which dataset a checkpoint was trained on (a resume or fine-tune must match it)."""

    path: str
    manifest_sha256: str
    tokenizer_sha256: str


@dataclass(frozen=True)
class TrainerState:
    """`trainer_state.json`: where a run stands. Written by `write_state` (rank 0, once per
    checkpoint), read by `read_state`; nothing else touches the file or its keys."""

    step: int
    tokens_seen: int = 0
    world_size: int = 1
    data: list[dict[str, Any]] = field(default_factory=list)  # each rank's stream position
    dataset: DatasetIdentity | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # of the checkpoint's step
    evals: list[dict[str, float]] = field(default_factory=list)  # {"step", "val_loss"} so far
    guard: dict[str, Any] = field(default_factory=dict)  # the guard's rollbacks so far
    sealed: bool = True  # FILES lists every file of the checkpoint (False: older checkpoints)

    @property
    def val_loss(self) -> float | None:
        return self.metrics.get("val_loss")

    def to_json(self) -> str:
        raw = asdict(self)
        raw["files"] = FILES if raw.pop("sealed") else None
        return json.dumps(raw, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        raw = json.loads(text)
        dataset = raw.get("dataset")
        return cls(
            step=int(raw["step"]),
            tokens_seen=int(raw.get("tokens_seen", 0)),
            world_size=int(raw.get("world_size", 1)),
            data=list(raw.get("data", [])),
            dataset=DatasetIdentity(**dataset) if dataset else None,
            metrics=dict(raw.get("metrics", {})),
            evals=list(raw.get("evals", [])),
            guard=dict(raw.get("guard") or {}),
            sealed=raw.get("files") == FILES,
        )


@dataclass(frozen=True)
class BaseRef:
    """`base.json`: the base model a LoRA checkpoint's adapters belong to."""

    uri: str  # what --init-from named: a version URI or a checkpoint / run dir
    path: str  # the base's servable files as the run read them (its run dir's init_from/)
    sha256: str  # of the base's model.safetensors: a moved alias or other folder is refused


def weights_sha256(ckpt: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(ckpt / WEIGHTS, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def is_adapter(path: Path | storage.S3Path) -> bool:
    return (path / ADAPTER).is_file()


def read_base(path: Path) -> BaseRef:
    try:
        return BaseRef(**json.loads((path / BASE).read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path / BASE}: unreadable ({first_line(err)})") from None


def find_base(ckpt: Path) -> Path:
    """The base checkpoint of the LoRA checkpoint `ckpt`: its fetched copy (`base/`), the
    folder its run read, or the folder --init-from named; the first whose weights are the
    ones the adapters were trained on."""
    ref = read_base(ckpt)
    for cand in (ckpt / BASE_DIR, ref.path, ref.uri):
        if str(cand).startswith("models:/"):
            continue  # the registry resolves those (`fetch_checkpoint` puts it in base/)
        try:
            base = resolve_checkpoint(cand)
        except CheckpointError:
            continue
        if weights_sha256(base) == ref.sha256:
            return base
    raise CheckpointError(
        f"{ckpt}: its base {ref.uri} (weights sha256 {ref.sha256[:12]}) is not at {ref.path}; "
        "load the adapter through its registered version, which brings the base"
    )


def save_adapter(
    out: Path,
    adapter: dict[str, torch.Tensor],
    cfg: Config,
    tokenizer_path: Path,
    state: TrainerState,
    base: BaseRef,
) -> None:
    """A LoRA checkpoint's servable files: the adapters, their base, config, tokenizer;
    `trainer_state.json` last."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter.items()}
    save_file(tensors, str(out / ADAPTER), metadata={"format": "pt", "adapter": "lora"})
    (out / BASE).write_text(json.dumps(asdict(base), indent=2) + "\n")
    (out / CONFIG).write_text(cfg.to_yaml())
    copy_tokenizer(tokenizer_path, out)
    write_state(out, state)


def save_servable(
    out: Path,
    weights: dict[str, torch.Tensor],
    cfg: Config,
    tokenizer_path: Path,
    state: TrainerState,
) -> None:
    """Write everything but the engine state; `trainer_state.json` last.

    A tied weight's alias is dropped (safetensors stores a tensor once): the architecture
    names its aliases.
    """
    out.mkdir(parents=True, exist_ok=True)
    arch = models.get(cfg.model.arch)
    tensors = {
        k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in weights.items()
        if k not in arch.tied(cfg.model)
    }
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "arch": arch.name})
    (out / CONFIG).write_text(cfg.to_yaml())
    copy_tokenizer(tokenizer_path, out)  # with its tokenizer_config.json (the eos)
    write_state(out, state)


def servable_files(path: Path) -> list[str]:
    """SERVABLE (ADAPTER_SERVABLE for a LoRA checkpoint), and the tokenizer's transformers
    files the checkpoint at `path` has."""
    own = ADAPTER_SERVABLE if is_adapter(path) else SERVABLE
    return [*own, *(n for n in (*TOKENIZER_EXTRAS, TEMPLATE_FILE) if (path / n).is_file())]


def save_template(out: Path, template: Template | None) -> None:
    """`template.json` beside the tokenizer files: the prompt template the run's data was
    rendered with (an SFT dataset's), so generation formats prompts the same way."""
    if template is not None:
        save_template_file(template, out)


def file_sizes(path: Path) -> dict[str, int]:
    """Every file under `path` but its FILES listing: relative POSIX path -> size in bytes."""
    return {
        rel: f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and (rel := f.relative_to(path).as_posix()) != FILES
    }


def seal(path: Path, others: Iterable[dict[str, int]] = ()) -> None:
    """Write FILES: the sizes of `path`'s files and of `others` (what the other ranks add to
    the same checkpoint dir, from their `file_sizes`). Call it after the last file is written
    and its trainer state says `"files": FILES`."""
    files: dict[str, int] = {}
    for part in others:
        files.update(part)
    files.update(file_sizes(path))
    (path / FILES).write_text(json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def incomplete(path: Path | storage.S3Path) -> str | None:
    """What makes `path` an incomplete checkpoint (a file missing or cut short), or None."""
    listed = path.files() if storage.is_remote(path) else None  # S3: one listing, no HEADs

    def size(rel: str) -> int | None:
        if listed is not None:
            return listed.get(rel)
        f = path / rel
        return f.stat().st_size if f.is_file() else None

    required = ADAPTER_SERVABLE if size(ADAPTER) is not None else SERVABLE
    missing = [f for f in required if size(f) is None]
    if missing:
        return f"{missing[0]} is missing"
    if size(FILES) is None:
        try:
            sealed = read_state(path).sealed
        except CheckpointError:
            return f"{STATE} is unreadable"
        # A checkpoint from before FILES existed: its servable files are all it is checked for.
        return f"{FILES}, its list of files, is missing" if sealed else None
    try:
        files = json.loads((path / FILES).read_text())["files"]
        wrong = []
        for rel, want in files.items():
            found = size(rel)
            if found is None:
                wrong.append(f"{rel} is missing")
            elif found != want:
                wrong.append(f"{rel} has {found} bytes, {FILES} says {want}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{FILES} is unreadable ({type(err).__name__}: {err})"
    if not wrong:
        return None
    more = f" (and {len(wrong) - 1} more files missing or cut short)" if len(wrong) > 1 else ""
    return wrong[0] + more


def is_complete(path: Path) -> bool:
    return incomplete(path) is None


def write_state(path: Path, state: TrainerState) -> None:
    (path / STATE).write_text(state.to_json())


def read_state(path: Path) -> TrainerState:
    try:
        return TrainerState.from_json((path / STATE).read_text())
    except (OSError, ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path / STATE}: unreadable ({first_line(err)})") from None


def read_config(path: Path) -> Config:
    try:
        raw = yaml.safe_load((path / CONFIG).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / CONFIG}: unreadable ({err})".replace("\n", " ")) from None
    try:
        return config_from_dict(raw)
    except ConfigError as err:
        raise CheckpointError(f"{path / CONFIG}: {err}") from None


RAY_RECORD = raycompat.TRAIN_RECORD  # Ray Train's record of a run's checkpoints
LOCAL_RECORD = "checkpoints.json"  # a `LocalSession` run's record: {"checkpoints": [names]}


def dir_name(step: int) -> str:
    """The name of a run's checkpoint of `step` in its run dir."""
    return f"checkpoint_{step:08d}"


def in_run(run_dir: str | Path | storage.S3Path, checkpoint: str | Path) -> Path | storage.S3Path:
    """The run dir's copy of a checkpoint, from its name or any path ending in it (Ray
    Train's own view of where it persisted it: a worker's or the driver's)."""
    return storage.resolve(run_dir) / Path(str(checkpoint)).name


def record_file(run_dir: Path | storage.S3Path) -> Path | storage.S3Path | None:
    """The file recording a run's checkpoints (Ray Train's, or a local session's), if any."""
    for name in (RAY_RECORD, LOCAL_RECORD):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def has_checkpoints(run_dir: Path | storage.S3Path) -> bool:
    """Whether a checkpoint of this run dir was recorded (the run can be resumed)."""
    return record_file(run_dir) is not None


def latest_in_run(run_dir: Path | storage.S3Path) -> Path | storage.S3Path | None:
    """The run's latest checkpoint by its record: the one Ray restores a restarted worker
    group from, and the one `--resume`, `generate --checkpoint RUN` and the registry use
    too. A checkpoint is recorded only once every rank's copy of it finished, so a dir a
    dying worker left half-copied is never in the record; what is recorded is still checked
    against its FILES listing. None when none is recorded."""
    record = record_file(run_dir)
    if record is None:
        return None
    try:
        name = _recorded_latest(run_dir, record)
    except Exception as err:  # Ray raises RuntimeError and its own errors for a bad record
        raise CheckpointError(f"{record}: unreadable ({first_line(err)})") from None
    if name is None:
        return None
    path = in_run(run_dir, name)
    if why := incomplete(path):
        raise CheckpointError(f"{path}: the run's latest checkpoint is incomplete ({why})")
    return path


def _recorded_latest(run_dir: Path | storage.S3Path, record: Path | storage.S3Path) -> str | None:
    if record.name == LOCAL_RECORD:
        names = json.loads(record.read_text())["checkpoints"]
        return names[-1] if names else None
    from ray.train import Result  # Ray's own reader of its record (no cluster needed)

    fs_path, fs = storage.ray_storage(run_dir)  # an S3 run dir: through its S3FileSystem
    latest = Result.from_path(fs_path, storage_filesystem=fs).checkpoint
    return latest.path if latest is not None else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (its latest checkpoint); on S3 (`s3://...`) it is
    checked there and its servable files fetched into the local cache."""
    p = storage.resolve(path) if storage.is_s3(path) else Path(path).expanduser()
    if not p.is_dir():
        raise CheckpointError(f"{p}: checkpoint dir not found")
    why = incomplete(p)
    if why is None:
        return fetch_servable(p) if storage.is_remote(p) else p
    if any((p / f).exists() for f in (*SERVABLE, ADAPTER, FILES, ENGINE_DIR)):  # a checkpoint dir
        raise CheckpointError(f"{p}: an incomplete checkpoint ({why})")
    latest = latest_in_run(p)
    if latest is None:
        raise CheckpointError(
            f"{p}: neither a checkpoint dir nor a run dir with a checkpoint (no {STATE}, "
            f"no {RAY_RECORD} or {LOCAL_RECORD})"
        )
    return fetch_servable(latest) if storage.is_remote(latest) else latest


def fetch_servable(remote: storage.S3Path) -> Path:
    """A local copy of a complete checkpoint's servable files (not its engine state), with
    a FILES listing of them: a complete checkpoint that `load_model` reads."""
    out = storage.cache_dir(remote)
    for name in servable_files(remote):
        storage.download(remote / name, out / name)
    seal(out)
    return out


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """(model, tokenizer, config) from a checkpoint or run dir; weights via safetensors only.
    A LoRA checkpoint gives its base with the adapters added (unmerged). `dtype`: cast the
    weights to it (None: as trained, fp32)."""
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    model = models.build(cfg.model)
    if is_adapter(ckpt):
        from lmforge import lora

        load_weights(model, find_base(ckpt), device)
        lora.add_adapters(model, lora.settings_of(cfg.train.lora))
        lora.load_adapter(model, _read_safetensors(ckpt / ADAPTER, device))
    else:
        load_weights(model, ckpt, device)
    model.to(device, dtype).eval()
    return model, load_tokenizer(ckpt / TOKENIZER), cfg


def load_weights(model: torch.nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """Load a checkpoint's safetensors weights into `model` (names and shapes must match)."""
    weights = _read_safetensors(ckpt / WEIGHTS, device)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in models.of(model).tied(model.cfg)]
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt / WEIGHTS}: does not fit the config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


def _read_safetensors(file: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file), device=str(device))
    except Exception as err:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{file}: not readable safetensors ({err})") from None
