"""What `--resume` refuses before Ray starts: a config that does not fit the run's checkpoint."""

import logging

import numpy as np
import pytest

from lmforge import models
from lmforge.checkpoint import TrainerState, read_state, save_servable, seal
from lmforge.config import ConfigError, load_config
from lmforge.data.dataset import Dataset
from lmforge.data.prepare import PrepareOptions, split_and_write
from lmforge.tokenizer import train_tokenizer
from lmforge.training.plan import check_resume
from tests.conftest import REPO


@pytest.fixture
def run(tmp_path):
    tok = train_tokenizer(["to be or not to be"] * 5, vocab_size=300)
    (tmp_path / "ds").mkdir()
    tok.save(str(tmp_path / "ds" / "tokenizer.json"))
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = [np.arange(200) % 250 for _ in range(20)]
    split_and_write(iter(docs), tmp_path / "ds", tok, PrepareOptions(seq_tokens=64), sources=[])
    overrides = [
        "model.vocab_size=300", f"run.storage_path={tmp_path}", "run.name=r",
        f"data.path={tmp_path / 'ds'}",
    ]  # fmt: skip
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", overrides)
    state = TrainerState(
        step=5, world_size=cfg.scaling.num_workers, data=[{}] * cfg.scaling.num_workers
    )
    ckpt = tmp_path / "r" / "checkpoint_00000005"
    save_servable(
        ckpt, models.build(cfg.model).state_dict(), cfg, tmp_path / "tokenizer.json", state
    )
    seal(ckpt)
    return cfg, ckpt, overrides


def check(cfg, ckpt):
    """The launch plan's resume check, on the checkpoint Ray would hand the run."""
    check_resume(cfg, ckpt, read_state(ckpt), Dataset(cfg.data.path))


def test_a_model_that_does_not_fit_the_checkpoint_is_named(run):
    cfg, ckpt, overrides = run
    n_layer = cfg.model.n_layer
    bigger = load_config(
        REPO / "jobs" / "configs" / "tiny.yaml", [*overrides, f"model.n_layer={n_layer + 1}"]
    )
    with pytest.raises(ConfigError) as err:
        check(bigger, ckpt)
    msg = str(err.value)
    assert msg.startswith(f"{ckpt}: the config's model does not fit the checkpoint")
    assert f"model.n_layer={n_layer + 1} (checkpoint: {n_layer})" in msg and "\n" not in msg


def test_another_zero_stage_is_named(run):
    cfg, ckpt, overrides = run
    other = load_config(REPO / "jobs" / "configs" / "tiny.yaml", [*overrides, "zero.stage=3"])
    with pytest.raises(ConfigError, match=f"{ckpt}: saved with zero.stage=2; resume with"):
        check(other, ckpt)


def test_another_number_of_workers_is_resumed_and_said(run, caplog):
    cfg, ckpt, overrides = run
    more = load_config(
        REPO / "jobs" / "configs" / "tiny.yaml", [*overrides, "scaling.num_workers=3"]
    )
    with caplog.at_level(logging.WARNING, logger="lmforge.training.plan"):
        check(more, ckpt)
    assert f"resuming {ckpt}, saved by 2 workers, on scaling.num_workers=3" in caplog.text
    assert "a step is now 24 sequences (was 16)" in caplog.text
