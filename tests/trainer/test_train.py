"""Training through the launch plan and the loop on 2 local gloo ranks, each a DeepSpeed
engine (no Ray): ZeRO 0-3 learn, agree and match their golden losses; resume and its checks."""

import math
import os
import shutil
from pathlib import Path

import pytest

from lmforge.checkpoint import (
    CheckpointError,
    latest_in_run,
    load_model,
    read_state,
    resolve_checkpoint,
)
from lmforge.config import ConfigError
from lmforge.generation import SamplingParams, generate_tokens
from tests.trainer.conftest import check_golden, tiny_config, train, val_loss_of


def test_zero_stages_0_to_3_learn_and_agree(dataset):
    finals = {}
    for stage in (0, 1, 2, 3):
        cfg = tiny_config(dataset, f"zero{stage}", f"zero.stage={stage}", "train.max_steps=20",
                          "train.eval_every=10", "train.checkpoint_every=20")  # fmt: skip
        result = train(cfg)
        state = read_state(result.checkpoint)
        assert state.step == 20 and result.checkpoint.name == "checkpoint_00000020"
        assert state.world_size == 2 and len(state.data) == 2
        evals = {e["step"]: e["val_loss"] for e in state.evals}
        assert sorted(evals) == [0, 10, 20]
        assert evals[0] == pytest.approx(math.log(512), abs=0.3)  # an untrained model
        assert evals[20] < evals[0] - 0.5, f"ZeRO {stage}: val loss did not drop: {evals}"
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "val_perplexity"):
            assert math.isfinite(result.metrics[key]), key
        # The consolidated safetensors weights are the engine's: same val loss from them.
        model, tok, saved_cfg = load_model(result.checkpoint)
        assert saved_cfg.zero.stage == stage and saved_cfg.model.vocab_size == 512
        assert val_loss_of(model, saved_cfg, dataset) == pytest.approx(evals[20], abs=1e-4)
        sample = list(generate_tokens(model, tok.encode("DUKE.").ids, SamplingParams(20, seed=0)))
        assert 0 < len(sample) <= 20 and all(0 <= t < 512 for t in sample)
        finals[stage] = evals[20]
        check_golden(f"tiny-zero{stage}", result)
    # Nothing was JIT-compiled (DeepSpeed's CPU shm op is skipped: cpu_collectives).
    assert not list(Path(os.environ["TORCH_EXTENSIONS_DIR"]).glob("*/*.so"))
    # Same seed, same data, fp32: the stages partition state differently, not the math
    # (ZeRO 0 steps torch's AdamW on the module itself; its grad norm is lmforge's own).
    assert max(finals.values()) - min(finals.values()) < 1e-3, finals


def test_resume_continues_at_the_saved_step(dataset):
    common = ["zero.stage=2", "train.eval_every=100", "train.checkpoint_every=5"]
    first = train(tiny_config(dataset, "resumable", "train.max_steps=10", *common))
    assert read_state(first.checkpoint).step == 10
    # The latest checkpoint is Ray's record of the run (the one it restores workers from):
    # a dir a dying worker left half-copied, never recorded, is not it, whatever its step.
    stray = first.run_dir / "checkpoint_00000099"
    shutil.copytree(first.checkpoint, stray)
    (stray / "model.safetensors").write_bytes(b"cut short")
    assert latest_in_run(first.run_dir) == first.checkpoint == resolve_checkpoint(first.run_dir)
    shutil.rmtree(stray)

    with pytest.raises(ConfigError, match="--resume"):  # the name is taken
        train(tiny_config(dataset, "resumable", "train.max_steps=16", *common))
    with pytest.raises(ConfigError, match=r"model.d_model=32 \(checkpoint: 64\)"):
        train(tiny_config(dataset, "resumable", "model.d_model=32", *common), resume=True)

    # Another worker count re-shards (test_resilience.py); another ZeRO stage is refused.
    with pytest.raises(ConfigError, match=r"saved with zero.stage=2; resume with the same"):
        train(tiny_config(dataset, "resumable", *common, "zero.stage=3"), resume=True)

    second = train(tiny_config(dataset, "resumable", "train.max_steps=16", *common), resume=True)
    state = read_state(second.checkpoint)
    assert state.step == 16
    tokens_per_step = 8 * 2 * 64
    assert state.tokens_seen == 16 * tokens_per_step
    names = sorted(p.name for p in second.run_dir.glob("checkpoint_*") if p.is_dir())
    assert names == [f"checkpoint_{s:08d}" for s in (5, 10, 15, 16)]
    # Each worker's stream moved on from where the first run stopped, not from the start.
    before, after = read_state(first.checkpoint).data, state.data
    assert [a["offset"] - b["offset"] for a, b in zip(after, before, strict=True)] == [
        6 * 8 * 64
    ] * 2
    # What Ray recorded is still checked against its files.json: damage is named.
    weights = second.checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=f"{second.checkpoint}: the run's latest checkpoint"):
        resolve_checkpoint(second.run_dir)


def test_lmforge_train_local_runs_without_ray(dataset, tmp_path):
    """`lmforge train --local` as a user types it: the loop on 2 local processes, no Ray
    started or joined, the checkpoint recorded for --resume; what it cannot do is refused."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["LMFORGE_HOME"] = str(tmp_path / "home")

    def lmforge(*args):
        return subprocess.run(
            [sys.executable, "-m", "lmforge.cli", "train", "--local", "--config",
             "jobs/configs/tiny.yaml", "--set", f"data.path={dataset}", "--set", "run.name=laptop",
             "--set", "tracking.enabled=false", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    out = lmforge("--set", "train.max_steps=2", "--set", "train.warmup_steps=0",
                  "--set", "train.checkpoint_every=2")  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "on local processes" in log and "local Ray" not in log  # neither joined nor started
    assert "step      2/2 | loss" in log and "rank 1 on node" in log
    assert "latest checkpoint: " in out.stdout and "laptop/checkpoint_00000002" in out.stdout
    assert latest_in_run(tmp_path / "home" / "runs" / "laptop").name == "checkpoint_00000002"
    elastic = lmforge("--resume", "--set", "scaling.num_workers=[1,2]")
    assert elastic.returncode == 2 and "a local run has a fixed number of workers" in elastic.stderr
