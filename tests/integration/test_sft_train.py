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
