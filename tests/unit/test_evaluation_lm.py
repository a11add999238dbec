"""Our lm-evaluation-harness `LM` against the harness's own `HFLM` (issue 26): a random
GPT-2 and a random Llama from transformers' classes, saved as Hugging Face folders and
imported by lmforge (`import_hf`), give the same per-example log-likelihoods (< 1e-4) and the
same greedy generations on generative, multiple-choice, loglikelihood and rolling
(perplexity) tasks run through `lm_eval.simple_evaluate`."""

import json
import shutil

import lm_eval
import pytest
import torch
import transformers
from lm_eval.models.huggingface import HFLM

from lmforge.evaluation import check_tasks
from lmforge.evaluation.lm import LmforgeLM
from lmforge.evaluation.tasks import task_manager
from lmforge.import_hf import read_folder, write_checkpoint
from lmforge.tokenizer import eot_id, load_tokenizer, train_tokenizer
from tests.unit import evaltasks

TEXT = [
    "to be or not to be, that is the question; whether tis nobler in the mind to suffer",
    "the slings and arrows of outrageous fortune, or to take arms against a sea of troubles",
] * 20


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXT, vocab_size=300).save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def hf_model(arch: str, vocab: int, eot: int):
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2,
                                      n_head=4, bos_token_id=eot, eos_token_id=eot,
                                      initializer_range=0.2)  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False, bos_token_id=eot,
                                   eos_token_id=eot, initializer_range=0.2)  # fmt: skip
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_folder(out, arch, tokenizer_file):
    tok = load_tokenizer(tokenizer_file)
    hf_model(arch, tok.get_vocab_size(), eot_id(tok)).save_pretrained(out)
    shutil.copyfile(tokenizer_file, out / "tokenizer.json")
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    (out / "tokenizer_config.json").write_text(json.dumps(tc))
    return out


def task_files(d):
    words = TEXT[0].split() + TEXT[1].split()
    rows = []
    for i in range(8):
        w = words[i : i + 4 + i % 3]
        rows.append({"prompt": " ".join(w[:-1]) + " =", "completion": " " + w[-1],
                     "choices": [" " + w[-1], " sea", " to be"], "label": i % 3,
                     "text": " ".join(words[i:] * (1 + i % 3))})  # fmt: skip
    data = evaltasks.write_rows(d / "rows.jsonl", rows)
    return [
        evaltasks.generative(d, "gen", data, max_gen=10, until=(".", ";")),
        evaltasks.multiple_choice(d, "mc", data),
        evaltasks.loglikelihood(d, "ll", data),
        evaltasks.rolling(d, "ppl", data),  # some texts longer than the 64-token context
    ]


def run(lm, sources):
    return lm_eval.simple_evaluate(
        model=lm, tasks=[s.name for s in sources], task_manager=task_manager(sources),
        log_samples=True, bootstrap_iters=0,
    )  # fmt: skip


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_our_lm_gives_the_harness_hflm_loglikelihoods_and_greedy_generations(
    tmp_path, tokenizer_file, arch
):
    folder = hf_folder(tmp_path / "hf", arch, tokenizer_file)
    write_checkpoint(read_folder(folder), tmp_path / "ckpt", "unit")
    sources = check_tasks([str(f) for f in task_files(tmp_path)])
    ours = run(LmforgeLM.from_checkpoint(tmp_path / "ckpt", template="none", batch_size=3),
               sources)  # fmt: skip
    # HFLM one request at a time: batched, its rolling windows' sums move with the batch's
    # other requests (by up to 3.5 nats here; ours do not), so batch 1 is the reference.
    theirs = run(HFLM(pretrained=str(folder), device="cpu", batch_size=1), sources)
    generated = set()
    for task in ("gen", "mc", "ll", "ppl"):
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) == 8
        for x, y in zip(a, b, strict=True):
            assert x["doc_id"] == y["doc_id"]
            for got, want in zip(x["resps"], y["resps"], strict=True):
                got, want = got[0], want[0]
                if task == "gen":
                    assert got == want, (x["arguments"], got, want)
                    generated.add(got)
                elif task == "ppl":
                    assert abs(got - want) < 1e-4, (got, want)
                else:
                    assert abs(got[0] - want[0]) < 1e-4 and got[1] == want[1], (got, want)
    assert len(generated) > 1  # not one degenerate answer for every prompt
    for task in ("gen", "mc", "ll", "ppl"):
        for key, value in theirs["results"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert ours["results"][task][key] == pytest.approx(value, rel=1e-5), key
