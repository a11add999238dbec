"""Export a checkpoint as a Hugging Face GPT-2 folder (`GPT2LMHeadModel` + fast tokenizer).

    from lmforge.export_hf import export_hf
    export_hf("~/.lmforge/runs/tiny", "exports/tiny-hf")   # a run dir means its latest checkpoint

    # then, anywhere with `transformers` installed (offline is fine):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exports/tiny-hf")
    tok = AutoTokenizer.from_pretrained("exports/tiny-hf")

Our model is GPT-2 layer for layer, so the export is a renaming plus one transpose:

    ours                          Hugging Face
    wte.weight, wpe.weight        transformer.wte.weight, transformer.wpe.weight
    h.{i}.ln_1 / ln_2 / ln_f      transformer.h.{i}.ln_1 / ln_2, transformer.ln_f
    h.{i}.attn.c_attn.weight      transformer.h.{i}.attn.c_attn.weight, transposed
    h.{i}.attn.c_proj.weight      transformer.h.{i}.attn.c_proj.weight, transposed
    h.{i}.mlp.c_fc / c_proj       transformer.h.{i}.mlp.c_fc / c_proj weights, transposed
    lm_head.weight                not written: tied to wte (tie_word_embeddings)

HF GPT-2 keeps OpenAI's `Conv1D`, whose weight is (in, out) where `nn.Linear`'s is
(out, in); biases are unchanged. Both split the fused c_attn output into q, k, v in that
order, so no reordering is needed. The tokenizer's `tokenizer.json` is copied as is and
declared a `PreTrainedTokenizerFast`: naming GPT2Tokenizer would let transformers 5 rebuild
it from vocab and merges instead of using our file.

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

from lmforge.checkpoint import TOKENIZER, load_model, resolve_checkpoint
from lmforge.errors import UsageError
from lmforge.model import GPT
from lmforge.tokenizer import EOT, eot_id

# Weights stored by HF's Conv1D as (in, out): ours are nn.Linear (out, in).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under HF GPT-2 names and layouts (fp32, contiguous, lm_head left tied)."""
    out = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        if name.endswith(TRANSPOSED):
            t = t.t()
        out[f"transformer.{name}"] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def hf_config(model: GPT, eot: int) -> dict:
    """`config.json` of the equivalent `GPT2LMHeadModel`."""
    m = model.cfg
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": m.vocab_size,
        "n_positions": m.context_length,
        "n_ctx": m.context_length,
        "n_embd": m.d_model,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": None,  # 4 * n_embd, as ours
        "activation_function": "gelu_new",  # the tanh GELU
        "layer_norm_epsilon": model.ln_f.eps,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1/sqrt(head_dim), as scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }


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


def export_hf(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> Path:
    """Write a checkpoint (or a run dir's latest) as a Hugging Face GPT-2 folder; returns it.

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
    eot = eot_id(tok)

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed export of this pid
    tmp.mkdir(parents=True)
    try:
        save_file(hf_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        files = {
            "config.json": hf_config(model, eot),
            "generation_config.json": {"bos_token_id": eot, "eos_token_id": eot},
            **tokenizer_files(EOT, cfg.model.context_length),
        }
        for name, content in files.items():
            (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
        shutil.copyfile(ckpt / TOKENIZER, tmp / "tokenizer.json")
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
