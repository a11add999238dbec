import logging

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lmforge import models
from lmforge.config import ConfigError, ModelConfig
from lmforge.generation import SamplingParams, generate_tokens, sample_next

CTX = 32
SHAPES = [
    {"n_layer": 2, "n_head": 2, "d_model": 32, "context_length": 32, "vocab_size": 50},
    {"n_layer": 3, "n_head": 4, "d_model": 64, "context_length": 48, "vocab_size": 301},
]


def tiny(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=CTX, vocab_size=50, **kw)
    return models.build(cfg).eval()


def forward_sizes(model) -> list[int]:
    """The sequence length of every forward call `model` gets from now on."""
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[1]))
    return sizes


def test_shapes_and_loss():
    model = tiny()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 16, 50)
    # An untrained GPT-2-initialised model predicts close to uniform.
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_the_registry_builds_the_configs_architecture():
    model = tiny()
    arch = models.of(model)
    assert arch is models.get("gpt2") and arch.name == model.cfg.arch == "gpt2"
    assert "gpt2" in models.names()
    with pytest.raises(ConfigError, match="model.arch='nope': unknown architecture"):
        models.get("nope")


@pytest.mark.parametrize("shape", SHAPES)
def test_param_count_from_the_config_is_the_built_models(shape):
    cfg = ModelConfig(**shape)
    model = models.build(cfg)
    assert model.lm_head.weight is model.wte.weight  # tied: counted once below
    assert models.get("gpt2").n_params(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("shape", SHAPES)
def test_flops_per_token_are_what_torch_counts_for_a_training_step(shape):
    """6N + 12·L·d·T is exactly the matmul FLOPs of forward + backward (the math attention
    kernel, which the counter sees; biases and LayerNorm are not matmuls)."""
    cfg = ModelConfig(**shape)
    model = models.build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.context_length))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, targets=idx)
        loss.backward()
    per_token = counter.get_total_flops() / idx.numel()
    assert models.get("gpt2").flops_per_token(cfg) == per_token


def test_causal_mask_later_tokens_do_not_change_earlier_logits():
    model = tiny()
    idx = torch.randint(0, 50, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 7) % 50
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_kv_cache_logits_equal_full_recompute():
    model = tiny()
    idx = torch.randint(0, 50, (2, 24))
    full, _ = model(idx)
    cache = models.of(model).new_cache(model, 2, "cpu", torch.float32)
    parts = [model(idx[:, :10], cache=cache)[0]]
    parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def windowed_recompute(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """What generation with the cache promises, without a cache: each token is sampled from
    a full forward pass over the tokens since the last refill, where a refill (when the
    next token would not fit the context) keeps the last 3/4 of a context."""
    generator = torch.Generator().manual_seed(params.seed)
    seq, start, out = list(prompt), 0, []
    for _ in range(params.max_new_tokens):
        if len(seq) - start > CTX:
            start = len(seq) - 3 * CTX // 4
        logits, _ = model(torch.tensor([seq[start:]]))
        token = int(sample_next(logits[:, -1], params, generator))
        seq.append(token)
        out.append(token)
    return out


def test_kv_cache_generation_equals_full_recompute_past_the_context():
    """Within the context the cached and uncached paths agree token for token. Past it they
    differ by design (the cache refills from the last 3/4 of the context, the uncached path
    slides one token at a time), so there the cache is checked against a full recompute of
    the tokens it holds: 5 + 40 tokens go through two refills of a 32-token context."""
    model = tiny()
    params = SamplingParams(max_new_tokens=40, temperature=0.9, top_k=10, top_p=0.9, seed=3)
    prompt = [1, 2, 3, 4, 5]
    sizes = forward_sizes(model)
    cached = list(generate_tokens(model, prompt, params, use_cache=True))
    # the prompt, one token a step until the context is full, a refill of 24 tokens and 8
    # one-token steps that fill it again, the second refill and the last 2 steps
    assert sizes == [5] + [1] * 27 + [24] + [1] * 8 + [24] + [1] * 2
    assert cached == windowed_recompute(model, prompt, params)
    uncached = list(generate_tokens(model, prompt, params, use_cache=False))
    fits = CTX - len(prompt) + 1  # tokens sampled while prompt + output fit the context
    assert cached[:fits] == uncached[:fits]


def test_greedy_is_deterministic_and_stops_at_stop_token():
    model = tiny()
    greedy = SamplingParams(max_new_tokens=10, temperature=0)
    out = list(generate_tokens(model, [3, 4], greedy))
    assert out == list(generate_tokens(model, [3, 4], greedy))
    stopped = list(generate_tokens(model, [3, 4], SamplingParams(10, 0, stop_token=out[2])))
    assert stopped == out[: out.index(out[2])]


def test_a_prompt_near_the_context_is_used_whole_with_the_cache():
    model = tiny()
    prompt = [int(t) for t in torch.randint(0, 50, (30,))]  # context is 32
    greedy = SamplingParams(max_new_tokens=2, temperature=0)
    cached = list(generate_tokens(model, prompt, greedy, use_cache=True))
    logits, _ = model(torch.tensor([prompt]))
    assert cached[0] == int(logits[0, -1].argmax())
    assert cached == list(generate_tokens(model, prompt, greedy, use_cache=False))


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_long_prompt_keeps_its_last_context_minus_one_tokens(use_cache, caplog):
    model = tiny()
    prompt = [
        int(t) for t in torch.randint(0, 50, (45,), generator=torch.Generator().manual_seed(1))
    ]
    seen: list[list[int]] = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0].tolist()))
    greedy = SamplingParams(5, 0)
    with caplog.at_level(logging.WARNING, logger="lmforge.generation"):
        out = list(generate_tokens(model, prompt, greedy, use_cache=use_cache))
    assert seen[0] == prompt[-(CTX - 1) :]  # the first forward sees the last 31 tokens
    assert "prompt has 45 tokens; keeping the last 31" in caplog.text
    assert out == list(generate_tokens(model, prompt[-(CTX - 1) :], greedy, use_cache=use_cache))
    assert len(out) == 5


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, SamplingParams(top_k=2, top_p=None), g)) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(sample_next(logits, SamplingParams(top_k=None, top_p=0.5), g)) for _ in range(200)}
    assert picks == {0}


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_k": 0}, {"top_p": 1.5}])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_models_import_no_ray_deepspeed_or_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, lmforge.models, lmforge.generation; "
        "[lmforge.models.get(a) for a in lmforge.models.names()]; "
        "bad = [m for m in ('ray', 'deepspeed', 'mlflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
