"""The server's continuous batching (lmforge/serving/engine.py), no Ray: requests that join
and leave a running batch, each with its own KV cache slots, give `lmforge generate`'s
output (greedy and seeded), also when a batch mixes a base and two LoRA adapters."""

from __future__ import annotations

import threading

import pytest
import torch

from lmforge import lora, models
from lmforge.config import ModelConfig
from lmforge.generation import SamplingParams, complete_samples
from lmforge.serving.engine import Engine, Job, wait_idle
from lmforge.tokenizer import train_tokenizer

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind"] * 8


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, vocab_size=300)


def build(arch: str, vocab: int, context: int = 48):
    torch.manual_seed(0)
    extra = {"n_kv_head": 1} if arch == "llama" else {}
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=2, d_model=32, context_length=context,
                      vocab_size=vocab, **extra)  # fmt: skip
    return models.build(cfg).eval()


def run(engine: Engine, tok, jobs: list[tuple[list[int], SamplingParams, str | None]]):
    """Submit every job at once (they share the batch); each one's samples' texts, finishes
    and token ids."""
    out = [dict() for _ in jobs]
    done = [threading.Event() for _ in jobs]

    def sink(i, n):
        texts, finish, tokens = [""] * n, [None] * n, [[] for _ in range(n)]

        def emit(piece):
            texts[piece.index] += piece.text
            if piece.token is not None:
                tokens[piece.index].append(piece.token.token)
            if piece.finish:
                finish[piece.index] = piece.finish
            if all(finish):
                out[i].update(texts=texts, finish=finish, tokens=tokens)
                done[i].set()

        return emit

    for i, (ids, params, adapter) in enumerate(jobs):
        engine.submit(Job(ids, params, sink(i, params.n), tok, adapter))
    for d in done:
        assert d.wait(60)
    wait_idle(engine)
    return out


def reference(model, tok, ids, params):
    samples = complete_samples(model, tok, ids, params)
    return (
        [s.text for s in samples],
        [s.finish for s in samples],
        [[c.token for c in s.tokens] for s in samples],
    )


PROMPTS = ["To be", "Whether 'tis nobler in", "or not to be, that is the", "the mind"]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "lstm"])
def test_concurrent_requests_equal_generate_each(arch, tok):
    model = build(arch, tok.get_vocab_size())
    engine = Engine(model, max_batch=6)
    engine.start()
    try:
        jobs = []
        for i, text in enumerate(PROMPTS):
            ids = tok.encode(text).ids
            params = SamplingParams(
                max_new_tokens=5 + 3 * i,  # they leave the batch at different steps
                temperature=0 if i % 2 == 0 else 1.0,
                seed=i,
                n=1 + i % 2,
                stop=("qq",) if i == 3 else (),
                logprobs=2,
                frequency_penalty=1.5 if i == 2 else 0.0,  # per row, over its own tokens
                presence_penalty=1.0 if i == 1 else 0.0,
            )
            jobs.append((ids, params, None))
        got = run(engine, tok, jobs)
    finally:
        engine.stop()
    for (ids, params, _), g in zip(jobs, got, strict=True):
        texts, finish, tokens = reference(model, tok, ids, params)
        assert g["tokens"] == tokens and g["texts"] == texts and g["finish"] == finish
    assert engine.max_rows_seen > 2  # they were decoded together (lstm: its states' slots)


def test_more_requests_than_rows_wait_for_a_free_slot(tok):
    model = build("gpt2", tok.get_vocab_size())
    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        p = SamplingParams(max_new_tokens=4, temperature=0)
        jobs = [(tok.encode(t).ids, p, None) for t in PROMPTS * 2]
        got = run(engine, tok, jobs)
    finally:
        engine.stop()
    assert engine.max_rows_seen == 2
    for (ids, params, _), g in zip(jobs, got, strict=True):
        assert g["texts"] == reference(model, tok, ids, params)[0]


def test_a_row_reaching_the_context_ends_with_length(tok):
    model = build("gpt2", tok.get_vocab_size(), context=16)
    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        ids = tok.encode("To be, or not to be").ids[:10]
        (g,) = run(engine, tok, [(ids, SamplingParams(max_new_tokens=50, temperature=0), None)])
    finally:
        engine.stop()
    assert g["finish"] == ["length"] and len(g["tokens"][0]) == 16 - len(ids) + 1


def adapter(model, name: str, seed: int):
    """A LoRA adapter with random (non-zero) weights added to `model` under `name`; the same
    adapter on a fresh copy of the base, to generate from alone."""
    settings = lora.LoraSettings(r=2, alpha=4)
    lora.add_adapters(model, settings, name=name)
    torch.manual_seed(seed)
    state = {}
    for key, p in model.named_parameters():
        if f".{name}." in key:
            with torch.no_grad():
                p.normal_(std=0.3)
            state[key.replace(f".{name}.", ".")] = p.detach().clone()
    alone = build("gpt2", model.cfg.vocab_size)
    lora.add_adapters(alone, settings)
    lora.load_adapter(alone, state)
    return alone.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # serve --dtype fp32 / bf16
def test_a_batch_mixing_the_base_and_two_adapters_gives_each_its_own_output(tok, dtype):
    """Also in bf16 (weights, adapters and KV cache): each row equals its version decoded
    alone in bf16, as `lmforge generate --dtype bf16` does."""
    model = build("gpt2", tok.get_vocab_size())
    plain = build("gpt2", tok.get_vocab_size())
    alone = {"a1": adapter(model, "a1", 1), "a2": adapter(model, "a2", 2), None: plain}
    alone = {a: m.to(dtype) for a, m in alone.items()}
    engine = Engine(model.to(dtype).eval(), max_batch=8)
    engine.start()
    p = SamplingParams(max_new_tokens=8, temperature=0)
    jobs = [(tok.encode(t).ids, p, a) for t in PROMPTS[:2] for a in ("a1", None, "a2")]
    try:
        got = run(engine, tok, jobs)
    finally:
        engine.stop()
    assert engine.max_rows_seen == 6
    outputs = set()
    for (ids, params, a), g in zip(jobs, got, strict=True):
        assert g["tokens"] == reference(alone[a], tok, ids, params)[2]
        outputs.add(tuple(g["tokens"][0]))
    assert len(outputs) == 6  # the adapters change the output


def test_two_saved_adapters_load_side_by_side_by_name(tok):
    """`lora.load_adapter(name=)` of a second adapter: the first one's layers are no
    'missing' weights of it (what a replica holding several LoRA versions does)."""
    model = build("gpt2", tok.get_vocab_size())
    saved = {}
    for name, seed in (("v1", 1), ("v2", 2)):
        src = build("gpt2", tok.get_vocab_size())
        lora.add_adapters(src, lora.LoraSettings(r=2, alpha=4))
        torch.manual_seed(seed)
        with torch.no_grad():
            for key, p in src.named_parameters():
                if "lora_B" in key:
                    p.normal_(std=0.3)
        saved[name] = lora.adapter_state_dict(src)
        lora.add_adapters(model, lora.LoraSettings(r=2, alpha=4), name=name)
        lora.load_adapter(model, saved[name], name=name)
    for name in ("v1", "v2"):
        got = {
            k.replace(f".{name}.", "."): v
            for k, v in model.state_dict().items()
            if f".{name}." in k
        }
        assert got.keys() == saved[name].keys()
        assert all(torch.equal(got[k], saved[name][k]) for k in got)
