"""The servable half of a checkpoint: safetensors round trip, and damaged dirs named."""

import json
import logging
import shutil

import pytest
import torch

from lmforge import models
from lmforge.checkpoint import (
    FILES,
    CheckpointError,
    file_sizes,
    incomplete,
    latest_in_run,
    load_model,
    resolve_checkpoint,
    save_servable,
    seal,
)
from lmforge.config import load_config
from lmforge.tokenizer import train_tokenizer
from tests.conftest import REPO


@pytest.fixture
def run_dir(tmp_path):
    tok = train_tokenizer(["to be or not to be"] * 5, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["model.vocab_size=300"])
    torch.manual_seed(0)
    model = models.build(cfg.model)
    for step in (5, 10):
        save_servable(tmp_path / "run" / f"checkpoint_{step:08d}", model.state_dict(), cfg,
                      tmp_path / "tokenizer.json", {"step": step})  # fmt: skip
    return tmp_path / "run", model


@pytest.fixture
def sealed_run(tmp_path):
    """Checkpoints 5 and 10 written as the training loop writes them: each rank's engine
    files (rank 1's in its own temp dir), rank 0's servable files, then the list of all."""
    tok = train_tokenizer(["to be or not to be"] * 5, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["model.vocab_size=300"])
    model = models.build(cfg.model)
    run = tmp_path / "run"
    for step in (5, 10):
        rank0, rank1 = tmp_path / f"rank0-{step}", tmp_path / f"rank1-{step}"
        for rank, d in enumerate((rank0, rank1)):
            (d / "deepspeed" / "state").mkdir(parents=True)
            torch.save({"exp_avg": torch.randn(1000)},
                       d / "deepspeed" / "state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")  # fmt: skip
        (rank0 / "deepspeed" / "latest").write_text("state")
        others = [file_sizes(rank1)]  # what all_gather_object brings rank 0
        save_servable(rank0, model.state_dict(), cfg, tmp_path / "tokenizer.json",
                      {"step": step, "files": FILES})  # fmt: skip
        seal(rank0, others)
        for d in (rank0, rank1):  # what Ray's copy of each rank's dir does
            shutil.copytree(d, run / f"checkpoint_{step:08d}", dirs_exist_ok=True)
    return run


def test_weights_round_trip_through_safetensors(run_dir):
    path, model = run_dir
    loaded, tok, cfg = load_model(path)  # a run dir means its latest checkpoint
    assert cfg.model.vocab_size == 300
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied after loading
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(loaded(x)[0], model.eval()(x)[0])


def test_latest_skips_incomplete_and_unreadable_checkpoints(run_dir):
    path, _ = run_dir
    assert latest_in_run(path).name == "checkpoint_00000010"
    (path / "checkpoint_00000010" / "trainer_state.json").write_text("{truncated")
    assert latest_in_run(path).name == "checkpoint_00000005"
    (path / "checkpoint_00000005" / "trainer_state.json").unlink()  # never finished writing
    assert latest_in_run(path) is None
    with pytest.raises(CheckpointError, match="holds none"):
        load_model(path)


def test_a_sealed_checkpoint_lists_every_rank_s_files(sealed_run):
    ckpt = sealed_run / "checkpoint_00000010"
    assert incomplete(ckpt) is None and latest_in_run(sealed_run) == ckpt
    listed = set(json.loads((ckpt / FILES).read_text())["files"])
    assert listed == set(file_sizes(ckpt))  # both ranks' engine files and the servable ones
    assert "deepspeed/state/zero_pp_rank_1_mp_rank_00_optim_states.pt" in listed


@pytest.mark.parametrize(
    "damage, why",
    [
        ("truncate", "zero_pp_rank_1_mp_rank_00_optim_states.pt has 64 bytes, files.json says"),
        ("delete", "zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"),
        ("delete-weights", "model.safetensors is missing"),
        ("delete-list", "files.json, its list of files, is missing"),
        ("truncate-list", "files.json is unreadable"),
    ],
)
def test_a_checkpoint_cut_short_is_skipped_with_a_warning(sealed_run, caplog, damage, why):
    """What a worker killed while Ray copies its files into the run dir leaves behind."""
    ckpt = sealed_run / "checkpoint_00000010"
    shard = ckpt / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:64])
    elif damage == "delete":
        shard.unlink()
    elif damage == "delete-weights":
        (ckpt / "model.safetensors").unlink()
    elif damage == "delete-list":
        (ckpt / FILES).unlink()
    else:
        (ckpt / FILES).write_text((ckpt / FILES).read_text()[:20])
    with caplog.at_level(logging.WARNING, logger="lmforge.checkpoint"):
        assert latest_in_run(sealed_run).name == "checkpoint_00000005"
    assert why in incomplete(ckpt)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and str(ckpt) in warned[0] and why in warned[0], warned
    assert resolve_checkpoint(sealed_run).name == "checkpoint_00000005"
    with pytest.raises(CheckpointError, match=f"{ckpt}: an incomplete checkpoint"):
        resolve_checkpoint(ckpt)


def test_corrupt_weights_are_named(run_dir):
    path, _ = run_dir
    weights = path / "checkpoint_00000010" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(CheckpointError, match="model.safetensors: not readable"):
        load_model(path / "checkpoint_00000010")


class _RunsCode:
    """What a tampered engine state could hold: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_engine_state_that_would_run_code_is_refused_unopened(tmp_path, monkeypatch):
    from lmforge.checkpoint import ENGINE_DIR, ENGINE_TAG, check_engine_state

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # the allowlist imports DeepSpeed classes
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    state = tmp_path / "ckpt" / ENGINE_DIR / ENGINE_TAG
    state.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no DeepSpeed engine state"):
        check_engine_state(tmp_path / "ckpt")
    torch.save({"module": {"w": torch.ones(3)}, "ds_version": "0.19"},
               state / "mp_rank_00_model_states.pt")  # fmt: skip
    torch.save({"loss_scaler": LossScaler(1.0), "state": {0: {"exp_avg": torch.zeros(3)}}},
               state / "zero_pp_rank_0_mp_rank_00_optim_states.pt")  # fmt: skip
    check_engine_state(tmp_path / "ckpt")  # tensors, containers and DeepSpeed's own types
    marker = tmp_path / "code-ran"
    bad = state / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"state": _RunsCode(marker)}, bad)
    with pytest.raises(CheckpointError, match=f"{bad.name}: refused"):
        check_engine_state(tmp_path / "ckpt")
    assert not marker.exists()
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=bad.name):
        check_engine_state(tmp_path / "ckpt")
