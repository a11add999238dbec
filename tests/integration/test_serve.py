"""`lmforge serve up` on the session's Ray cluster, spoken to with the official `openai`
client: completions and chat, streamed and not, n, stop, logprobs; 401, 400 and 404 in
OpenAI's error shape; greedy answers equal `lmforge generate --top-k 1`; a base and two
LoRA versions on one replica, each its own output also in one batch; a bounded concurrent
load with every answer checked; a rolling update under load that drops no request.

The versions are made, not trained: a random transformers GPT-2 imported as a version
(`import_hf`), and two random LoRA adapters on it registered as versions of their own (one
carrying the `chat` template), as tests/unit/test_lora_export.py builds them. One
application is deployed for the module and shared by every test."""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import transformers

from lmforge import checkpoint as ckpt_io
from lmforge import lora, paths, templates
from lmforge.config import LoraConfig
from lmforge.generation import Sample, SamplingParams, complete_samples
from lmforge.import_hf import import_hf
from lmforge.perf import inference_dtype
from lmforge.services import free_port
from lmforge.tokenizer import EOT, eot_id, train_tokenizer
from lmforge.tracking import registry, store
from tests.integration.conftest import cli_env

TEXT = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
] * 8
PROMPT = "To be, or not"
BASE, LORA_A, LORA_B = "serve-base", "serve-lora-a", "serve-lora-b"
# Log-prob gap under which two tokens are a near-tie: ~4x the largest bf16 - fp32 log-prob
# difference of the base model here (0.0024); fp32's rounding is ~1e-6.
NEAR_TIE = {torch.bfloat16: 0.01, torch.float16: 0.01, torch.float32: 1e-4}


def hf_gpt2(folder, tok, seed: int):
    eos = tok.token_to_id(EOT)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32,
                                  n_layer=2, n_head=2, bos_token_id=eos, eos_token_id=eos)  # fmt: skip
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def register_adapter(base_uri: str, name: str, seed: int, work, template=None) -> str:
    """A LoRA version with random non-zero adapters on `base_uri`; its URI."""
    base = registry.fetch_checkpoint(base_uri)
    cfg = ckpt_io.read_config(base)
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"lora": LoraConfig(r=4, alpha=8)})}
    )
    model, _, _ = ckpt_io.load_model(base)
    lora.add_adapters(model, lora.settings_of(cfg.train.lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.normal_(std=0.3)
    out = work / name
    ref = ckpt_io.BaseRef(base_uri, str(base), ckpt_io.weights_sha256(base))
    ckpt_io.save_adapter(out, lora.adapter_state_dict(model), cfg, base / "tokenizer.json",
                         ckpt_io.TrainerState(1), ref)  # fmt: skip
    ckpt_io.save_template(out, template)
    ckpt_io.seal(out)
    uri = store.resolve_uri()
    client = store.client(uri)
    run = client.create_run(store.ensure_experiment(client, name, uri), run_name=name)
    staged = registry.stage_servable(out, work / f"{name}-staged")
    with registry.fluent_uri(uri):
        v = registry.register_checkpoint(client, run.info.run_id, staged, name,
                                         {"step": "1", "run_id": run.info.run_id}, "test adapter")  # fmt: skip
    client.set_terminated(run.info.run_id)
    return f"models:/{name}/{v.version}"


def lmforge_cli(*args, timeout=300, check=True):
    out = subprocess.run([sys.executable, "-m", "lmforge.cli", *map(str, args)], capture_output=True,
                         text=True, env=cli_env(paths.home()), timeout=timeout)  # fmt: skip
    if check:
        assert out.returncode == 0, f"lmforge {args[:2]}: {out.stderr[-3000:]}"
    return out


class Served:
    def __init__(self, work) -> None:
        self.work = work
        self.tok = train_tokenizer(TEXT, vocab_size=300)
        self.base_uri = (
            f"models:/{BASE}/{import_hf(hf_gpt2(work / 'hf1', self.tok, 0), BASE).version}"
        )
        chat = templates.get("chat", eos_token=EOT)
        self.a_uri = register_adapter(self.base_uri, LORA_A, 1, work, chat)
        self.b_uri = register_adapter(self.base_uri, LORA_B, 2, work)
        self.port = free_port()
        self.models = [f"models:/{BASE}@latest", self.a_uri, f"models:/{LORA_B}@latest"]
        self.up_out = self.up()
        self.key = (paths.home() / "serve_api_key").read_text().strip()
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(
            base_url=self.url + "/v1", api_key=self.key, max_retries=0, timeout=120
        )
        self.names = {BASE: f"{BASE}@latest", LORA_A: self.a_uri.removeprefix("models:/"),
                      LORA_B: f"{LORA_B}@latest"}  # fmt: skip

    def up(self) -> str:
        args = ["serve", "up", "--port", self.port, "--max-batch", 8, "--cpus-per-replica", 0.5,
                "--tracking-uri", store.resolve_uri()]  # fmt: skip
        for m in self.models:
            args += ["--model", m]
        return lmforge_cli(*args).stdout

    @functools.cache  # noqa: B019 - one per module
    def loaded(self, uri: str):
        dtype = inference_dtype("auto", torch.device("cpu"))  # the server's default
        return ckpt_io.load_model(registry.fetch_checkpoint(uri), dtype=dtype)

    def reference(self, uri: str, prompt: str, max_tokens: int) -> str:
        """The greedy continuation of the same code in this process (checks the load test)."""
        return self.reference_sample(uri, prompt, max_tokens).text

    @functools.cache  # noqa: B019 - one per module
    def reference_sample(self, uri: str, prompt: str, max_tokens: int) -> Sample:
        """`reference` with each step's two most likely tokens and their log-probs."""
        model, tok, _ = self.loaded(uri)
        ids = tok.encode(prompt, add_special_tokens=False).ids
        p = SamplingParams(
            max_new_tokens=max_tokens, temperature=0, stop_token=eot_id(tok), logprobs=2
        )
        return complete_samples(model, tok, ids, p)[0]

    def greedy_as_alone(self, got: str, uri: str, prompt: str, max_tokens: int) -> bool:
        """Whether `got`, answered in a batch, is the greedy continuation run alone: the
        same text, or the same up to a step whose two most likely tokens are within
        NEAR_TIE (a batch's kernels round differently from one row's; in bf16 that flips
        near-ties of this random model, whose log-probs spread by ~0.1)."""
        ref = self.reference_sample(uri, prompt, max_tokens)
        if got == ref.text:
            return True
        model, tok, _ = self.loaded(uri)
        near = NEAR_TIE[next(model.parameters()).dtype]
        margins = [c.top[0][1] - c.top[1][1] for c in ref.tokens]
        tie = next((i for i, m in enumerate(margins) if m < near), None)
        if tie is None:
            return False
        ids = [c.token for c in ref.tokens[:tie]]
        return got.startswith(tok.decode(ids).rstrip("\ufffd"))


@pytest.fixture(scope="module")
def served(ray_cluster):
    work = paths.home() / "serve-test"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    s = Served(work)
    yield s
    out = lmforge_cli("serve", "down", check=False)
    assert out.returncode == 0, out.stderr[-2000:]


def generate(uri: str, prompt: str, tokens: int, template: str = "none") -> str:
    """`lmforge generate --top-k 1`'s continuation (its stdout is the prompt, then it), in
    the dtype the server runs by default (auto: bf16 on a CPU with avx512_bf16/AMX)."""
    out = lmforge_cli("generate", "--model", uri, "--prompt", prompt, "--top-k", 1, "--dtype", "auto",
                      "--max-new-tokens", tokens, "--template", template, "--tracking-uri", store.resolve_uri())  # fmt: skip
    return out.stdout


def test_up_prints_the_url_and_lists_the_versions(served):
    assert f"{served.url}/v1" in served.up_out
    ids = sorted(m.id for m in served.client.models.list().data)
    assert ids == sorted(served.names.values())


def test_greedy_completions_equal_generate_for_the_base_and_both_adapters_in_one_batch(served):
    """Three requests at once (one batch: base, adapter a, adapter b), each equal to
    `lmforge generate --top-k 1` of its own version; the adapters change the output."""
    uris = {BASE: served.base_uri, LORA_A: served.a_uri, LORA_B: served.b_uri}
    with ThreadPoolExecutor(6) as pool:
        expected = {k: pool.submit(generate, u, PROMPT, 12) for k, u in uris.items()}
        answers = {k: pool.submit(served.client.completions.create, model=served.names[k],
                                  prompt=PROMPT, max_tokens=12, temperature=0) for k in uris}  # fmt: skip
        expected = {k: f.result() for k, f in expected.items()}
        answers = {k: f.result() for k, f in answers.items()}
    for k in uris:
        a = answers[k]
        assert expected[k].endswith(PROMPT + a.choices[0].text + "\n"), k
        assert a.usage.prompt_tokens == len(served.tok.encode(PROMPT).ids)
        assert a.usage.completion_tokens > 0 and a.choices[0].finish_reason in ("length", "stop")
    assert len({a.choices[0].text for a in answers.values()}) == 3


def test_chat_uses_the_versions_template_and_streams_the_same_text(served):
    name = served.names[LORA_A]
    msgs = [{"role": "user", "content": PROMPT}]
    whole = served.client.chat.completions.create(
        model=name, messages=msgs, max_tokens=10, temperature=0
    )
    text = whole.choices[0].message.content
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    rendered = templates.get("chat", eos_token=EOT).render(msgs, True)
    assert generate(served.a_uri, PROMPT, 10, template="own").endswith(rendered + text + "\n")
    chunks = list(served.client.chat.completions.create(
        model=name, messages=msgs, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == text and len(deltas) > 1  # piece by piece
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_stop_and_logprobs(served):
    name = served.names[BASE]
    r = served.client.completions.create(model=name, prompt=PROMPT, max_tokens=8, n=3,
                                         temperature=1.0, seed=3, logprobs=2)  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    for c in r.choices:
        lp = c.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        assert all(len(t) <= 2 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    assert r.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in r.choices)
    free = served.client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
    cut = free.choices[0].text[3:6]
    stopped = served.client.completions.create(
        model=name, prompt=PROMPT, max_tokens=12, temperature=0, stop=[cut]
    )
    assert stopped.choices[0].text == free.choices[0].text[: free.choices[0].text.index(cut)]
    assert stopped.choices[0].finish_reason == "stop"
    chat = served.client.chat.completions.create(
        model=served.names[LORA_A], messages=[{"role": "user", "content": "To be"}], max_tokens=4,
        temperature=0, logprobs=True, top_logprobs=3,
    )  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(
        len(t.top_logprobs) == 3 for t in content
    )


def test_errors_in_openai_shape(served):
    bad_key = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad_key.models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        served.client.completions.create(model="nope@best", prompt="x", max_tokens=2)
    assert (
        e.value.body["code"] == "model_not_found" and "serve-base@latest" in e.value.body["message"]
    )
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(
            model=served.names[BASE], prompt="x", extra_body={"bogus": 1}
        )
    assert e.value.body["param"] == "bogus" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model=served.names[BASE], prompt="x", temperature=3)
    assert e.value.body["param"] == "temperature"
    long = " ".join(["To be, or not to be"] * 30)
    n = len(served.tok.encode(long).ids)
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model=served.names[BASE], prompt=long, max_tokens=2)
    assert "64" in e.value.body["message"] and str(n) in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(
            model=served.names[BASE], messages=[{"role": "user", "content": "x"}]
        )
    assert "no chat template" in e.value.body["message"]


def test_bounded_concurrent_load_answers_every_request_its_own(served):
    prompts = [" ".join(TEXT[0].split()[: 2 + i % 7]) for i in range(16)]
    names = [BASE, LORA_A, LORA_B]
    uris = {BASE: served.base_uri, LORA_A: served.a_uri, LORA_B: served.b_uri}
    jobs = [(names[i % 3], p) for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: served.client.completions.create(
            model=served.names[j[0]], prompt=j[1], max_tokens=8, temperature=0).choices[0].text, jobs))  # fmt: skip
    expected = [served.reference(uris[k], p, 8) for k, p in jobs]
    wrong = [(j, g, e) for j, g, e in zip(jobs, got, expected, strict=True)
             if not served.greedy_as_alone(g, uris[j[0]], j[1], 8)]  # fmt: skip
    assert wrong == []
    # near-ties are rare: most answers are exactly the reference's (a mix-up changes them all)
    assert sum(g == e for g, e in zip(got, expected, strict=True)) >= len(jobs) * 3 // 4


def test_rolling_update_under_load_drops_no_request_and_moves_the_alias(served):
    """A new base version (latest moves to it); `serve up` again with the same models rolls
    the deployments while 3 clients keep asking; every request is answered."""
    new = import_hf(hf_gpt2(served.work / "hf2", served.tok, 7), BASE).version
    new_uri = f"models:/{BASE}/{new}"
    want_new = served.reference(new_uri, PROMPT, 6)
    assert want_new != served.reference(served.base_uri, PROMPT, 6)
    stop, failures, answered = threading.Event(), [], []

    def client_loop():
        while not stop.is_set():
            try:
                r = served.client.completions.create(
                    model=served.names[BASE], prompt=PROMPT, max_tokens=6, temperature=0
                )
                answered.append(r.choices[0].text)
            except Exception as err:  # noqa: BLE001 - any failure is a dropped request
                failures.append(repr(err))

    threads = [threading.Thread(target=client_loop) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        out = served.up()
    finally:
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == [] and len(answered) > 3
    assert new_uri in out
    r = served.client.completions.create(
        model=served.names[BASE], prompt=PROMPT, max_tokens=6, temperature=0
    )
    assert r.choices[0].text == want_new
    status = lmforge_cli("serve", "status").stdout
    assert f"{BASE}/{new}" in status and "RUNNING" in status and "dtype auto" in status
    line = next(ln for ln in status.splitlines() if ln.startswith(f"{BASE}@latest"))
    assert int(line.split()[2]) >= 1  # requests since the roll, counted
