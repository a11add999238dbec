"""Export a checkpoint as a Hugging Face transformers folder (model + fast tokenizer).

    from lmforge.export_hf import export_hf
    export_hf("~/.lmforge/runs/tiny", "exports/tiny-hf")   # a run dir means its latest checkpoint

    # then, anywhere with `transformers` installed (offline is fine):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exports/tiny-hf")
    tok = AutoTokenizer.from_pretrained("exports/tiny-hf")

The architecture (`lmforge.models`, `model.arch`) gives the mapping: its weights under
transformers' names and layouts (`hf_state_dict`) and the `config.json` of the equivalent
transformers model (`hf_config`); this module writes the folder. For gpt2 that is a
renaming plus a transpose (see `lmforge/models/gpt2.py`). The tokenizer's `tokenizer.json`
is copied as is and declared a `PreTrainedTokenizerFast`: naming GPT2Tokenizer would let
transformers 5 rebuild it from vocab and merges instead of using our file.

A LoRA checkpoint (`train.lora`) exports two ways: `merge=True` folds the adapters into
the base (`lora.merged_state_dict`) and writes the same plain folder; without it, a peft
adapter folder (`adapter_config.json` + `adapter_model.safetensors`, the adapters under
transformers' module names) that `peft.PeftModel.from_pretrained(<the HF base>, folder)`
loads on the base exported (or imported) as a Hugging Face folder.

This module does not import transformers (a test-only dependency): it writes the JSON
files the way `save_pretrained` would.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge import lora, models
from lmforge.checkpoint import is_adapter, load_model, read_base, resolve_checkpoint
from lmforge.errors import UsageError
from lmforge.tokenizer import TOKENIZER, eot_id, eot_token


def tokenizer_files(eot_text: str, context_length: int) -> dict[str, dict]:
    """`tokenizer_config.json` and `special_tokens_map.json` beside our `tokenizer.json`."""
    special = {"bos_token": eot_text, "eos_token": eot_text, "unk_token": eot_text}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def export_hf(
    checkpoint: str | Path, output: str | Path, overwrite: bool = False, merge: bool = False
) -> Path:
    """Write a checkpoint (or a run dir's latest) as a Hugging Face folder; returns it.
    A LoRA checkpoint: merged into its base with `merge`, else a peft adapter folder.

    Written into a temp dir beside `output` and renamed into place, so a failed export
    leaves nothing half-written. An existing non-empty `output` is refused unless `overwrite`.
    """
    out = Path(output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out}: output dir is not empty; pass overwrite=True to replace it")
    ckpt = resolve_checkpoint(checkpoint)
    model, tok, cfg = load_model(ckpt)  # CheckpointError names the file that is wrong
    arch = models.get(cfg.model.arch)
    if arch.hf_state_dict is None or arch.hf_config is None:
        raise UsageError(f"{ckpt}: model.arch={arch.name} has no Hugging Face equivalent")
    eot = eot_id(tok)
    adapted = is_adapter(ckpt)
    if merge and not adapted:
        raise UsageError(f"--merge: {ckpt} is not a LoRA checkpoint (it has no adapters)")

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed export of this pid
    tmp.mkdir(parents=True)
    try:
        if adapted and not merge:
            files = write_peft_adapter(tmp, arch, cfg, model, read_base(ckpt).uri)
        else:
            state = lora.merged_state_dict(model) if adapted else model.state_dict()
            weights = arch.hf_state_dict(cfg.model, state)
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            files = {
                "config.json": arch.hf_config(cfg.model, eot),
                "generation_config.json": {"bos_token_id": eot, "eos_token_id": eot},
            }
        files.update(tokenizer_files(eot_token(tok), cfg.model.context_length))
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        shutil.copyfile(ckpt / TOKENIZER, tmp / TOKENIZER)
        if out.exists():  # move the old export aside first, so `out` is never half-written
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_peft_adapter(out: Path, arch, cfg, model, base_uri: str) -> dict[str, dict]:
    """The adapters of `model` as peft saves them for the transformers model `arch` maps
    to: `adapter_model.safetensors` written; `adapter_config.json` returned (to write).

    The architecture's `hf_state_dict` renames (and for gpt2's Conv1D layers transposes)
    weights; a probe weight per adapted layer finds its transformers name, and a transposed
    probe means a Conv1D (peft's `fan_in_fan_out`). LoRA's A and B keep their shapes.
    """
    adapters = lora.adapter_state_dict(model)
    layers = sorted({k.split(".lora_")[0] for k in adapters})
    hf_name, transposed = {}, False
    for layer in layers:
        probe = arch.hf_state_dict(cfg.model, {f"{layer}.weight": torch.zeros(2, 3)})
        ((key, t),) = probe.items()
        hf_name[layer] = key.removesuffix(".weight")
        transposed = transposed or tuple(t.shape) == (3, 2)
    weights = {}
    for k, v in adapters.items():
        layer, rest = k.split(".lora_")
        weights[f"base_model.model.{hf_name[layer]}.lora_{rest}"] = v.float().contiguous()
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    settings = cfg.train.lora
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_uri,
        "r": settings.r,
        "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in hf_name.values()}),
        "bias": "none",
        "fan_in_fan_out": transposed,
        "inference_mode": True,
    }
    return {"adapter_config.json": config}
