"""The template a model was trained with travels: checkpoint -> staged registry artifact,
and generation puts a prompt in it (CLI `generate --template`, the pyfunc's `template`)."""

from __future__ import annotations

from lmforge import checkpoint, templates
from lmforge.cli import _prompt_template
from lmforge.tokenizer import EOT, train_tokenizer
from lmforge.tracking.registry import stage_servable


def test_template_json_is_a_servable_file_and_is_staged(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    for name in checkpoint.SERVABLE:
        (ckpt / name).write_text("x")
    assert templates.TEMPLATE_FILE not in checkpoint.servable_files(ckpt)
    checkpoint.save_template(ckpt, None)  # a text run: no template
    assert templates.trained_with(ckpt) is None
    t = templates.get("instruct", eos_token=EOT)
    checkpoint.save_template(ckpt, t)
    assert templates.TEMPLATE_FILE in checkpoint.servable_files(ckpt)
    staged = stage_servable(ckpt, tmp_path / "stage")
    assert templates.trained_with(staged) == t


def test_generate_puts_the_prompt_in_the_trained_template(tmp_path):
    tok = train_tokenizer(["a b c"] * 5, vocab_size=300)
    t = templates.get("instruct", eos_token=EOT)
    templates.save(t, tmp_path)
    own = _prompt_template("own", tmp_path, tok)
    assert templates.as_prompt(own, "Name a colour.") == (
        "### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert templates.as_prompt(_prompt_template("none", tmp_path, tok), "hi") == "hi"
    chat = _prompt_template("chat", tmp_path, tok)
    assert templates.as_prompt(chat, "hi") == "<|user|>\nhi\n<|assistant|>\n"
    assert _prompt_template("own", tmp_path / "nothing", tok) is None  # raw text then
