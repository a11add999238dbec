"""Fine-tuning an imported Hugging Face model: a random transformers GPT-2 (the tokenizer of
the session's dataset), imported and registered, a corpus prepared with the tokenizer of
that version, then `train --init-from models:/NAME/1` with 2 workers under ZeRO 2: the
val loss falls and every new version names its parent."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from lmforge.data.prepare import PrepareOptions, prepare
from lmforge.evaluate import evaluate_checkpoint
from lmforge.import_hf import import_hf
from lmforge.tracking import registry, store
from tests.trainer.conftest import tiny_config, train

transformers = pytest.importorskip("transformers")
NAME = "it-imported-gpt2"


def test_a_fine_tune_from_an_imported_version_learns_and_names_its_parent(
    ray_cluster, dataset, corpus, tmp_path, plain_main
):
    from lmforge.tokenizer import load_tokenizer

    vocab = load_tokenizer(dataset / "tokenizer.json").get_vocab_size()
    cfg = transformers.GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=64, n_layer=2, n_head=2, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "gpt2-random"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    shutil.copyfile(dataset / "tokenizer.json", folder / "tokenizer.json")
    version = import_hf(folder, NAME)
    parent = f"models:/{NAME}/{version.version}"
    ckpt = registry.fetch_checkpoint(parent)

    # The corpus, tokenized with the imported version's own tokenizer.
    data = tmp_path / "plays-imported"
    prepare(
        [corpus],
        data,
        PrepareOptions(seq_tokens=128, rows_per_group=4, tokenizer=ckpt / "tokenizer.json"),
    )
    before = evaluate_checkpoint(ckpt, data, batch_size=8, max_batches=4)["val_loss"]
    assert abs(before - math.log(vocab)) < 1.0  # a random model: about uniform

    run = tiny_config(
        data, "finetune-imported", "train.max_steps=20", "train.checkpoint_every=10",
        "train.eval_every=10", "train.warmup_steps=0", "zero.stage=2", "scaling.num_workers=2",
        f"tracking.experiment={NAME}-ft", f"tracking.registered_model={NAME}-ft",
    )  # fmt: skip
    result = train(run, init_from=parent)
    c = store.client(store.resolve_uri())
    history = sorted(c.get_metric_history(result.mlflow_run_id, "val_loss"), key=lambda m: m.step)
    assert history[0].step == 0 and history[-1].step == 20
    assert history[-1].value < history[0].value - 0.5
    assert c.get_run(result.mlflow_run_id).data.tags["lmforge.init_from"] == parent
    versions = c.search_model_versions(f"name='{NAME}-ft'")
    assert sorted(int(v.tags["step"]) for v in versions) == [10, 20]
    assert {v.tags["parent"] for v in versions} == {parent}
