"""The training loop without Ray: each test trains through the product's own
`run_training(..., local=True)` (the launch plan, the same `Trainer`, DeepSpeed engines on 2
gloo ranks in plain processes: `lmforge.training.local_session`), real MLflow on the
session's SQLite store, and a dataset prepared in-process (`tests/datasets.py`).

Golden losses: `check_golden(name, result)` compares a run's per-step training losses with
`tests/trainer/golden/<name>.json`. A change that moves them fails and says so; when the
change is meant, regenerate them on purpose with

    LMFORGE_REGEN_GOLDEN=1 bash scripts/test.sh tests/trainer

and commit the files with the change that moved them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from lmforge import paths
from lmforge.config import load_config
from lmforge.data.dataset import Dataset
from lmforge.data.stream import TokenStream
from lmforge.training.launch import TrainResult, run_training
from tests.conftest import REPO
from tests.datasets import plays_dataset

GOLDEN = Path(__file__).parent / "golden"
REGEN_GOLDEN = os.environ.get("LMFORGE_REGEN_GOLDEN") == "1"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/trainer/" in str(item.fspath):
            item.add_marker(pytest.mark.trainer)


@pytest.fixture(scope="module", autouse=True)
def _spawn_safe(plain_main):
    """Every test here spawns ranks: under a bare `__main__` (tests/conftest.py)."""


@pytest.fixture(scope="session")
def dataset():
    """Three plays, a 512-token vocab, 128-token rows (many row groups for 2 workers)."""
    return plays_dataset(paths.home() / "datasets" / "plays-local").path


def tiny_config(dataset, name, *overrides):
    """jobs/configs/tiny.yaml on `dataset` as run `name`, every step reported (golden losses)."""
    return load_config(
        REPO / "jobs" / "configs" / "tiny.yaml",
        [f"data.path={dataset}", f"run.name={name}", "train.log_every=1", *overrides],
    )


def train(cfg, **kwargs) -> TrainResult:
    """`run_training` on local processes: the launch plan and loop of a Ray job, no Ray."""
    return run_training(cfg, local=True, **kwargs)


def losses(result: TrainResult) -> dict[int, float]:
    """Every optimizer step's training loss of a local run, by step."""
    return {int(m["step"]): m["loss"] for m in result.history if "loss" in m}


def check_golden(name: str, result: TrainResult, rel: float = 1e-3) -> None:
    """The run's per-step losses are the stored ones (within `rel`: CPUs differ in the last
    bits of a float sum), or, with LMFORGE_REGEN_GOLDEN=1, become them."""
    got = {str(k): v for k, v in sorted(losses(result).items())}
    assert got, "the run reported no losses"
    file = GOLDEN / f"{name}.json"
    if REGEN_GOLDEN:
        file.write_text(json.dumps(got, indent=1) + "\n")
        return
    assert file.is_file(), f"{file} missing: regenerate it (tests/trainer/conftest.py says how)"
    want = json.loads(file.read_text())
    assert got.keys() == want.keys(), f"{name}: steps {list(got)} vs golden {list(want)}"
    moved = {k: (got[k], want[k]) for k in want if got[k] != pytest.approx(want[k], rel=rel)}
    assert not moved, (
        f"{name}: losses moved from {file} (step: (now, golden)) {moved}; if this change is "
        "meant to move them, regenerate: LMFORGE_REGEN_GOLDEN=1 bash scripts/test.sh tests/trainer"
    )


def val_loss_of(model, cfg, dataset) -> float:
    """The loss the trainer's evaluation computes, recomputed from the saved weights."""
    ds, per_worker = Dataset(dataset), []
    for rank in range(cfg.scaling.num_workers):
        val = TokenStream(ds, "val", cfg.model.context_length, cfg.train.micro_batch_size,
                          rank, cfg.scaling.num_workers, seed=cfg.train.seed, shuffle=False)  # fmt: skip
        batches = val.batches()
        with torch.no_grad():
            rank_losses = [model(*next(batches))[1].item() for _ in range(cfg.train.eval_steps)]
        per_worker.append(sum(rank_losses) / len(rank_losses))
    return sum(per_worker) / len(per_worker)
