"""Evaluation of every checkpoint beside training (issue 26), the learning check: a
fine-tune on the copy task (tests/sft_task.py; the answer its last word 4 times) with `eval.tasks` = a generative copy task
(exact match, BLEU) and its multiple-choice variant built here, in lm-evaluation-harness's
YAML. Each checkpoint's version carries the scores, the run has them as metrics at the
checkpoints' steps, the probes' answers are a table on each version, `best` follows
`eval.select` (the copy task's exact match), and the fine-tuned checkpoints score far
higher than the untrained base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import models
from lmforge.checkpoint import TrainerState, read_config, save_servable, seal
from lmforge.evaluation import check_tasks, evaluate
from lmforge.tracking import registry, store
from tests.sft_task import WORDS, copy_datasets, copy_rows
from tests.trainer.conftest import tiny_config, train
from tests.unit import evaltasks

MODEL = "it-eval-copy"
REPEAT = 4  # the answer is the last word 4 times: long enough for BLEU's 4-grams
STEPS, EVERY = 90, 30


def task_files(d):
    rows = []
    for i, r in enumerate(copy_rows(40, seed=7, repeat=REPEAT)):  # not the training rows
        others = [w for w in WORDS if f" {w}" * REPEAT != r["completion"]][i % 30 : i % 30 + 2]
        choices = [r["completion"], *(f" {w}" * REPEAT for w in others)]
        label = i % 3
        choices[0], choices[label] = choices[label], choices[0]
        rows.append({**r, "choices": choices, "label": label})
    data = evaltasks.write_rows(d / "copy.jsonl", rows)
    gen = evaltasks.generative(d, "copy", data, max_gen=8, metrics=("exact_match", "bleu"))
    mc = evaltasks.multiple_choice(d, "copy_mc", data)
    probes = d / "probes.txt"
    probes.write_text("red blue green =\nsun moon =\n")
    return gen, mc, probes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval-copy")
    ds, _ = copy_datasets(d / "data", n=1000, repeat=REPEAT)
    gen, mc, probes = task_files(d)
    cfg = tiny_config(
        ds.path, "eval-copy", f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}",
        f"train.eval_every={EVERY}", "train.micro_batch_size=16", "train.warmup_steps=10",
        "train.log_every=25", "tracking.experiment=it-eval", f"tracking.registered_model={MODEL}",
        f"eval.tasks=[{gen}, {mc}]", "eval.select=copy/exact_match", f"eval.probes={probes}",
        "eval.probe_samples=1", "eval.probe_max_new_tokens=8",
    )  # fmt: skip
    handed = []  # run_training's on_eval_scores (a sweep's hook to Tune) on a local run
    result = train(cfg, on_eval_scores=lambda step, scores: handed.append((step, scores)))
    return cfg, result, (gen, mc), d, handed


def _versions():
    c = store.client(store.resolve_uri())
    return c, sorted(c.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))


def test_every_checkpoint_version_carries_its_scores_and_best_follows_the_task(run):
    cfg, result, _, _, handed = run
    c, versions = _versions()
    assert [int(v.tags["step"]) for v in versions] == [EVERY, 2 * EVERY, STEPS]
    for v in versions:
        assert "eval.warning" not in v.tags, v.tags["eval.warning"]
        for key in ("eval.copy.exact_match", "eval.copy.bleu", "eval.copy_mc.acc"):
            assert 0.0 <= float(v.tags[key]) <= 100.0, (key, v.tags)
        step = int(v.tags["step"])
        for key in ("eval/copy/exact_match", "eval/copy_mc/acc"):
            got = {m.step: m.value for m in c.get_metric_history(result.mlflow_run_id, key)}
            assert got[step] == pytest.approx(float(v.tags[key.replace("/", ".")])), key
        table = json.loads(Path(c.download_artifacts(v.run_id, v.tags["eval.probes"])).read_text())
        rows = dict(zip(table["columns"], zip(*table["data"], strict=True), strict=True))
        assert rows["prompt"] == ("red blue green =",) * 2 + ("sun moon =",) * 2
        assert rows["kind"] == ("greedy", "sample 1") * 2
    # on_eval_scores got each checkpoint's scores as its version got them
    assert [step for step, _ in handed] == [int(v.tags["step"]) for v in versions]
    for (_, scores), v in zip(handed, versions, strict=True):
        assert scores["eval/copy/exact_match"] == pytest.approx(
            float(v.tags["eval.copy.exact_match"])
        )
    em = {v.version: float(v.tags["eval.copy.exact_match"]) for v in versions}
    print("exact match by version", em)
    assert em[versions[-1].version] >= 0.5, em  # the fine-tune learned the task
    assert float(versions[-1].tags["eval.copy.bleu"]) >= 50, versions[-1].tags
    model = c.get_registered_model(MODEL)
    assert model.tags[registry.SELECT_TAG] == "eval.copy.exact_match:max"
    best = c.get_model_version_by_alias(MODEL, "best")
    assert em[best.version] == max(em.values()), (best.version, em)


def test_the_untrained_base_scores_far_lower(run, tmp_path):
    cfg, result, (gen, mc), _, _ = run
    c, versions = _versions()
    trained = read_config(result.checkpoint)  # the run's, vocab_size from the tokenizer
    torch.manual_seed(0)
    base = models.build(trained.model)
    ckpt = tmp_path / "checkpoint_00000000"
    tok = result.checkpoint / "tokenizer.json"
    save_servable(ckpt, base.state_dict(), trained, tok, TrainerState(0))
    (ckpt / "template.json").write_text((result.checkpoint / "template.json").read_text())
    seal(ckpt)
    got = evaluate(ckpt, check_tasks([str(gen), str(mc)]), limit=40)
    last = versions[-1].tags
    print("base", [(s.task, s.metric, s.value) for s in got.scores], "last", last)
    assert got.value("copy", "exact_match") <= float(last["eval.copy.exact_match"]) - 0.5
    assert got.value("copy", "bleu") < float(last["eval.copy.bleu"])
    assert got.value("copy_mc", "acc") < float(last["eval.copy_mc.acc"])
