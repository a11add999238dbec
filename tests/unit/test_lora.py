"""LoRA through peft on lmforge's own models: a frozen base, small adapters, exact merges."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lmforge import lora, models
from lmforge.config import ModelConfig
from lmforge.errors import UsageError

SHAPES = {
    "gpt2": {},
    "llama": {"n_kv_head": 2},
}


def build(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=4, d_model=128, context_length=32,
                      vocab_size=96, **SHAPES[arch])  # fmt: skip
    return models.build(cfg)


def train_a_little(model, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        _, loss = model(data[:, :-1], targets=data[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_training_moves_only_the_adapters(arch, tmp_path):
    model = build(arch)
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_adapters(model, lora.LoraSettings(r=4, alpha=8))
    trainable, total = lora.parameter_counts(model)
    assert 0 < trainable < 0.1 * total
    model.train()
    train_a_little(model)
    base_after = lora.base_state_dict(model)
    assert base_after.keys() == base_before.keys()
    for k, v in base_before.items():
        assert torch.equal(base_after[k], v), k  # bit-identical
    adapter = lora.adapter_state_dict(model)
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it learned
    save_file(adapter, tmp_path / "adapter.safetensors")
    save_file({k: v.contiguous() for k, v in base_before.items()
               if k != "lm_head.weight" or arch == "llama"}, tmp_path / "base.safetensors")  # fmt: skip
    ratio = (tmp_path / "adapter.safetensors").stat().st_size / (
        tmp_path / "base.safetensors"
    ).stat().st_size
    assert ratio < 0.05, ratio


@pytest.mark.parametrize("arch", sorted(SHAPES))
def test_merged_weights_give_the_adapted_models_logits(arch):
    model = build(arch)
    lora.add_adapters(model, lora.LoraSettings(r=4, alpha=8))
    model.train()
    train_a_little(model)
    model.eval()
    idx = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, _ = model(idx)
    plain = build(arch).eval()
    plain.load_state_dict(lora.merged_state_dict(model))
    with torch.no_grad():
        got, _ = plain(idx)
    assert (got - want).abs().max().item() < 1e-5


def test_an_adapter_reloads_into_a_fresh_base():
    model = build("llama")
    settings = lora.LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    lora.add_adapters(model, settings)
    model.train()
    train_a_little(model)
    model.eval()
    again = lora.add_adapters(build("llama"), settings).eval()
    lora.load_adapter(again, lora.adapter_state_dict(model))
    idx = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], again(idx)[0])
    other = lora.add_adapters(build("llama"), lora.LoraSettings(r=4, target_modules=("o_proj",)))
    with pytest.raises(UsageError, match="the adapter does not fit this model"):
        lora.load_adapter(other, lora.adapter_state_dict(model))


def test_targets_are_checked():
    gpt2 = build("gpt2")
    assert lora.targets(gpt2, lora.LoraSettings()) == ["c_attn", "c_fc", "c_proj"]
    with pytest.raises(UsageError, match=r"\['q_proj'\] are not linear layers.*c_attn"):
        lora.targets(gpt2, lora.LoraSettings(target_modules=("q_proj",)))
    torch.manual_seed(0)
    lstm = models.build(ModelConfig(arch="lstm", n_layer=1, d_model=32, context_length=16,
                                    vocab_size=50))  # fmt: skip
    with pytest.raises(UsageError, match="lstm has no linear layers to adapt besides lm_head"):
        lora.add_adapters(lstm, lora.LoraSettings())
