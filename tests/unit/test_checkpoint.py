"""The servable half of a checkpoint: safetensors round trip, and damaged dirs named."""

import json
import shutil

import pytest
import torch

from lmforge import models
from lmforge.checkpoint import (
    FILES,
    CheckpointError,
    DatasetIdentity,
    TrainerState,
    file_sizes,
    incomplete,
    latest_in_run,
    load_model,
    read_state,
    resolve_checkpoint,
    save_servable,
    seal,
    write_state,
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
                      tmp_path / "tokenizer.json", TrainerState(step=step))  # fmt: skip
        seal(tmp_path / "run" / f"checkpoint_{step:08d}")
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
                      TrainerState(step=step))  # fmt: skip
        seal(rank0, others)
        for d in (rank0, rank1):  # what Ray's copy of each rank's dir does
            shutil.copytree(d, run / f"checkpoint_{step:08d}", dirs_exist_ok=True)
    return run


def test_weights_round_trip_through_safetensors(run_dir):
    path, model = run_dir
    loaded, tok, cfg = load_model(path / "checkpoint_00000010")
    assert cfg.model.vocab_size == 300
    assert loaded.lm_head.weight is loaded.wte.weight  # still tied after loading
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(loaded(x)[0], model.eval()(x)[0])


def test_a_dir_without_ray_s_record_is_no_run(run_dir):
    """Which checkpoint of a run is the latest is Ray Train's record (the one it restores);
    checkpoint folders alone, with no record, are no run to take a latest from."""
    path, _ = run_dir
    assert latest_in_run(path) is None
    with pytest.raises(CheckpointError, match="neither a checkpoint dir nor a run dir"):
        load_model(path)


def test_trainer_state_round_trips_and_reads_old_files(tmp_path):
    state = TrainerState(
        step=7, tokens_seen=700, world_size=2, data=[{"epoch": 0, "offset": 3}] * 2,
        dataset=DatasetIdentity("/d", "m" * 64, "t" * 64), metrics={"val_loss": 2.5},
        evals=[{"step": 7, "val_loss": 2.5}],
    )  # fmt: skip
    write_state(tmp_path, state)
    assert read_state(tmp_path) == state and read_state(tmp_path).val_loss == 2.5
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 3, "tokens_seen": 30}))
    old = read_state(tmp_path)  # written before files.json existed: not sealed
    assert (old.step, old.world_size, old.sealed, old.val_loss) == (3, 1, False, None)
    (tmp_path / "trainer_state.json").write_text('{"tokens_seen": 1}')
    with pytest.raises(CheckpointError, match="trainer_state.json: unreadable"):
        read_state(tmp_path)


def test_a_sealed_checkpoint_lists_every_rank_s_files(sealed_run):
    ckpt = sealed_run / "checkpoint_00000010"
    assert incomplete(ckpt) is None
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
def test_a_checkpoint_cut_short_is_named(sealed_run, damage, why):
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
    assert why in incomplete(ckpt)
    assert incomplete(sealed_run / "checkpoint_00000005") is None
    with pytest.raises(CheckpointError, match=f"{ckpt}: an incomplete checkpoint"):
        resolve_checkpoint(ckpt)


def test_corrupt_weights_are_named(run_dir):
    path, _ = run_dir
    weights = path / "checkpoint_00000010" / "model.safetensors"
    data = weights.read_bytes()  # the same size (files.json agrees), a garbled header
    weights.write_bytes(b"\xff" * 64 + data[64:])
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
    from lmforge.checkpoint import ENGINE_DIR, ENGINE_TAG
    from lmforge.training.engine_state import check_engine_state

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
