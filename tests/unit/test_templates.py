"""Prompt templates: the built-ins' targets, the sandbox, and Hugging Face chat templates
rendered exactly as transformers' `apply_chat_template` renders them."""

from __future__ import annotations

import json

import pytest

from lmforge import templates
from lmforge.templates import TemplateError
from lmforge.tokenizer import EOT, train_tokenizer

CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And a fruit?"},
    {"role": "assistant", "content": "Pear."},
]

# Chat templates in the styles models ship: Llama 3's header tokens with bos_token and
# loop.index0, ChatML with a default system prompt, and one that raises on a bad order
# (Llama 2 / Mistral style), one that uses tojson and namespace.
HF_TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"
    ),
    "chatml": (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' "
        "+ message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% continue %}{% endif %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "tojson": (
        "{% set ns = namespace(n=0) %}{% for message in messages %}{% set ns.n = ns.n + 1 %}"
        "{{ message | tojson }}\n{% endfor %}turns={{ ns.n }}"
    ),
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    tok = train_tokenizer(["hello world, name a colour and a fruit"] * 20, vocab_size=300)
    tok.add_special_tokens(["<s>", "</s>"])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def hf_folder(tmp_path, tokenizer_json, chat_template):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tokenizer_json.read_text())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "special": True},  # as saved
        "chat_template": chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("style", sorted(HF_TEMPLATES))
@pytest.mark.parametrize("gen", [False, True])
def test_hf_chat_template_renders_as_transformers(tmp_path, tokenizer_json, style, gen):
    transformers = pytest.importorskip("transformers")
    folder = hf_folder(tmp_path, tokenizer_json, HF_TEMPLATES[style])
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    ours = templates.from_tokenizer_config(folder / "tokenizer_config.json")
    assert ours.variables["eos_token"] == "</s>" and ours.variables["bos_token"] == "<s>"
    chat = CHAT[1:] if style == "mistral" else CHAT
    for turns in (chat[:2], chat):  # one exchange, two exchanges
        want = hf.apply_chat_template(turns, tokenize=False, add_generation_prompt=gen)
        assert ours.render(turns, add_generation_prompt=gen) == want


def test_hf_template_errors_and_absence(tmp_path, tokenizer_json):
    folder = hf_folder(tmp_path, tokenizer_json, HF_TEMPLATES["mistral"])
    t = templates.from_tokenizer_config(folder / "tokenizer_config.json")
    with pytest.raises(TemplateError, match="roles must alternate"):
        t.render([CHAT[1], CHAT[1]])
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert templates.from_tokenizer_config(folder / "tokenizer_config.json") is None
    assert templates.from_tokenizer_config(folder / "missing.json") is None
    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 1 }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert templates.from_tokenizer_config(folder / "tokenizer_config.json").render([]) == "1"


@pytest.mark.parametrize("name", templates.NAMES)
def test_builtin_targets_are_the_assistant_turns(name):
    t = templates.get(name, eos_token=EOT, examples=[{"prompt": "2+2?", "completion": "4"}])
    text, spans = t.render_with_targets(CHAT)
    replies = [m["content"] for m in CHAT if m["role"] == "assistant"]
    assert [text[a:b].strip() for a, b in spans] == [r + EOT for r in replies]
    # Everything else is prompt: the questions, and for few-shot the worked example.
    bounds = [0, *(i for span in spans for i in span), len(text)]
    outside = "".join(text[a:b] for a, b in zip(bounds[::2], bounds[1::2], strict=True))
    assert "Name a colour." in outside and "And a fruit?" in outside
    assert not any(r in outside for r in replies)
    if name == "few-shot":
        assert "Q: 2+2?\nA: 4" in outside
    if name == "chain-of-thought":
        assert outside.count(templates.COT_CUE) == 2
    # Generating after the first question: the prompt is exactly what preceded the reply.
    prompt = t.render(CHAT[:2], add_generation_prompt=True)
    assert text.startswith(prompt) and spans[0][0] == len(prompt)


def test_prompt_completion_rows():
    t = templates.get("instruct", eos_token=EOT)
    text, spans = t.render_with_targets(templates.to_messages({"prompt": "Hi", "completion": "Yo"}))
    assert text == f"### Instruction:\nHi\n\n### Response:\nYo{EOT}\n\n"
    assert [text[a:b] for a, b in spans] == [f"Yo{EOT}"]


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # The last user turn is rendered differently from the others: no prefix property.
    src = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m.content }}\n{% endfor %}"
    t = templates.Template("odd", src, {})
    with pytest.raises(TemplateError, match="turn 1 does not render as a continuation"):
        t.render_with_targets(CHAT[1:3])


def test_sandbox_and_bad_files(tmp_path):
    escape = templates.Template("evil", "{{ ''.__class__.__mro__[1].__subclasses__() }}", {})
    with pytest.raises(TemplateError, match="evil"):
        escape.render(CHAT)
    bad = tmp_path / "mine.jinja"
    bad.write_text("line one\n{% for m in messages %}{{ m.content }}\n")
    with pytest.raises(TemplateError, match=r"mine.jinja: Jinja2 syntax error at line 2"):
        templates.from_file(bad)
    with pytest.raises(TemplateError, match="not found"):
        templates.from_file(tmp_path / "nope.jinja")
    good = tmp_path / "qa.jinja"
    good.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}")
    t = templates.from_file(good, eos_token=EOT)
    assert t.name == "qa" and t.render(CHAT[1:2]) == "user: Name a colour.\n"


def test_bad_input_is_named():
    with pytest.raises(TemplateError, match="unknown template 'alpaca'.*plain, instruct"):
        templates.get("alpaca")
    with pytest.raises(TemplateError, match="few-shot' needs examples"):
        templates.get("few-shot")
    t = templates.get("chat", eos_token=EOT)
    with pytest.raises(TemplateError, match="message 0 has role 'bot'"):
        t.render_with_targets([{"role": "bot", "content": "x"}])
    with pytest.raises(TemplateError, match="message 1 needs 'role' and 'content'"):
        t.render_with_targets([CHAT[1], {"role": "assistant"}])


def test_description_round_trip():
    t = templates.get("few-shot", eos_token=EOT, examples=[{"prompt": "a", "completion": "b"}])
    back = templates.Template.from_description(json.loads(json.dumps(t.describe())))
    assert back.describe() == t.describe() and back.render(CHAT) == t.render(CHAT)


def test_a_folder_carries_its_template(tmp_path, tokenizer_json):
    assert templates.of_folder(tmp_path) is None
    t = templates.get("chain-of-thought", eos_token=EOT, cue="Think first.")
    templates.save(t, tmp_path)
    assert templates.of_folder(tmp_path).render(CHAT) == t.render(CHAT)
    # An imported model's folder: its chat_template, when no template.json was written.
    folder = hf_folder(tmp_path, tokenizer_json, HF_TEMPLATES["chatml"])
    assert templates.of_folder(folder).source == HF_TEMPLATES["chatml"]
    (tmp_path / templates.TEMPLATE_FILE).write_text("[]")
    with pytest.raises(TemplateError, match="template.json: not a template description"):
        templates.of_folder(tmp_path)
