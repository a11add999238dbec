"""A LoRA checkpoint on an imported Hugging Face base: lmforge loads base + adapter, and
both exports give the same logits in transformers' own classes: `merge=True` as a plain
GPT2LMHeadModel / LlamaForCausalLM, without it as a peft adapter on the HF base."""

from __future__ import annotations

import pytest
import torch

from lmforge import lora
from lmforge.checkpoint import (
    BaseRef,
    CheckpointError,
    TrainerState,
    load_model,
    read_config,
    save_adapter,
    seal,
    weights_sha256,
)
from lmforge.config import LoraConfig
from lmforge.errors import UsageError
from lmforge.export_hf import export_hf
from lmforge.import_hf import read_folder, write_checkpoint
from lmforge.tokenizer import EOT, train_tokenizer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind"] * 4


def hf_base(arch: str, folder, vocab: int, eos: int):
    if arch == "gpt2":
        cls, cfg = transformers.GPT2LMHeadModel, transformers.GPT2Config(
            vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
            bos_token_id=eos, eos_token_id=eos,
        )  # fmt: skip
    else:
        cls, cfg = transformers.LlamaForCausalLM, transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
            tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos,
        )  # fmt: skip
    torch.manual_seed(0)
    cls(cfg).save_pretrained(folder)
    return cls


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def adapter_checkpoint(base, out):
    """A LoRA checkpoint on `base` with random (non-zero) adapters, as a run saves one."""
    cfg = read_config(base)
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"lora": LoraConfig(r=4, alpha=8)})}
    )
    model, _, _ = load_model(base)
    lora.add_adapters(model, lora.settings_of(cfg.train.lora))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)  # peft starts B at zero: the adapter would change nothing
    ref = BaseRef(str(base), str(base), weights_sha256(base))
    save_adapter(out, lora.adapter_state_dict(model), cfg, base / "tokenizer.json",
                 TrainerState(1), ref)  # fmt: skip
    seal(out)
    return out


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_and_peft_exports_give_base_plus_adapter_logits(arch, tmp_path, offline):
    tok = train_tokenizer(TEXT, vocab_size=300)
    folder = tmp_path / "hf-base"
    cls = hf_base(arch, folder, tok.get_vocab_size(), tok.token_to_id(EOT))
    tok.save(str(folder / "tokenizer.json"))
    base = tmp_path / "base"
    write_checkpoint(read_folder(folder), base, "base")  # what `lmforge import-hf` writes
    ckpt = adapter_checkpoint(base, tmp_path / "adapter")
    assert not (ckpt / "model.safetensors").exists()

    x = torch.randint(0, tok.get_vocab_size(), (2, 24), generator=torch.Generator().manual_seed(2))
    model, _, _ = load_model(ckpt)  # base + adapter
    plain, _, _ = load_model(base)
    with torch.no_grad():
        ours, before = model(x)[0], plain(x)[0]
    assert (ours - before).abs().max() > 1e-2  # the adapter changes the logits

    merged = cls.from_pretrained(export_hf(ckpt, tmp_path / "merged", merge=True)).eval()
    adapter_dir = export_hf(ckpt, tmp_path / "peft")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in adapter_dir.iterdir()
    }
    on_base = peft.PeftModel.from_pretrained(cls.from_pretrained(folder), adapter_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, ours, atol=1e-5, rtol=0)
        torch.testing.assert_close(on_base(x).logits, ours, atol=1e-5, rtol=0)


def test_an_adapter_whose_base_changed_is_refused(tmp_path):
    tok = train_tokenizer(TEXT, vocab_size=300)
    folder = tmp_path / "hf-base"
    hf_base("gpt2", folder, tok.get_vocab_size(), tok.token_to_id(EOT))
    tok.save(str(folder / "tokenizer.json"))
    base = tmp_path / "base"
    write_checkpoint(read_folder(folder), base, "base")
    ckpt = adapter_checkpoint(base, tmp_path / "adapter")
    with pytest.raises(UsageError, match="not a LoRA checkpoint"):
        export_hf(base, tmp_path / "x", merge=True)
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[:-4] + bytes(4))  # other weights, same size
    with pytest.raises(CheckpointError, match="its base .* is not at"):
        load_model(ckpt)
