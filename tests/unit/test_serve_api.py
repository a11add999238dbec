"""The OpenAI protocol of `lmforge serve` (lmforge/serving/api.py), no Ray: requests checked
into generate's SamplingParams, OpenAI's error shape, answers and stream chunks; the API
key's file and the host check of serving/deploy.py."""

from __future__ import annotations

import json
import stat

import pytest

from lmforge.serving import api, deploy
from lmforge.serving.api import (
    Answer,
    ApiError,
    ChatRequest,
    CompletionRequest,
    parse,
    sampling_params,
)
from lmforge.serving.versions import ServeError, served_name


def completion(**kw) -> CompletionRequest:
    return parse(CompletionRequest, {"model": "m", "prompt": "hi", **kw})


def test_parameters_map_to_generates_sampling():
    p = sampling_params(completion(max_tokens=7, temperature=0, top_p=0.5, n=2, stop="\n",
                                   seed=3, logprobs=2, repetition_penalty=1.3, top_k=5,
                                   presence_penalty=0.5, frequency_penalty=-1))  # fmt: skip
    assert (p.max_new_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed) == (
        7,
        0,
        0.5,
        2,
        ("\n",),
        3,
    )
    assert (p.logprobs, p.repetition_penalty, p.top_k) == (2, 1.3, 5)
    assert (p.presence_penalty, p.frequency_penalty) == (0.5, -1)
    d = sampling_params(completion())  # OpenAI's defaults
    assert (d.max_new_tokens, d.temperature, d.top_p, d.top_k, d.logprobs) == (
        16,
        1.0,
        None,
        None,
        None,
    )
    chat = parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}],
                               "max_completion_tokens": 4, "logprobs": True, "top_logprobs": 3})  # fmt: skip
    c = sampling_params(chat, default_max=99)
    assert (c.max_new_tokens, c.logprobs) == (4, 3)
    assert sampling_params(parse(ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                           default_max=99).max_new_tokens == 99  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"bogus": 1}, "bogus"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logprobs": 21}, "logprobs"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"prompt": None}, "prompt"),
    ],
)
def test_unknown_or_invalid_parameters_are_400_naming_them(body, param):
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, {"model": "m", "prompt": "hi", **body})
    assert e.value.status == 400 and e.value.param == param
    err = e.value.body()["error"]
    assert (
        set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [({"logit_bias": {"1": 2}}, "logit_bias"), ({"echo": True}, "echo"),
     ({"best_of": 3}, "best_of")],
)  # fmt: skip
def test_parameters_without_an_exact_equivalent_are_refused(body, param):
    with pytest.raises(ApiError) as e:
        sampling_params(completion(**body))
    assert e.value.status == 400 and e.value.param == param


def test_n_above_the_batch_and_a_missing_model_and_top_logprobs_without_logprobs():
    with pytest.raises(ApiError, match="--max-batch 4"):
        sampling_params(completion(n=5), max_batch=4)
    with pytest.raises(ApiError) as e:
        parse(CompletionRequest, {"prompt": "x"})
    assert e.value.param == "model" and e.value.code == "missing_required_parameter"
    chat = parse(
        ChatRequest,
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    )
    with pytest.raises(ApiError, match="needs logprobs"):
        sampling_params(chat)


def test_a_prompt_longer_than_the_context_names_both_lengths():
    api.check_length(63, 64, "m")
    with pytest.raises(ApiError) as e:
        api.check_length(70, 64, "m")
    assert "64" in e.value.message and "70" in e.value.message and e.value.status == 400


def test_prompts_and_messages():
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert completion(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    chat = parse(ChatRequest, {"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
    ]})  # fmt: skip
    assert chat.conversation() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    ]


def events(index: int, pieces: list[str], finish: str):
    for i, text in enumerate(pieces):
        last = i == len(pieces) - 1
        yield {"index": index, "text": text, "token_text": text, "logprob": -0.5,
               "top": [(text, -0.5), ("x", -2.0)], "finish": finish if last else None}  # fmt: skip


def test_a_completion_answer_sums_its_events():
    req = completion(n=2, logprobs=2)
    a = Answer(req, "m@best", 2)
    a.prompt_tokens = 3
    for e in [*events(0, ["Hel", "lo"], "stop_string"), *events(1, ["a", "b", "c"], "length")]:
        a.add(e)
    body = a.body()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert [c["text"] for c in body["choices"]] == ["Hello", "abc"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    lp = body["choices"][0]["logprobs"]
    assert lp["tokens"] == ["Hel", "lo"] and lp["text_offset"] == [0, 3]
    assert lp["top_logprobs"][0] == {"Hel": -0.5, "x": -2.0}


def test_chat_chunks_carry_the_role_first_and_sse_ends_with_done():
    req = parse(
        ChatRequest, {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
    )
    a = Answer(req, "m", 1)
    first, second = events(0, ["Hi", "!"], "stop_token")
    c1, c2 = a.chunk(first, True), a.chunk(second)
    assert c1["object"] == "chat.completion.chunk" and c1["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "Hi",
    }
    assert (
        c2["choices"][0]["delta"] == {"content": "!"}
        and c2["choices"][0]["finish_reason"] == "stop"
    )
    assert c1["choices"][0]["logprobs"] is None  # not asked for
    assert api.sse(c1).startswith("data: {") and api.sse("[DONE]") == "data: [DONE]\n\n"
    assert json.loads(api.sse(c1)[6:]) == c1


def test_the_api_key_is_generated_once_owner_only(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.delenv(deploy.KEY_ENV, raising=False)
    assert deploy.api_key() is None
    key = deploy.api_key(create=True)
    assert key.startswith("lmf-") and len(key) > 30
    assert stat.S_IMODE(deploy.key_file().stat().st_mode) == 0o600
    assert deploy.api_key(create=True) == key
    monkeypatch.setenv(deploy.KEY_ENV, "from-env")
    assert deploy.api_key() == "from-env"


def test_a_public_host_needs_a_key_and_options_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.delenv(deploy.KEY_ENV, raising=False)
    assert (
        deploy.is_loopback("127.0.0.1")
        and deploy.is_loopback("localhost")
        and deploy.is_loopback("::1")
    )
    assert not deploy.is_loopback("0.0.0.0")
    with pytest.raises(ServeError, match="not a loopback address"):
        deploy.up(["models:/x@best"], host="0.0.0.0")
    assert not deploy.key_file().exists()
    with pytest.raises(ServeError, match="give one of them"):
        deploy.check_options(1, 8000, 8, 1, 1)
    with pytest.raises(ServeError, match="--replicas"):
        deploy.check_options(0, 8000, 8, None, None)
    with pytest.raises(ServeError, match="--dtype float16: use one of fp32, bf16, fp16, auto"):
        deploy.up(["models:/x@best"], dtype="float16")  # before the registry or Ray
    assert (
        served_name("models:/tiny@best") == "tiny@best"
        and served_name("models:/tiny/3") == "tiny/3"
    )
