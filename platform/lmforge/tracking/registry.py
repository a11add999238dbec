"""Checkpoints as versions of a registered model, and model URIs back to checkpoints.

A version is logged as a pyfunc model (see `pyfunc_model.py`) whose artifact `checkpoint`
holds the servable files of the checkpoint; its tags say where it came from:

    step, tokens_seen, val_loss, run_id, ray_checkpoint_uri, run_dir, dataset_manifest_sha256,
    parent (a fine-tune's --init-from)
    base_version, adapter (a LoRA version: its base's version URI or folder, and "lora")

A LoRA version holds only its adapters (`checkpoint.ADAPTER`) and `base.json`;
`fetch_checkpoint` fetches its base too (when that is a version) into `base/` beside them,
so `checkpoint.load_model` finds base + adapter on any machine that reaches the registry.

Aliases: `best` is the version with the lowest val loss; `latest` is the newest version
(MLflow reserves that alias and resolves `models:/NAME/latest` itself; lmforge accepts
`models:/NAME@latest` too).
`fetch_checkpoint("models:/NAME@best")` downloads a version once into the local cache and
returns its checkpoint dir, which `checkpoint.load_model` reads like any other.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import checkpoint as ckpt_io
from lmforge import paths
from lmforge.errors import LmforgeError
from lmforge.tracking import store

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name inside its run
ARTIFACT = "checkpoint"  # the pyfunc artifact holding the servable files
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_URI = re.compile(
    rf"^models:/(?P<name>{NAME_PATTERN})(?:@(?P<alias>[\w-]+)|/(?P<version>\d+|latest))$"
)


class RegistryError(LmforgeError, ValueError):
    """A model URI that does not resolve; the message names it."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return (
            f"models:/{self.name}@{self.alias}"
            if self.alias
            else f"models:/{self.name}/{self.version}"
        )


def parse_model_uri(uri: str) -> ModelRef:
    m = _URI.match(uri.strip())
    if m is None:
        raise RegistryError(
            f"{uri!r}: expected models:/NAME@ALIAS (e.g. models:/tiny@best) or models:/NAME/VERSION"
        )
    if m["version"] == "latest":  # MLflow's own spelling of the newest version
        return ModelRef(m["name"], alias="latest")
    return ModelRef(m["name"], m["version"], m["alias"])


def is_model_uri(text: str) -> bool:
    return str(text).startswith("models:/")


def _requirements() -> list[str]:
    """What loading the pyfunc needs, pinned to the versions that logged it."""
    pins = []
    for dist in ("mlflow", "torch", "tokenizers", "safetensors", "numpy", "pyyaml", "pydantic"):
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def stage_servable(checkpoint: Path, into: Path) -> Path:
    """Hard-link (or copy) the servable files of a checkpoint into `into/checkpoint`, with
    a `files.json` that lists them (so the registered copy is a complete checkpoint).

    The registration runs in the background after the checkpoint is persisted; staging
    first means Ray's `num_to_keep` may delete the run's copy meanwhile without harm, and
    the DeepSpeed optimizer state (large, only for resuming) stays out of the registry.
    """
    out = into / ARTIFACT
    out.mkdir(parents=True)
    for name in ckpt_io.servable_files(checkpoint):
        try:
            (out / name).hardlink_to(checkpoint / name)
        except OSError:
            shutil.copyfile(checkpoint / name, out / name)
    ckpt_io.seal(out)  # its own list of files: the servable ones
    return out


def register_checkpoint(
    client,
    run_id: str,
    staged: Path,
    model_name: str,
    tags: dict[str, str],
    description: str,
    progress: dict[str, Any] | None = None,
):
    """Log `staged` (from `stage_servable`) as a pyfunc in the run and register a version.

    A checkpoint (run id and step) that has a version already keeps it: nothing is logged,
    and `progress["created"]` stays unset. Safe to call again after a failure with the same
    `progress` dict: steps already done (the logged model, the version) are not repeated,
    so a retry never makes a second version of one checkpoint. Uses MLflow's fluent API,
    whose active run is per thread; call it inside `fluent_uri(<the client's URI>)`.
    """
    import mlflow

    progress = {} if progress is None else progress
    if "version" not in progress:
        existing = find_version(client, model_name, run_id, tags["step"])
        if existing is not None:  # a retry, or a checkpoint registered before a restart
            progress["version"] = existing.version
        else:
            if "model_uri" not in progress:
                progress["model_uri"] = _log_model(run_id, staged, tags)
            with _quiet_prints():
                version = mlflow.register_model(progress["model_uri"], model_name, tags=tags)
            progress["version"], progress["created"] = version.version, True
    client.update_model_version(model_name, progress["version"], description=description)
    update_aliases(client, model_name)
    return client.get_model_version(model_name, progress["version"])


def find_version(client, model_name: str, run_id: str, step: str | int):
    """The version registered for the checkpoint of `step` in MLflow run `run_id`, if any."""
    for v in client.search_model_versions(f"name='{model_name}' and run_id='{run_id}'"):
        if v.tags.get("step") == str(step):
            return v
    return None


@contextlib.contextmanager
def fluent_uri(uri: str):
    """MLflow's fluent API (`log_model`, `register_model`) on `uri` for the block.

    `mlflow.set_tracking_uri` also sets MLFLOW_TRACKING_URI (and set_registry_uri
    MLFLOW_REGISTRY_URI) in this process's environment, which lmforge reads to choose a
    store: left set, a one-off registration (import-hf, from the CLI, a test or the
    dashboard) would redirect everything after it. Both come back as they were.
    """
    import os

    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {k: os.environ.get(k) for k in keys}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])  # None unsets it again
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)


def _log_model(run_id: str, staged: Path, tags: dict[str, str]) -> str:
    """Log `staged` as a pyfunc model in the run; its model URI."""
    import mlflow

    import lmforge

    with (
        mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None),
        warnings.catch_warnings(),
    ):
        # MLflow's advice on input examples (one would make it load the model and generate
        # while logging) and type hints (the signature is explicit): not for this model.
        warnings.simplefilter("ignore", UserWarning)
        from lmforge.tracking import pyfunc_entry
        from lmforge.tracking.pyfunc_model import signature

        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=pyfunc_entry.__file__,  # a model from code: nothing pickled
            artifacts={ARTIFACT: str(staged)},
            code_paths=[str(Path(lmforge.__file__).parent)],
            signature=signature(),
            pip_requirements=_requirements(),
            step=int(tags.get("step", 0)),
        )
    return info.model_uri


class _ThreadQuietStream:
    """MLflow's event stream, muted in the threads that ask (`_quiet_prints`)."""

    def __init__(self, stream) -> None:
        import threading

        self.stream, self.muted = stream, threading.local()

    def write(self, text: str):
        return None if getattr(self.muted, "on", False) else self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextlib.contextmanager
def _quiet_prints():
    """Mute what MLflow `eprint`s in this thread during the block, nothing else.

    `mlflow.register_model` prints "Registered model 'X' already exists. Creating a new
    version of this model..." and "Created version 'N'" for every checkpoint
    (mlflow/tracking/_model_registry/fluent.py `_register_model`), through
    `mlflow.utils.logging_utils.eprint`, a print to that module's MLFLOW_LOGGING_STREAM,
    not a logger; lmforge logs "registered models:/X/N" itself. MLflow's warnings and
    errors (loggers) and other threads' output pass.
    """
    from mlflow.utils import logging_utils

    stream = getattr(logging_utils, "MLFLOW_LOGGING_STREAM", None)
    if stream is None:  # another MLflow layout: print as it does
        yield
        return
    if not isinstance(stream, _ThreadQuietStream):
        stream = logging_utils.MLFLOW_LOGGING_STREAM = _ThreadQuietStream(stream)
    stream.muted.on = True
    try:
        yield
    finally:
        stream.muted.on = False


SELECT_TAG = "lmforge.best_by"  # on a registered model: "<version tag>:min|max"


def selection_tag(select: str | None) -> str:
    """The version tag `best` follows for an `eval.select` value: `val_loss` (or None) as
    is, an evaluation score `<task>/<metric>` as its tag `eval.<task>.<metric>`."""
    if not select or select == "val_loss":
        return "val_loss"
    task, _, metric = select.partition("/")
    return f"eval.{task}.{metric}"


def best_by(client, model_name: str) -> tuple[str, str]:
    """(version tag, "min" | "max") that `best` follows: the registered model's
    `lmforge.best_by` tag (`eval.select` of its runs), else the lowest val_loss."""
    try:
        tags = client.get_registered_model(model_name).tags or {}
    except Exception:  # noqa: BLE001 - a model not created yet: the default
        tags = {}
    tag, _, mode = tags.get(SELECT_TAG, "val_loss:min").rpartition(":")
    return (tag, mode) if mode in ("min", "max") else ("val_loss", "min")


def update_aliases(client, model_name: str) -> None:
    """`best` -> the version with the best value of the tag `best_by` names (by default the
    lowest val_loss; ties: the newer). While no version carries that tag yet (its
    evaluation has not finished), the lowest val_loss.

    `latest` needs no alias: MLflow reserves that name and resolves `models:/NAME/latest`
    to the newest version itself; lmforge reads `models:/NAME@latest` the same way.
    """
    versions = client.search_model_versions(f"name='{model_name}'")
    tag, mode = best_by(client, model_name)
    if not any(tag in v.tags for v in versions):
        tag, mode = "val_loss", "min"
    sign = 1.0 if mode == "min" else -1.0
    best, best_value = None, math.inf
    for v in versions:
        try:
            value = sign * float(v.tags.get(tag, "nan"))
        except ValueError:
            continue
        if math.isnan(value):
            continue
        if value < best_value or (value == best_value and int(v.version) > int(best or 0)):
            best, best_value = v.version, value
    if best is not None:
        client.set_registered_model_alias(model_name, "best", best)


def newest_version(client, model_name: str) -> str:
    versions = [int(v.version) for v in client.search_model_versions(f"name='{model_name}'")]
    if not versions:
        raise RegistryError(f"models:/{model_name}: the registered model has no versions")
    return str(max(versions))


def get_version(ref: ModelRef | str, tracking_uri: str | None = None):
    """The MLflow ModelVersion a URI names."""
    from mlflow.exceptions import MlflowException

    ref = parse_model_uri(ref) if isinstance(ref, str) else ref
    uri = store.resolve_uri(tracking_uri)
    c = store.client(uri)
    try:
        if (ref.alias or "").lower() == "latest":
            return c.get_model_version(ref.name, newest_version(c, ref.name))
        if ref.alias:
            return c.get_model_version_by_alias(ref.name, ref.alias)
        return c.get_model_version(ref.name, ref.version)
    except MlflowException as err:
        raise RegistryError(f"{ref}: not found in the registry at {uri} ({err.message})") from None


def fetch_checkpoint(model_uri: str, tracking_uri: str | None = None) -> Path:
    """The local checkpoint dir of a registered version (downloaded once, then cached)."""
    import mlflow.artifacts

    version = get_version(model_uri, tracking_uri)
    uri = store.resolve_uri(tracking_uri)
    key = hashlib.sha256(uri.encode()).hexdigest()[:12]
    cache = paths.home() / "cache" / "models" / key / version.name / str(version.version)
    if ckpt_io.is_complete(cache / ARTIFACT):
        return cache / ARTIFACT
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache.parent))
    try:
        # The version's own storage location (the logged model's folder): resolving
        # models:/ again would consult the process's default registry, not `uri`.
        source = store.client(uri).get_model_version_download_uri(version.name, version.version)
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"{source.rstrip('/')}/artifacts/{ARTIFACT}",  # pyfunc keeps its artifacts there
            dst_path=str(tmp),
            tracking_uri=uri,
        )
        if not ckpt_io.is_complete(tmp / ARTIFACT):
            raise RegistryError(
                f"{model_uri}: version {version.version} holds no complete lmforge checkpoint"
            )
        if ckpt_io.is_adapter(tmp / ARTIFACT):
            _fetch_base(tmp / ARTIFACT, tracking_uri)
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)  # atomic: a cache dir is always complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("fetched %s (version %s) into %s", model_uri, version.version, cache)
    return cache / ARTIFACT


def _fetch_base(adapter: Path, tracking_uri: str | None) -> None:
    """Copy a LoRA version's base (a version: fetched first) into `adapter/base`."""
    ref = ckpt_io.read_base(adapter)
    if not is_model_uri(ref.uri):
        return  # a folder: `checkpoint.find_base` reads it where it is
    base = fetch_checkpoint(ref.uri, tracking_uri)
    if ckpt_io.weights_sha256(base) != ref.sha256:
        raise RegistryError(
            f"{ref.uri}: its weights are not the ones the adapter {adapter} was trained on "
            f"(sha256 {ref.sha256[:12]}); did the alias move? name the base's version number"
        )
    out = adapter / ckpt_io.BASE_DIR
    out.mkdir()
    for name in [*ckpt_io.servable_files(base), ckpt_io.FILES]:
        try:
            (out / name).hardlink_to(base / name)
        except OSError:
            shutil.copyfile(base / name, out / name)


def version_tags(state: ckpt_io.TrainerState, run_id: str, checkpoint: Path) -> dict[str, str]:
    tags = {
        "step": str(state.step),
        "tokens_seen": str(state.tokens_seen),
        "run_id": run_id,
        "ray_checkpoint_uri": str(checkpoint),
        "run_dir": str(checkpoint.parent),
    }
    if state.dataset is not None:
        tags["dataset_manifest_sha256"] = state.dataset.manifest_sha256
    if state.val_loss is not None:
        tags["val_loss"] = f"{state.val_loss:.6f}"
    # A fine-tune's run dir says what it started from (training.plan.stage_init writes it).
    init_source = checkpoint.parent / "init_from" / "SOURCE"
    if init_source.is_file():
        tags["parent"] = init_source.read_text().strip()
    # A preference run (lmforge.preference.objective writes it): objective, reference.
    preference = checkpoint.parent / "preference.json"
    if preference.is_file():
        about = json.loads(preference.read_text())
        tags.update({k: about[k] for k in ("objective", "parent", "reference") if k in about})
    if (checkpoint / ckpt_io.BASE).is_file():  # a LoRA version: small, on its base
        tags["base_version"] = ckpt_io.read_base(checkpoint).uri
        tags["adapter"] = "lora"
    return tags


def describe_version(state: ckpt_io.TrainerState, checkpoint: Path) -> str:
    val = f"val loss {state.val_loss:.4f}, " if state.val_loss is not None else ""
    return (
        f"Step {state.step} of run {checkpoint.parent.name}: {val}"
        f"{state.tokens_seen:,} tokens seen. Resume with "
        f"`lmforge train --resume {checkpoint.parent}`."
    )


def log_evaluation(
    model_uri: str, tracking_uri: str | None, data: str, metrics: dict[str, float]
) -> str:
    """Log `lmforge evaluate` figures to the run of the version they are about."""
    version = get_version(model_uri, tracking_uri)
    c = store.client(store.resolve_uri(tracking_uri))
    step = int(version.tags.get("step", 0))
    for key in ("val_loss", "val_perplexity"):
        c.log_metric(version.run_id, f"evaluate.{key}", metrics[key], step=step)
    c.set_model_version_tag(
        version.name, version.version, "evaluate.val_loss", f"{metrics['val_loss']:.6f}"
    )
    c.set_model_version_tag(version.name, version.version, "evaluate.data", str(data))
    return version.run_id
