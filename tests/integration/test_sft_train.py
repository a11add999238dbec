"""SFT end to end: instruction rows prepared into a masked dataset on the real local Ray,
a tiny model trained on it by the normal path (2 local workers, packed windows with
segments, completion-only loss; its losses against their golden file), and the registered
version carries the template it was trained with."""

from __future__ import annotations

import json
import math

from lmforge import paths, templates
from lmforge.checkpoint import read_state
from lmforge.data.dataset import Dataset
from lmforge.data.prepare import PrepareOptions, prepare
from lmforge.tracking import registry
from tests.trainer.conftest import check_golden, tiny_config, train

WORDS = ["red", "blue", "green", "amber", "violet", "cyan", "olive", "coral", "ivory", "azure"]


def test_sft_prepare_train_and_register(ray_cluster, tmp_path, plain_main):
    rows = tmp_path / "rows.jsonl"
    lines = [{"prompt": f"Repeat the last word: {WORDS[i % 7]} {WORDS[(i * 3) % 10]}",
              "completion": WORDS[(i * 3) % 10]} for i in range(240)]  # fmt: skip
    lines[5] = {"prompt": "Say it. " * 60, "completion": "red"}  # longer than 64: dropped
    rows.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = paths.home() / "datasets" / "sft-rows"
    opts = PrepareOptions(format="sft", template="instruct", vocab_size=320, seq_tokens=64,
                          rows_per_group=4, overwrite=True)  # fmt: skip
    m = prepare([rows], out, opts)
    assert m["sft"]["rows"] == 240 and m["sft"]["dropped_too_long"] == 1
    ds = Dataset(out)
    assert ds.data_format == "sft" and ds.template.name == "instruct"

    cfg = tiny_config(out, "sft-tiny", "train.max_steps=8", "train.eval_every=4",
                      "train.checkpoint_every=8", "tracking.experiment=it-sft",
                      "tracking.registered_model=it-sft")  # fmt: skip
    result = train(cfg)
    check_golden("sft-packed", result)
    evals = {e["step"]: e["val_loss"] for e in read_state(result.checkpoint).evals}
    assert sorted(evals) == [0, 4, 8] and all(math.isfinite(v) for v in evals.values())
    assert evals[8] < evals[0] - 0.5, evals  # the completion tokens are learnt
    assert templates.of_folder(result.checkpoint) == ds.template
    version = registry.fetch_checkpoint("models:/it-sft@latest")
    assert json.loads((version / templates.TEMPLATE_FILE).read_text())["name"] == "instruct"
    assert templates.of_folder(version) == ds.template


def test_dpo_as_a_ray_job_from_the_registered_sft_version(ray_cluster, tmp_path, plain_main):
    """`ray job submit` of jobs/train.py with train.objective=dpo and --init-from the SFT
    version the test above registered: pairs rendered with the same tokenizer and template;
    the job precomputes the reference, trains, and registers versions tagged with their
    lineage (objective, parent, reference)."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.tracking import store
    from tests.integration.conftest import submit_train
    from tests.preference_data import pairs_dataset, write_rows

    sft = paths.home() / "datasets" / "sft-rows"
    tok = Tokenizer.from_file(str(sft / "tokenizer.json"))
    rows = [{"prompt": f"Repeat the last word: {WORDS[i % 7]} {WORDS[(i * 3) % 10]}",
             "chosen": WORDS[(i * 3) % 10], "rejected": WORDS[(i * 5 + 1) % 10]}
            for i in range(120)]  # fmt: skip
    pref, m = pairs_dataset(tmp_path / "pairs", write_rows(tmp_path / "pairs.jsonl", rows),
                            "instruct", tok=tok, rows_per_group=4)  # fmt: skip
    assert m["data_format"] == "preference"
    status, log = submit_train(
        ray_cluster,
        {"data.path": str(pref.path), "run.name": "dpo-job", "train.objective": "dpo",
         "train.max_steps": 4, "train.warmup_steps": 0, "train.eval_every": 4,
         "train.checkpoint_every": 4, "train.eval_steps": 1, "scaling.num_workers": 1,
         "tracking.experiment": "it-sft", "tracking.registered_model": "it-dpo"},
        extra=("--init-from", "models:/it-sft@latest"),
    )  # fmt: skip
    assert status == "SUCCEEDED", log[-4000:]
    assert "step      4/4" in log, log[-3000:]
    c = store.client(store.resolve_uri())
    (version,) = c.search_model_versions("name='it-dpo'")
    assert version.tags["objective"] == "dpo" and "it-sft" in version.tags["parent"]
    assert version.tags["reference"].startswith(version.tags["parent"] + "@")
    run = c.get_run(version.run_id)
    assert "rewards/accuracies" in run.data.metrics and "logps/chosen" in run.data.metrics
