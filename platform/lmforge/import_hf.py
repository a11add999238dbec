"""Import a local Hugging Face model folder as a version of a registered lmforge model.

    lmforge import-hf --input ./gpt2-hf --model gpt2
    lmforge generate --model models:/gpt2/1 --prompt "Hello"
    lmforge train --config jobs/configs/tiny.yaml --init-from models:/gpt2/1

    from lmforge.import_hf import import_hf
    version = import_hf("./gpt2-hf", "gpt2")      # an MLflow ModelVersion

The folder is what transformers' `save_pretrained` writes: `config.json`, the weights as
`model.safetensors` or a sharded `model.safetensors.index.json`, and the tokenizer
(`tokenizer.json`, with `tokenizer_config.json` / `special_tokens_map.json` if present,
kept beside it in the checkpoint: they name the model's own eos and chat template).
Pickled weights (`pytorch_model.bin`) are never loaded. The architecture is the one of
`lmforge.models` whose `hf_architectures` holds config.json's `architectures[0]`; its
`from_hf` maps the config and weights exactly or refuses. Every check runs before anything
is written; then the folder becomes an lmforge checkpoint dir (step 0), logged in one MLflow
run `import-<folder>` and registered like a trained checkpoint. This module does not import
transformers.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lmforge import checkpoint as ckpt_io
from lmforge import models
from lmforge.config import Config, ConfigError, ModelConfig, config_from_dict
from lmforge.errors import LmforgeError, first_line
from lmforge.tokenizer import (
    TOKENIZER,
    TOKENIZER_CONFIG,
    TOKENIZER_EXTRAS,
    configured_eos,
    eot_id,
    load_tokenizer,
)

log = logging.getLogger(__name__)

HF_CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class HfImportError(LmforgeError, ValueError):
    """A Hugging Face folder lmforge cannot import; the message names the file or key."""


@dataclass(frozen=True)
class HfModel:
    """A checked Hugging Face folder, ready to be written as a checkpoint."""

    path: Path
    hf_architecture: str
    model: ModelConfig
    weights: dict[str, torch.Tensor]  # ours (names and layouts of `model.arch`)
    eos_token: str  # the model's end-of-text token

    @property
    def n_params(self) -> int:
        return models.get(self.model.arch).n_params(self.model)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise HfImportError(f"{path}: unreadable ({first_line(err)})") from None
    if not isinstance(raw, dict):
        raise HfImportError(f"{path}: not a JSON object")
    return raw


def supported() -> dict[str, str]:
    """Hugging Face architecture -> the `model.arch` that imports it."""
    out = {}
    for name in models.names():
        out.update(dict.fromkeys(models.get(name).hf_architectures, name))
    return out


def find_arch(path: Path, config: dict[str, Any]) -> tuple[str, models.Architecture]:
    entries = config.get("architectures")
    if not isinstance(entries, list) or not entries:
        raise HfImportError(f"{path / HF_CONFIG}: no `architectures` entry")
    table = supported()
    if entries[0] not in table:
        raise HfImportError(
            f"{path / HF_CONFIG}: architectures={entries[0]!r} is not supported "
            f"(lmforge imports {', '.join(sorted(table))})"
        )
    return entries[0], models.get(table[entries[0]])


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The HF state dict of `model.safetensors` or of the shards its index lists."""
    if (path / WEIGHTS).is_file():
        files = [path / WEIGHTS]
    elif (path / WEIGHTS_INDEX).is_file():
        weight_map = _read_json(path / WEIGHTS_INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise HfImportError(f"{path / WEIGHTS_INDEX}: no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
    elif any((path / name).is_file() for name in PICKLED):
        raise HfImportError(
            f"{path}: only pickled weights (pytorch_model.bin), which lmforge does not load; "
            "convert them to safetensors first (transformers: from_pretrained, then "
            "save_pretrained(..., safe_serialization=True))"
        )
    else:
        raise HfImportError(f"{path}: no weights ({WEIGHTS} or {WEIGHTS_INDEX})")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise HfImportError(f"{f}: missing (listed in {WEIGHTS_INDEX})")
        try:
            weights.update(load_file(str(f)))
        except Exception as err:  # safetensors raises its own SafetensorError
            raise HfImportError(f"{f}: not readable safetensors ({first_line(err)})") from None
    return weights


def check_shapes(path: Path, cfg: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
    """The weights are exactly what the model config.json describes holds (names, shapes)."""
    arch = models.get(cfg.arch)
    with torch.device("meta"):  # shapes only: no memory, no init
        expected = {
            k: tuple(v.shape)
            for k, v in arch.build(cfg).state_dict().items()
            if k not in arch.tied(cfg)
        }
    where = f"{path}: config.json does not match the weights"
    for name, shape in expected.items():
        if name not in weights:
            raise HfImportError(f"{where}: tensor {name} is missing")
        if tuple(weights[name].shape) != shape:
            raise HfImportError(
                f"{where}: tensor {name} has shape {list(weights[name].shape)}, "
                f"config.json makes it {list(shape)}"
            )
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise HfImportError(f"{where}: unexpected tensor {extra[0]} ({len(extra)} in all)")


def read_folder(path: str | Path) -> HfModel:
    """Read and check a Hugging Face folder; nothing is written."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise HfImportError(f"{path}: not a directory")
    if not (path / HF_CONFIG).is_file():
        raise HfImportError(f"{path}: no {HF_CONFIG} (not a Hugging Face model folder)")
    config = _read_json(path / HF_CONFIG)
    hf_architecture, arch = find_arch(path, config)
    if not (path / TOKENIZER).is_file():
        raise HfImportError(
            f"{path}: no {TOKENIZER} (the model's tokenizer is required; a folder "
            "with only a slow tokenizer's vocab files needs its fast tokenizer saved first)"
        )
    tok = load_tokenizer(path / TOKENIZER)  # UsageError names the file
    hf_weights = read_weights(path)
    try:
        fields, weights = arch.from_hf(config, hf_weights)
        cfg = ModelConfig(**fields)
    except ConfigError as err:
        raise HfImportError(f"{path}: {first_line(err)}") from None
    except ValueError as err:  # pydantic's ValidationError: sizes lmforge refuses
        raise HfImportError(f"{path / HF_CONFIG}: {first_line(err)}") from None
    check_shapes(path, cfg, weights)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > cfg.vocab_size:
        raise HfImportError(
            f"{path / TOKENIZER}: {vocab} tokens, more than the model's "
            f"vocab_size={cfg.vocab_size} in {HF_CONFIG}"
        )
    return HfModel(path, hf_architecture, cfg, weights, eos_token(path, config, tok))


def eos_token(path: Path, config: dict[str, Any], tok) -> str:
    """The model's end token: tokenizer_config.json's eos_token, else config.json's
    eos_token_id, else the first of lmforge's END_TOKENS the tokenizer has."""
    configured = configured_eos(path / TOKENIZER_CONFIG)  # load_tokenizer checked it is in tok
    if configured is not None:
        return configured
    eos_id = config.get("eos_token_id")
    if isinstance(eos_id, list):  # Llama 3 instruct lists several; the first is the main one
        eos_id = eos_id[0] if eos_id else None
    if isinstance(eos_id, int):
        token = tok.id_to_token(eos_id)
        if token is None:
            raise HfImportError(f"{path / HF_CONFIG}: eos_token_id={eos_id} is not in {TOKENIZER}")
        return token
    found = eot_id(tok)
    if found is None:
        raise HfImportError(f"{path}: no end-of-text token (no eos_token, no eos_token_id)")
    return tok.id_to_token(found)


def write_checkpoint(hf: HfModel, out: Path, model_name: str) -> Config:
    """`hf` as a sealed lmforge checkpoint dir at `out` (step 0); its config."""
    cfg = config_from_dict(
        {"model": hf.model.model_dump(), "tracking": {"registered_model": model_name}}
    )
    state = ckpt_io.TrainerState(step=0, tokens_seen=0, world_size=1)
    ckpt_io.save_servable(out, hf.weights, cfg, hf.path / TOKENIZER, state)
    for name in TOKENIZER_EXTRAS:  # kept beside tokenizer.json
        if (hf.path / name).is_file():
            shutil.copyfile(hf.path / name, out / name)
    # The eos the checkpoint's tokenizer ends documents and generation with (load_tokenizer
    # reads it): written down when only config.json's eos_token_id said it.
    tc = _read_json(out / TOKENIZER_CONFIG) if (out / TOKENIZER_CONFIG).is_file() else {}
    if tc.get("eos_token") is None:
        tc["eos_token"] = hf.eos_token
        (out / TOKENIZER_CONFIG).write_text(json.dumps(tc, indent=2) + "\n")
    ckpt_io.seal(out)
    return cfg


def import_hf(
    path: str | Path,
    model_name: str,
    tracking_uri: str | None = None,
    experiment: str | None = None,
):
    """Import a Hugging Face folder as a new version of `model_name`; the ModelVersion.

    One MLflow run `import-<folder>` in `experiment` (default: `model_name`) holds the
    config as params and the checkpoint as the version's pyfunc model.
    """
    from lmforge.tracking import registry, store
    from lmforge.tracking.tracker import flatten

    if not re.fullmatch(registry.NAME_PATTERN, model_name):
        raise HfImportError(f"--model {model_name!r}: use letters, digits, _ . - only")
    hf = read_folder(path)  # every check, before anything is written
    uri = store.resolve_uri(tracking_uri)
    client = store.client(uri)
    exp_id = store.ensure_experiment(client, experiment or model_name, uri)
    with tempfile.TemporaryDirectory(prefix="lmforge-import-") as tmp:
        out = Path(tmp) / registry.ARTIFACT
        cfg = write_checkpoint(hf, out, model_name)
        arch = hf.model.arch
        tags = {"source": str(hf.path), "arch": arch, "n_params": str(hf.n_params),
                "hf_architecture": hf.hf_architecture}  # fmt: skip
        run = client.create_run(
            exp_id,
            run_name=f"import-{hf.path.name}",
            tags={f"lmforge.{k}": v for k, v in tags.items()},
        )
        run_id, status = run.info.run_id, "FAILED"
        try:
            from mlflow.entities import Param

            params = [Param(k, v[:6000]) for k, v in flatten(cfg.to_dict()).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                client.log_batch(run_id, params=params[i : i + 100])
            with registry.fluent_uri(uri):  # register_checkpoint uses the fluent API
                version = registry.register_checkpoint(
                    client, run_id, out, model_name,
                    {"step": "0", "tokens_seen": "0", "run_id": run_id, **tags},
                    f"Imported from the Hugging Face folder {hf.path} ({hf.hf_architecture}, "
                    f"{hf.n_params:,} parameters). Fine-tune it with "
                    f"`lmforge train --init-from models:/{model_name}/VERSION`.",
                )  # fmt: skip
            status = "FINISHED"
        finally:
            client.set_terminated(run_id, status)
    log.info("imported %s as models:/%s/%s", hf.path, model_name, version.version)
    return version
