"""model.arch=llama trains through the launch plan and loop: 2 local workers, DeepSpeed ZeRO 2."""

import math

import pytest

from lmforge import models
from lmforge.checkpoint import load_model, read_state
from lmforge.config import load_config
from lmforge.generation import SamplingParams, generate_tokens
from tests.conftest import REPO
from tests.trainer.conftest import check_golden, tiny_config, train, val_loss_of


def test_llama_tiny_learns_and_its_checkpoint_generates(dataset):
    cfg = tiny_config(dataset, "llama-tiny", "model.arch=llama", "model.n_kv_head=1",
                      "zero.stage=2", "train.max_steps=12", "train.eval_every=6",
                      "train.checkpoint_every=12")  # fmt: skip
    preset = load_config(REPO / "jobs" / "configs" / "llama-tiny.yaml")
    assert cfg.model == preset.model  # the preset's model, at the test's data and steps
    result = train(cfg)
    check_golden("llama-zero2", result)
    state = read_state(result.checkpoint)
    assert state.step == 12 and state.world_size == 2
    evals = {e["step"]: e["val_loss"] for e in state.evals}
    assert sorted(evals) == [0, 6, 12]
    assert evals[0] == pytest.approx(math.log(512), abs=0.3)  # an untrained model
    assert evals[12] < evals[0] - 0.3, f"val loss did not drop: {evals}"
    for key in ("loss", "grad_norm", "tokens_per_s", "mfu", "val_loss"):
        assert math.isfinite(result.metrics[key]), key

    model, tok, saved = load_model(result.checkpoint)
    assert models.of(model).name == "llama" and saved.model.n_kv_head == 1
    assert val_loss_of(model, saved, dataset) == pytest.approx(evals[12], abs=1e-4)
    prompt = tok.encode("DUKE.").ids
    greedy = SamplingParams(30, temperature=0)
    cached = list(generate_tokens(model, prompt, greedy, use_cache=True))
    assert len(cached) == 30 and all(0 <= t < 512 for t in cached)
    assert cached == list(generate_tokens(model, prompt, greedy, use_cache=False))
