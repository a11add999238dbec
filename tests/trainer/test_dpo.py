"""Preference tuning on 2 local ranks (no Ray), through the product's `run_training`.

The learning check: a tiny model first fine-tuned (SFT) on prompts "red N" -> "yes" and
"blue N" -> "no" (answers split evenly between two completions) picks "yes" greedily for
about half of held-out prompts; DPO on pairs (chosen "yes", rejected "no") moves it to
"yes" for >= 90% of them, and the val `rewards/accuracies` rises above 0.9. The
reference's log-probs are computed once and cached beside the dataset; the launch refuses
DPO without --init-from or on data that is not pairs, in one line, before any worker."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmforge import checkpoint as ckpt_io
from lmforge import templates
from lmforge.data import sft
from lmforge.data.prepare import PrepareOptions, split_and_write_sft
from lmforge.errors import ConfigError
from lmforge.preference.reference import CACHE_DIR
from lmforge.tokenizer import EOT, train_tokenizer
from lmforge.tracking import store
from tests.preference_data import pairs_dataset, write_rows
from tests.trainer.conftest import tiny_config, train

TEMPLATE = "instruct"
HELD_OUT = [f"{c} {n}" for n in range(300, 330) for c in ("red", "blue")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(SFT dataset, preference dataset), one tokenizer."""
    root = tmp_path_factory.mktemp("dpo")
    prompts = [f"{c} {n}" for n in range(150) for c in ("red", "blue")]
    t = templates.get(TEMPLATE, eos_token=EOT)
    texts = [t.render(templates.to_messages({"prompt": p, "completion": a}))
             for p in prompts + HELD_OUT for a in ("yes", "no")]  # fmt: skip
    tok = train_tokenizer(texts, 300)
    # SFT: the answer follows the colour, so half the prompts end in each completion.
    sft_dir = root / "sft"
    sft_dir.mkdir()
    tok.save(str(sft_dir / "tokenizer.json"))
    examples = [
        sft.encode(tok, t, templates.to_messages(
            {"prompt": p, "completion": "yes" if p.startswith("red") else "no"}), 64)
        for p in prompts
    ]  # fmt: skip
    opts = PrepareOptions(format="sft", template=TEMPLATE, seq_tokens=64, rows_per_group=8,
                          val_fraction=0.1)  # fmt: skip
    split_and_write_sft(iter(examples), sft_dir, tok, opts, [], t)
    random.Random(0).shuffle(prompts)
    rows = [{"prompt": p, "chosen": "yes", "rejected": "no"} for p in prompts]
    pref, _ = pairs_dataset(root / "pairs", write_rows(root / "pairs.jsonl", rows), TEMPLATE,
                            tok=tok, rows_per_group=8, val_fraction=0.15)  # fmt: skip
    return sft_dir, pref.path, tok


def picks_chosen(ckpt, tok) -> float:
    """The share of held-out prompts whose greedy next token after the prompt is "yes"'s."""
    model, _, _ = ckpt_io.load_model(ckpt)
    model.eval()
    t = templates.get(TEMPLATE, eos_token=EOT)
    yes = tok.encode(t.render(templates.to_messages({"prompt": "red 1", "completion": "yes"})))
    prompt = tok.encode(
        t.render([{"role": "user", "content": "red 1"}], add_generation_prompt=True)
    )
    first_yes = yes.ids[len(prompt.ids)]  # the answer's first token
    n = 0
    with torch.no_grad():
        for p in HELD_OUT:
            ids = tok.encode(
                t.render([{"role": "user", "content": p}], add_generation_prompt=True)
            ).ids
            logits, _ = model(torch.tensor([ids]))
            n += int(logits[0, -1].argmax()) == first_yes
    return n / len(HELD_OUT)


def dpo_config(dataset, name, *overrides):
    return tiny_config(
        dataset, name, "train.objective=dpo", "train.max_steps=16", "train.micro_batch_size=2",
        "train.warmup_steps=0", "train.lr=2e-3", "train.min_lr=2e-3", "train.eval_every=16",
        "train.checkpoint_every=16", "train.eval_steps=4", "train.dpo.beta=0.2", *overrides,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sft_base(data):
    """The SFT run the preference runs start from (their reference)."""
    sft_dir, _, _ = data
    return train(tiny_config(sft_dir, "dpo-sft", "train.max_steps=40", "train.eval_every=40",
                             "train.checkpoint_every=40", "train.warmup_steps=0"))  # fmt: skip


def test_dpo_learns_the_preference(data, sft_base):
    sft_dir, pref, tok = data
    base = sft_base
    before = picks_chosen(base.checkpoint, tok)
    assert 0.3 <= before <= 0.7, before  # the colour decides: about half say "yes"
    result = train(dpo_config(pref, "dpo-run"), init_from=str(base.checkpoint))
    after = picks_chosen(result.checkpoint, tok)
    last = result.history[-1]
    print(f"held-out prompts answered with the chosen completion: {before:.0%} after SFT, "
          f"{after:.0%} after DPO; val rewards/accuracies {last['val_rewards/accuracies']:.2f}")  # fmt: skip
    assert after >= 0.9, (before, after)
    assert last["val_rewards/accuracies"] > 0.9
    steps = [m for m in result.history if "loss" in m]
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected"):  # fmt: skip
        assert k in steps[-1], k
    assert steps[-1]["rewards/margins"] > 0 and steps[-1]["loss"] < steps[0]["loss"]
    # The reference's log-probs: computed once, cached by weights + manifest hash.
    cached = list((pref / CACHE_DIR).glob("*.pt"))
    assert len(cached) == 1
    sha = ckpt_io.weights_sha256(result.run_dir / "init_from")
    assert cached[0].name.startswith(sha[:16])
    tags = json.loads((result.run_dir / "preference.json").read_text())
    assert tags["objective"] == "dpo" and tags["reference"].endswith(sha[:12])
    # Lineage on the MLflow run and on every version it registered.
    c = store.client(store.resolve_uri())
    assert c.get_run(result.mlflow_run_id).data.tags["objective"] == "dpo"
    versions = c.search_model_versions(f"run_id='{result.mlflow_run_id}'")
    assert versions
    for v in versions:
        assert v.tags["objective"] == "dpo" and v.tags["reference"] == tags["reference"]
        assert v.tags["parent"] == tags["parent"]


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("ipo-zero3", ["zero.stage=3", "train.dpo.loss=ipo", "train.dpo.beta=0.5"]),
        ("lora-zero2", ["train.lora.r=4", "train.lr=1e-2", "train.min_lr=1e-2"]),
    ],
)
def test_ipo_at_zero3_and_lora_reference_without_a_table(data, sft_base, name, overrides):
    """IPO at ZeRO 3 (the reference pass in lockstep over the sharded weights), and LoRA,
    whose reference is the base with its adapters off (no table): both learn the pairs."""
    _, pref, _ = data
    result = train(dpo_config(pref, f"dpo-{name}", "train.max_steps=8", "train.eval_every=8",
                              "train.checkpoint_every=8", *overrides),
                   init_from=str(sft_base.checkpoint))  # fmt: skip
    steps = [m for m in result.history if "loss" in m]
    first, last = steps[0], result.history[-1]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)  # policy == reference
    assert last["val_rewards/margins"] > 0 and last["val_rewards/accuracies"] > 0.9
    assert last["loss"] < first["loss"]


def test_dpo_resumes_exactly(data, sft_base):
    """Stopped at step 3 and resumed to 6 (the reference's table read back from its cache,
    the pair stream from its position): the same fp32 weights as 6 steps in one go."""
    _, pref, _ = data
    common = ["train.eval_every=3", "train.checkpoint_every=3", "train.eval_steps=1"]
    init = str(sft_base.checkpoint)
    whole = train(dpo_config(pref, "dpo-whole", "train.max_steps=6", *common), init_from=init)
    train(dpo_config(pref, "dpo-resumed", "train.max_steps=3", *common), init_from=init)
    resumed = train(dpo_config(pref, "dpo-resumed", "train.max_steps=6", *common), resume=True)
    a = ckpt_io.load_model(whole.checkpoint)[0].state_dict()
    b = ckpt_io.load_model(resumed.checkpoint)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed.run_dir / "preference.json").read_text())["objective"] == "dpo"


def test_dpo_refused_before_any_worker(data):
    sft_dir, pref, _ = data
    with pytest.raises(ConfigError, match="train.objective=dpo: .*--init-from"):
        train(dpo_config(pref, "dpo-no-init"))
    with pytest.raises(ConfigError, match="not preference pairs"):
        train(dpo_config(sft_dir, "dpo-sft-data"), init_from=str(sft_dir))
