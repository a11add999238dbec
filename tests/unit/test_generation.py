"""Sampling: n samples in one batch, log-probabilities, repetition penalty, stop strings."""

from __future__ import annotations

import pytest
import torch

from lmforge import models
from lmforge.config import ModelConfig
from lmforge.errors import UsageError
from lmforge.generation import (
    SamplingParams,
    complete_samples,
    generate_steps,
    generate_tokens,
    penalize_counts,
    penalize_repeats,
    stream_samples,
)
from lmforge.tokenizer import train_tokenizer

PROMPT = [3, 4, 5]


@pytest.fixture(scope="module", params=["gpt2", "llama", "lstm"])
def model(request):
    torch.manual_seed(0)
    extra = {"n_kv_head": 1} if request.param == "llama" else {}
    cfg = ModelConfig(
        arch=request.param,
        n_layer=2,
        n_head=2,
        d_model=32,
        context_length=32,
        vocab_size=60,
        **extra,
    )
    return models.build(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    # Few merges: "STOP" spans several tokens, so its start must be held back.
    return train_tokenizer(["hello world, STOP here. START again!"] * 30, vocab_size=262)


def test_n_greedy_samples_in_one_batch_equal_one_sample(model):
    one = [s[0] for s in generate_steps(model, PROMPT, SamplingParams(12, 0, logprobs=3))]
    many = list(generate_steps(model, PROMPT, SamplingParams(12, 0, n=3, logprobs=3)))
    for step, ref in zip(many, one, strict=True):
        for choice in step:
            assert choice.token == ref.token
            assert choice.logprob == pytest.approx(ref.logprob, abs=1e-5)


def test_sampled_rows_differ_and_repeat_with_a_seed(model):
    p = SamplingParams(16, temperature=1.5, top_k=None, n=4, seed=7)
    runs = [[tuple(c.token for c in s) for s in generate_steps(model, PROMPT, p)] for _ in "ab"]
    assert runs[0] == runs[1]
    rows = list(zip(*runs[0], strict=True))
    assert len(set(rows)) > 1  # four samples of a near-uniform model are not all equal


def test_logprobs_are_the_models_distribution(model):
    p = SamplingParams(6, temperature=0.7, top_k=5, seed=1, logprobs=4)
    seq = list(PROMPT)
    for (choice,) in generate_steps(model, PROMPT, p):
        with torch.no_grad():
            logits, _ = model(torch.tensor([seq]))
        logp = torch.log_softmax(logits[0, -1].float(), dim=-1)
        assert choice.logprob == pytest.approx(logp[choice.token].item(), abs=1e-5)
        assert [t for t, _ in choice.top] == logp.topk(4).indices.tolist()
        assert [v for _, v in choice.top] == pytest.approx(logp.topk(4).values.tolist(), abs=1e-5)
        seq.append(choice.token)
    # Without logprobs, none are computed.
    (first,) = next(generate_steps(model, PROMPT, SamplingParams(1, 0)))
    assert first.logprob is None and first.top == ()


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seq = torch.tensor([[0, 1, 1]])
    out = penalize_repeats(logits, seq, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # seen: positive halved, negative doubled
    assert penalize_repeats(logits, seq, 1.0) is logits


def test_presence_and_frequency_penalties_are_openais_over_generated_tokens(model):
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    generated = torch.tensor([[0, 3, 3]])
    out = penalize_counts(logits, generated, presence=0.5, frequency=0.25)
    assert out.tolist() == [[2.0 - 0.25 - 0.5, -1.0, 0.5, 3.0 - 0.5 - 0.5]]
    assert penalize_counts(logits, generated, 0.0, 0.0) is logits
    # Greedy: the prompt's tokens are not penalised, the generated ones are, step by step.
    greedy = list(generate_tokens(model, PROMPT, SamplingParams(6, 0)))  # for the message
    steered = list(generate_tokens(model, PROMPT, SamplingParams(6, 0, frequency_penalty=2.0,
                                                                 presence_penalty=2.0)))  # fmt: skip
    seq, want = list(PROMPT), []
    with torch.no_grad():
        for _ in range(6):
            logits, _ = model(torch.tensor([seq]))
            gen = torch.tensor([seq[len(PROMPT) :]], dtype=torch.long)
            tok = int(penalize_counts(logits[:, -1].float(), gen, 2.0, 2.0).argmax())
            want.append(tok)
            seq.append(tok)
    assert steered == want and len(set(steered)) == len(steered), (steered, greedy)


def test_repetition_penalty_steers_greedy_generation(model):
    p = SamplingParams(1, 0, repetition_penalty=50.0)
    (choice,) = next(generate_steps(model, PROMPT, p))
    with torch.no_grad():
        logits, _ = model(torch.tensor([PROMPT]))
    want = penalize_repeats(logits[:, -1].float(), torch.tensor([PROMPT]), 50.0).argmax()
    assert choice.token == int(want)
    # A huge penalty keeps greedy decoding off the prompt's tokens and its own.
    out = list(generate_tokens(model, PROMPT, SamplingParams(8, 0, repetition_penalty=1e6)))
    assert len(set(out)) == len(out) and not set(out) & set(PROMPT)


def test_stop_token_and_length_finish(model, tok):
    greedy = list(generate_tokens(model, PROMPT, SamplingParams(10, 0)))
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    (s,) = complete_samples(model, tok, PROMPT, SamplingParams(10, 0, stop_token=stop_at))
    assert [c.token for c in s.tokens] == greedy[:first] and s.finish == "stop_token"
    (s,) = complete_samples(model, tok, PROMPT, SamplingParams(10, 0))
    assert len(s.tokens) == 10 and s.finish == "length" and s.text == tok.decode(greedy)


def scripted_pieces(tok, monkeypatch, texts, stop):
    """stream_samples over steps that spell out `texts` (one token per step, then None):
    the text layer's logic alone, without a model's randomness."""
    from lmforge import generation
    from lmforge.generation import TokenChoice

    rows = [tok.encode(t).ids for t in texts]
    steps = max(len(r) for r in rows)

    def fake_steps(_model, _ids, _params, use_cache=True):
        for k in range(steps):
            yield [TokenChoice(r[k]) if k < len(r) else None for r in rows]

    monkeypatch.setattr(generation, "generate_steps", fake_steps)
    params = SamplingParams(steps, n=len(texts), stop=stop)
    return list(stream_samples(None, tok, [1], params))


def test_stop_strings_cut_the_text_and_hold_back_partial_matches(tok, monkeypatch):
    texts = ["hello world, STOP here.", "hello START again!", "hello world"]
    pieces = scripted_pieces(tok, monkeypatch, texts, stop=("STOP",))
    text = ["".join(p.text for p in pieces if p.index == i) for i in range(3)]
    assert text == ["hello world, ", "hello START again!", "hello world"]
    finish = {p.index: p.finish for p in pieces if p.finish}
    assert finish == {0: "stop_string", 1: "stop_token", 2: "stop_token"}
    # Nothing after the stop string was streamed, and no piece showed "ST" early.
    assert all("ST" not in p.text for p in pieces if p.index == 0)


def test_bad_params_are_named():
    for kw, msg in [
        ({"n": 0}, "n must be >= 1"),
        ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"logprobs": -1}, "logprobs must be >= 0"),
        ({"stop": ("",)}, "stop string must not be empty"),
    ]:
        with pytest.raises(UsageError, match=msg):
            SamplingParams(**kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    """A sealed servable checkpoint of a tiny untrained model (what a run or import writes)."""
    from lmforge.checkpoint import TrainerState, save_servable, seal
    from lmforge.config import Config

    tmp_path = tmp_path_factory.mktemp("ckpt")
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = Config(
        model=ModelConfig(
            n_layer=1, n_head=2, d_model=32, context_length=32, vocab_size=tok.get_vocab_size()
        )
    )
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint_00000001"
    weights = models.build(cfg.model).state_dict()
    save_servable(ckpt, weights, cfg, tmp_path / "tokenizer.json", TrainerState(1))
    seal(ckpt)
    return ckpt


def test_cli_generate_samples_stops_and_logprobs(checkpoint):
    """`lmforge generate` with --n, --stop, --logprobs on a sealed checkpoint."""
    import subprocess
    import sys

    ckpt = checkpoint

    def generate(*extra):
        cmd = [sys.executable, "-m", "lmforge.cli", "generate", "--checkpoint", str(ckpt)]
        cmd += ["--prompt", "hello", "--max-new-tokens", "6", "--seed", "0", *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    out = generate("--n", "3", "--temperature", "1.5")
    assert [line for line in out.splitlines() if line.startswith("-" * 20)] == [
        f"{'-' * 20} sample {i} of 3" for i in (1, 2, 3)
    ]
    greedy = generate("--temperature", "0", "--logprobs", "2")
    text, *rows = greedy.splitlines()
    assert text.startswith("hello") and len(rows) == 6  # one row per new token
    first = rows[0].split()
    assert len(first) == 6 and float(first[1]) <= 0  # token, logprob, 2 x (alt, logprob)
    new = text[len("hello") :]
    stop = next(c for c in new if not c.isspace())  # a character it is going to write
    cut = generate("--temperature", "0", "--stop", stop).splitlines()[0]
    assert cut == "hello" + new[: new.index(stop)]
    bad = subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "generate", "--checkpoint", str(ckpt)]
        + ["--prompt", "x", "--n", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "n must be >= 1" in bad.stderr.strip().splitlines()[-1]


def test_pyfunc_predict_takes_the_new_params(checkpoint):
    """The registered model's predict: n outputs per prompt, a stop string, log-probs."""
    import json
    from types import SimpleNamespace

    from lmforge.tracking.pyfunc_model import TextGenerator

    gen = TextGenerator()
    gen.load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}))
    base = {"max_new_tokens": 6, "temperature": 0.0}
    (plain,) = gen.predict(None, ["hello"], base)
    assert gen.predict(None, ["hello", "world"], {**base, "n": 2})[:2] == [plain, plain]
    assert len(gen.predict(None, ["hello", "world"], {**base, "n": 2})) == 4
    stop = next(c for c in plain if not c.isspace())
    assert gen.predict(None, ["hello"], {**base, "stop": stop}) == [plain[: plain.index(stop)]]
    (out,) = gen.predict(None, ["hello"], {**base, "logprobs": 3})
    got = json.loads(out)
    assert got["text"] == plain and got["finish"] in ("length", "stop_token")
    assert "".join(t["token"] for t in got["tokens"]) == plain
    assert all(len(t["top"]) == 3 and t["top"][0][0] == t["token"] for t in got["tokens"])
