"""Issue 15's learning check through the user's path: a generated task (copy the prompt's
last word, tests/sft_task.py) as JSONL rows -> `lmforge prepare --format sft` -> `lmforge
train` on the local Ray (a tiny gpt2, 2 workers) -> `lmforge evaluate` on the registered
version: >= 90% greedy exact match on the held-out rows. The same training examples with no
loss mask (`prepare --format text` of their rendered text, every token a target; packed the
same way with data.document_mask) end visibly worse on the same held-out rows."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer

from lmforge import paths
from lmforge.data.dataset import Dataset
from lmforge.evaluate import read_examples
from lmforge.tracking import registry
from tests.conftest import REPO
from tests.sft_task import copy_rows

LMFORGE = str(Path(sys.executable).parent / "lmforge")
STEPS = int(os.environ.get("LMFORGE_SFT_STEPS", "300"))
SEED = int(os.environ.get("LMFORGE_SFT_SEED", "1337"))


def run(*args) -> str:
    """`lmforge ARGS` as a user runs it (this session's home: its cluster, its MLflow)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny matmuls: threads only contend
    out = subprocess.run([LMFORGE, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, f"lmforge {args[0]}: {(out.stdout + out.stderr)[-3000:]}"
    return out.stdout


def train_and_evaluate(data: Path, name: str, eval_data: Path, *sets: str) -> float:
    """Train `name` on `data`, register it, evaluate the version on `eval_data`: exact match."""
    overrides = [f"data.path={data}", f"run.name={name}", f"train.max_steps={STEPS}",
                 f"train.checkpoint_every={STEPS}", f"train.eval_every={STEPS}",
                 "train.eval_steps=2", "train.log_every=100", "train.warmup_steps=10",
                 f"train.seed={SEED}", "zero.stage=0", f"tracking.registered_model={name}",
                 *sets]  # fmt: skip
    run(
        "train", "--config", "jobs/configs/tiny.yaml", *(a for o in overrides for a in ("--set", o))
    )
    out = run("evaluate", "--model", f"models:/{name}@latest", "--data", eval_data)
    got = re.search(r"exact_match (\d\.\d+) \((\d+)/(\d+)\)", out)
    assert got, out
    return float(got[1])


def test_fine_tuned_on_a_copy_task_answers_held_out_prompts(ray_cluster, tmp_path):
    rows = tmp_path / "copy.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in copy_rows(2000, 0)))
    sft = paths.home() / "datasets" / "sft-copy"
    out = run("prepare", "--format", "sft", "--template", "plain", "--input", rows,
              "--output", sft, "--vocab-size", 512, "--seq-tokens", 32, "--val-fraction", 0.1,
              "--rows-per-group", 16, "--overwrite")  # fmt: skip
    assert "rows read 2,000 | examples 2,000 | dropped" in out, out
    ds = Dataset(sft)
    held = read_examples(ds, "val")
    assert len(held) == 200 and all(ex.targets[-1] and ex.targets.sum() <= 3 for ex in held)

    masked = train_and_evaluate(sft, "sft-copy", sft)
    version = registry.get_version("models:/sft-copy@latest", None)
    assert float(version.tags["evaluate.exact_match"]) == masked
    print(f"exact match, masked: {masked:.3f} ({STEPS} steps)")

    # The same train examples, every token a target: their text again (eos aside), tokenized
    # with the same tokenizer by the plain-text path.
    tok = Tokenizer.from_file(str(sft / "tokenizer.json"))
    text = tmp_path / "copy-text.jsonl"
    with text.open("w") as f:
        for ex in read_examples(ds, "train"):
            f.write(json.dumps({"text": tok.decode(ex.ids[:-1].tolist())}) + "\n")
    plain = paths.home() / "datasets" / "sft-copy-text"
    run("prepare", "--input", text, "--output", plain, "--tokenizer", sft / "tokenizer.json",
        "--seq-tokens", 64, "--val-fraction", 0.1, "--rows-per-group", 4, "--overwrite")  # fmt: skip
    unmasked = train_and_evaluate(plain, "sft-copy-nomask", sft, "data.document_mask=true")
    print(f"exact match: masked {masked:.3f}, unmasked {unmasked:.3f} ({STEPS} steps)")
    assert masked >= 0.9, (masked, unmasked)
    assert unmasked <= masked - 0.25, (masked, unmasked)
