import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.generation import SamplingParams, generate_tokens, sample_next
from lmforge.model import GPT, KVCache


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=32, vocab_size=50, **kw)
    return GPT(cfg).eval()


def test_shapes_and_loss():
    model = tiny()
    idx = torch.randint(0, 50, (3, 16))
    logits, loss = model(idx, targets=idx)
    assert logits.shape == (3, 16, 50)
    # An untrained GPT-2-initialised model predicts close to uniform.
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5


def test_tied_embeddings_and_param_count():
    model = tiny()
    assert model.lm_head.weight is model.wte.weight
    d, v, ctx, L = 32, 50, 32, 2
    per_block = (
        2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    )
    assert model.num_params(non_embedding=False) == v * d + ctx * d + L * per_block + 2 * d


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
    cache = KVCache(model.cfg, 2, "cpu", torch.float32)
    parts = [model(idx[:, :10], cache=cache)[0]]
    parts += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_generation_equals_full_recompute():
    model = tiny()
    params = SamplingParams(max_new_tokens=40, temperature=0.9, top_k=10, top_p=0.9, seed=3)
    # 5 + 40 tokens exceeds the 32-token context: both paths must slide past it.
    cached = list(generate_tokens(model, [1, 2, 3, 4, 5], params, use_cache=True))
    ref = list(generate_tokens(model, [1, 2, 3, 4, 5], params, use_cache=False))
    assert len(cached) == 40
    assert cached[:26] == ref[:26]  # identical while the sequence fits the context


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


def test_long_prompt_is_truncated_not_an_error():
    model = tiny()
    out = list(generate_tokens(model, list(range(45)), SamplingParams(5, 0)))
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


def test_model_imports_no_distributed_code():
    import subprocess
    import sys

    code = (
        "import sys, lmforge.model, lmforge.generation; "
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
