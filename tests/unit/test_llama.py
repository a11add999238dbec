"""model.arch=llama: exact against transformers' LlamaForCausalLM both ways, its KV cache,
its counts, and its checkpoints. The transformers models are small random ones built by
transformers' own classes (fp32); nothing is downloaded."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge import models
from lmforge.checkpoint import TrainerState, load_model, save_servable, seal
from lmforge.config import Config, ConfigError, ModelConfig, load_config
from lmforge.export_hf import export_hf
from lmforge.generation import SamplingParams, generate_tokens
from lmforge.tokenizer import train_tokenizer
from tests.conftest import REPO

transformers = pytest.importorskip("transformers")

ARCH = models.get("llama")
V, CTX = 97, 96
SHAPES = [
    {"n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "ffn_hidden": 80},
    {"n_layer": 3, "n_head": 6, "n_kv_head": 1, "d_model": 48, "tie_embeddings": False},
    {"n_layer": 1, "n_head": 2, "d_model": 16, "rope_theta": 500000.0, "norm_eps": 1e-6},
]


def llama_cfg(**kw) -> ModelConfig:
    base = {"arch": "llama", "vocab_size": V, "context_length": CTX}
    return ModelConfig(**(base | kw))


def ours(**kw):
    torch.manual_seed(0)
    return models.build(llama_cfg(**kw)).eval()


def hf_model(tie=False, **kw):
    """A random LlamaForCausalLM with n_kv_head < n_head (its own init; norms perturbed too)."""
    c = {
        "vocab_size": V,
        "hidden_size": 32,
        "intermediate_size": 72,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": CTX,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tie,
        "bos_token_id": 0,
        "eos_token_id": 0,
    } | kw
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**c)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # ones by default: make a wrong gain mapping visible
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(10)  # 0.02-scale weights give near-uniform logits; sharpen them
    return model


def saved_config(model, tmp_path) -> dict:
    """config.json exactly as save_pretrained writes it."""
    model.save_pretrained(tmp_path / "hf")
    return json.loads((tmp_path / "hf" / "config.json").read_text())


def imported(hf, tmp_path):
    fields, weights = ARCH.from_hf(saved_config(hf, tmp_path), hf.state_dict())
    model = models.build(ModelConfig(**fields)).eval()
    model.load_state_dict(weights, strict=not ModelConfig(**fields).tie_embeddings)
    return model, fields


def ids(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [False, True])
def test_imported_model_gives_transformers_logits(tie, tmp_path):
    hf = hf_model(tie=tie)
    model, fields = imported(hf, tmp_path)
    assert fields | {"vocab_size": V} == {
        "arch": "llama", "vocab_size": V, "context_length": CTX, "n_layer": 2, "n_head": 4,
        "d_model": 32, "n_kv_head": 2, "ffn_hidden": 72, "rope_theta": 500000.0,
        "norm_eps": 1e-5, "tie_embeddings": tie,
    }  # fmt: skip
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    x = torch.randint(0, V, (2, CTX), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = hf(x).logits
        mine, _ = model(x)
    assert theirs.abs().max() > 1  # not near-uniform: a mapping error would show
    assert (mine - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("prompt_len", [5, 60])  # 60 > CTX / 2; 60 + 30 fits the context
def test_30_greedy_tokens_equal_transformers_generate(prompt_len, tmp_path):
    hf = hf_model()
    model, _ = imported(hf, tmp_path)
    prompt = ids(prompt_len)
    with torch.no_grad():
        # An explicit mask: else generate takes every pad_token_id in the prompt for padding.
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                             do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    theirs = theirs[0, prompt_len:].tolist()
    mine = list(generate_tokens(model, prompt[0].tolist(), SamplingParams(30, temperature=0)))
    assert len(theirs) == 30 and mine == theirs
    assert len(set(mine)) > 3  # not one token repeated


@pytest.mark.parametrize("tie", [False, True])
def test_our_model_round_trips_through_transformers(tie, tmp_path):
    model = ours(n_layer=2, n_head=4, n_kv_head=2, d_model=32, tie_embeddings=tie)
    cfg = model.cfg
    config = ARCH.hf_config(cfg, eot=0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    sd = ARCH.hf_state_dict(cfg, model.state_dict())
    assert ("lm_head.weight" in sd) == (not tie)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if tie else [])
    if tie:
        hf.tie_weights()
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    x = ids(50)
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max() < 1e-5
    # ... and back: from_hf of what we wrote gives our config and our weights.
    fields, back = ARCH.from_hf(saved_config(hf, tmp_path), hf.state_dict())
    assert ModelConfig(**fields) == cfg.model_copy(
        update={
            "n_kv_head": 2,
            "ffn_hidden": 96,
            "rope_theta": 10000.0,
            "norm_eps": 1e-5,
            "tie_embeddings": tie,
        }
    )
    state = model.state_dict()
    assert set(back) == set(state) - set(ARCH.tied(cfg))
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_kv_cache_holds_kv_heads_and_equals_full_recompute():
    model = ours(n_layer=2, n_head=4, n_kv_head=1, d_model=32)
    idx = torch.randint(0, V, (2, 40))
    full, _ = model(idx)
    cache = ARCH.new_cache(model, 2, "cpu", torch.float32)
    assert cache.k[0].shape == (2, 1, CTX, 8) and cache.capacity == CTX
    parts = [model(idx[:, :10], cache=cache)[0]]
    parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(10, 40)]
    assert cache.length == 40
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_generation_past_the_context_refills_the_cache_at_position_zero():
    """Past a full context the cache is rebuilt from the last 3/4 of it: the token after a
    refill is what a fresh forward over those tokens (rotary positions from 0) predicts."""
    model = ours(n_layer=1, n_head=2, d_model=16)
    greedy = SamplingParams(max_new_tokens=CTX, temperature=0)
    prompt = ids(10)[0].tolist()
    out = list(generate_tokens(model, prompt, greedy, use_cache=True))
    seq = prompt + out
    fits = CTX - len(prompt) + 1  # tokens sampled while prompt + output fit the context
    assert out[:fits] == list(generate_tokens(model, prompt, SamplingParams(fits, 0), False))
    window = seq[len(prompt) + fits - 3 * CTX // 4 : len(prompt) + fits]
    logits, _ = model(torch.tensor([window]))
    assert out[fits] == int(logits[0, -1].argmax())


@pytest.mark.parametrize("shape", SHAPES)
def test_param_count_from_the_config_is_the_built_models(shape):
    cfg = llama_cfg(**shape)
    model = models.build(cfg)
    assert ARCH.n_params(cfg) == sum(p.numel() for p in model.parameters())
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ARCH.hf_config(cfg, 0)))
    assert ARCH.n_params(cfg) == hf.num_parameters()


@pytest.mark.parametrize("shape", SHAPES)
def test_flops_per_token_are_what_torch_counts_for_a_training_step(shape):
    cfg = llama_cfg(**shape)
    model = models.build(cfg)
    idx = torch.randint(0, V, (2, CTX))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, targets=idx)
        loss.backward()
    assert ARCH.flops_per_token(cfg) == counter.get_total_flops() / idx.numel()


def test_defaults():
    cfg = llama_cfg(n_head=4, d_model=96)
    model = models.build(cfg)
    assert model.layers[0].mlp.up_proj.out_features == 256  # int(8 * 96 / 3) = 256
    assert models.build(llama_cfg(n_head=4, d_model=64)).layers[0].mlp.up_proj.out_features == 192
    assert model.layers[0].self_attn.k_proj.out_features == 96  # n_kv_head = n_head
    assert model.lm_head.weight is model.embed_tokens.weight  # tied
    assert ARCH.tied(cfg) == ("lm_head.weight",)
    assert ARCH.tied(llama_cfg(tie_embeddings=False)) == ()
    assert list(model.named_buffers()) == []  # no rotary table: not cast, not saved
    assert not any("rotary" in k for k in model.state_dict())


def test_kv_heads_that_do_not_divide_the_heads_are_one_line():
    with pytest.raises(ConfigError, match=r"model.n_kv_head=3 does not divide model.n_head=4$"):
        load_config(None, ["model.arch=llama", "model.n_head=4", "model.n_kv_head=3"])


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"attention_bias": True}, "attention_bias=true"),
        ({"mlp_bias": True}, "mlp_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"head_dim": 16}, "head_dim=16"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
            "rope_parameters=",
        ),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling="),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 does not divide"),
        ({"sliding_window": 32}, "sliding_window=32"),
        ({"intermediate_size": 64}, r"mlp.gate_proj.weight: shape \(72, 32\)"),
    ],
)
def test_inexact_configs_are_refused_naming_the_key(change, named, tmp_path):
    hf = hf_model()
    config = saved_config(hf, tmp_path) | change
    with pytest.raises(ConfigError, match=named) as err:
        ARCH.from_hf(config, hf.state_dict())
    assert "\n" not in str(err.value)


def test_a_tied_config_with_missing_weights_is_refused(tmp_path):
    hf = hf_model(tie=True)
    weights = {k: v for k, v in hf.state_dict().items() if "layers.1." not in k}
    with pytest.raises(ConfigError, match="missing .*layers.1"):
        ARCH.from_hf(saved_config(hf, tmp_path), weights)


def test_mistral_without_a_window_maps_exactly_and_with_one_is_refused(tmp_path):
    c = transformers.MistralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CTX,
        sliding_window=None,
    )  # fmt: skip
    torch.manual_seed(1)
    hf = transformers.MistralForCausalLM(c).eval()
    config = saved_config(hf, tmp_path)
    assert config["architectures"][0] in ARCH.hf_architectures
    fields, weights = ARCH.from_hf(config, hf.state_dict())
    model = models.build(ModelConfig(**fields)).eval()
    model.load_state_dict(weights)
    x = ids(40)
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="sliding_window=16 is shorter"):
        ARCH.from_hf(config | {"sliding_window": 16}, hf.state_dict())


@pytest.fixture
def untied_checkpoint(tmp_path):
    tok = train_tokenizer(["to be or not to be, that is the question"] * 5, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    model_cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                            context_length=32, vocab_size=tok.get_vocab_size(),
                            tie_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = models.build(model_cfg).eval()
    ckpt = tmp_path / "checkpoint_00000001"
    save_servable(ckpt, model.state_dict(), Config(model=model_cfg), tmp_path / "tokenizer.json",
                  TrainerState(1))  # fmt: skip
    seal(ckpt)
    return ckpt, model


def test_an_untied_model_saves_and_loads_with_its_head(untied_checkpoint):
    ckpt, model = untied_checkpoint
    assert "lm_head.weight" in load_file(ckpt / "model.safetensors")
    loaded, _, cfg = load_model(ckpt)
    assert cfg.model.arch == "llama" and cfg.model.tie_embeddings is False
    assert loaded.lm_head.weight is not loaded.embed_tokens.weight
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight)
    x = torch.randint(0, model.cfg.vocab_size, (2, 20))
    torch.testing.assert_close(loaded(x)[0], model(x)[0])


def test_export_hf_of_a_llama_checkpoint_loads_in_transformers(untied_checkpoint, tmp_path,
                                                               monkeypatch):  # fmt: skip
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ckpt, model = untied_checkpoint
    out = export_hf(ckpt, tmp_path / "hf-export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, transformers.LlamaForCausalLM)
    assert hf.config.num_key_value_heads == 2 and not hf.config.tie_word_embeddings
    x = torch.randint(0, model.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(x).logits - model(x)[0]).abs().max() < 1e-5


def test_the_presets_load():
    tiny = load_config(REPO / "jobs" / "configs" / "llama-tiny.yaml")
    assert tiny.model.arch == "llama" and tiny.model.n_kv_head < tiny.model.n_head
    big = load_config(REPO / "jobs" / "configs" / "llama-1b.yaml", ["model.vocab_size=128256"])
    assert big.model.n_kv_head == 8 and big.scaling.use_gpu
    # Llama 3.2 1B: 1.24B parameters at its 128,256-token vocabulary, tied.
    assert ARCH.n_params(big.model) == pytest.approx(1.236e9, rel=0.01)
