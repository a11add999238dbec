"""What `--resume` refuses before Ray starts: a config that does not fit the run's checkpoint."""

import pytest

from lmforge.checkpoint import save_servable
from lmforge.config import ConfigError, load_config
from lmforge.model import GPT
from lmforge.tokenizer import train_tokenizer
from lmforge.training.launch import check_resume_fits
from tests.conftest import REPO


@pytest.fixture
def run(tmp_path):
    tok = train_tokenizer(["to be or not to be"] * 5, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    overrides = ["model.vocab_size=300", f"run.storage_path={tmp_path}", "run.name=r"]
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", overrides)
    state = {"step": 5, "world_size": cfg.scaling.num_workers, "dataset": {}}
    ckpt = tmp_path / "r" / "checkpoint_00000005"
    save_servable(ckpt, GPT(cfg.model).state_dict(), cfg, tmp_path / "tokenizer.json", state)
    return cfg, ckpt, overrides


def test_a_model_that_does_not_fit_the_checkpoint_is_named(run):
    cfg, ckpt, overrides = run
    n_layer = cfg.model.n_layer
    bigger = load_config(
        REPO / "jobs" / "configs" / "tiny.yaml", [*overrides, f"model.n_layer={n_layer + 1}"]
    )
    with pytest.raises(ConfigError) as err:
        check_resume_fits(bigger)
    msg = str(err.value)
    assert msg.startswith(f"{ckpt}: the config's model does not fit the checkpoint")
    assert f"model.n_layer={n_layer + 1} (checkpoint: {n_layer})" in msg and "\n" not in msg


def test_another_layout_is_named(run):
    cfg, ckpt, overrides = run
    other = load_config(
        REPO / "jobs" / "configs" / "tiny.yaml",
        [*overrides, f"scaling.num_workers={cfg.scaling.num_workers + 1}"],
    )
    with pytest.raises(ConfigError, match=f"{ckpt}: saved with scaling.num_workers="):
        check_resume_fits(other)
