"""The Playground's library side: template choices, the exact prompt, shaded tokens."""

from __future__ import annotations

import torch

from lmforge import models, playground, templates
from lmforge.checkpoint import TrainerState, load_model, save_servable, seal
from lmforge.config import Config, ModelConfig
from lmforge.generation import SamplingParams, TokenChoice
from lmforge.tokenizer import EOT, train_tokenizer


def loaded(tmp_path, template=None) -> playground.Loaded:
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(["a king, a queen <b>&</b>"] * 20, vocab_size=280)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = Config(model=ModelConfig(n_layer=1, n_head=2, d_model=16, context_length=16,
                                   vocab_size=tok.get_vocab_size()))  # fmt: skip
    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoint_00000001"
    save_servable(ckpt, models.build(cfg.model).state_dict(), cfg, tmp_path / "tokenizer.json",
                  TrainerState(1))  # fmt: skip
    if template is not None:
        templates.save(template, ckpt)
    seal(ckpt)
    model, tok, cfg = load_model(ckpt)
    return playground.Loaded("models:/m/1", "1", ckpt, model, tok, cfg)


def test_choices_put_the_versions_own_template_first(tmp_path):
    plain = loaded(tmp_path / "a")
    assert list(playground.template_choices(plain)) == [
        "none (raw text)", "plain", "instruct", "chat", "chain-of-thought"
    ]  # fmt: skip
    assert playground.template_choices(plain)["chat"].variables["eos_token"] == EOT
    own = templates.get("instruct", eos_token=EOT)
    trained = loaded(tmp_path / "b", own)
    names = list(playground.template_choices(trained))
    assert names[1] == f"{playground.OWN} (instruct)"
    assert playground.template_choices(trained)[names[1]].source == own.source


def test_the_exact_prompt(tmp_path):
    chat = templates.get("chat", eos_token=EOT)
    msgs = [{"role": "user", "content": "Hi"}]
    assert playground.render_prompt(chat, msgs) == "<|user|>\nHi\n<|assistant|>\n"
    assert playground.render_prompt(chat, msgs, templates.COT_CUE).endswith(
        f"<|assistant|>\n {templates.COT_CUE}"
    )
    assert playground.render_prompt(None, msgs) == "Hi"  # raw text
    few = playground.with_examples(loaded(tmp_path), [{"prompt": "2+2?", "completion": "4"}])
    assert playground.render_prompt(few, msgs) == "Q: 2+2?\nA: 4\n\nQ: Hi\nA:"


def test_samples_stream_side_by_side(tmp_path):
    m = loaded(tmp_path)
    prompt = playground.fit_prompt(m, "a king", 4)
    pieces = list(playground.stream_pieces(m, prompt, SamplingParams(4, 1.0, n=3, seed=0)))
    assert {p.index for p in pieces} == {0, 1, 2}
    assert all(p.finish for p in pieces if p.token is None)


def test_token_html_shades_and_escapes(tmp_path):
    tok = loaded(tmp_path).tokenizer
    ids = tok.encode("<b>&").ids
    likely, unlikely = TokenChoice(ids[0], -0.01, ((ids[0], -0.01),)), TokenChoice(ids[1], -5.0)
    out = playground.token_html(tok, [likely, unlikely, *map(TokenChoice, ids[2:])], "a <i>")
    assert "<b>" not in out and "&lt;" in out and "a &lt;i&gt;" in out
    assert "hsl(118," in out and "hsl(0," in out  # p=0.99 green, p=0.007 red
    assert out.count("<span") == len(ids) + 1
