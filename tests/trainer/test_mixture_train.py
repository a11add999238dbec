"""A mixture of two datasets (`data.sources`) through the launch plan and the loop on 2
local gloo ranks: each step's tokens per source follow the weights and are logged, each
source is evaluated on its own val split, the run's tags hash the mixture, and a run
resumed from a checkpoint trains on exactly the batches the uninterrupted one did."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from lmforge import paths
from lmforge.checkpoint import LOCAL_RECORD, read_state
from lmforge.data.mixture import Mixture
from lmforge.tracking import store
from tests.datasets import plays_mixture
from tests.trainer.conftest import losses, tiny_config, train


@pytest.fixture(scope="module")
def sources():
    """Twelfth Night and Henry V, prepared with one tokenizer."""
    tn, _, h5 = plays_mixture(paths.home() / "datasets" / "mixture-plays")
    return tn, h5


def mixture_config(sources, name, *overrides):
    tn, h5 = sources
    mix = f"data.sources=[tn:0.7:{tn.path},h5:0.3:{h5.path}]"
    return tiny_config(tn.path, name, mix, "train.eval_every=3", "train.checkpoint_every=3",
                       "train.max_steps=6", *overrides)  # fmt: skip


def test_a_mixture_trains_logs_its_sources_and_resumes_exactly(sources):
    cfg = mixture_config(sources, "mixed")
    run = train(cfg)
    steps = [m for m in run.history if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    tn = sum(m["data/tn/tokens"] for m in steps)
    h5 = sum(m["data/h5/tokens"] for m in steps)
    assert tn + h5 == 6 * 1024  # every token of every step, from one source or the other
    assert abs(tn / (tn + h5) - 0.7) < 0.02, (tn, h5)
    # Each source on its own val split; val_loss weighs them by the mixture's weights.
    final = run.metrics
    assert final["val_loss"] == pytest.approx(
        0.7 * final["val_loss/tn"] + 0.3 * final["val_loss/h5"], rel=1e-6
    )
    client = store.client(store.resolve_uri(None))
    for key in ("val_loss/tn", "val_loss/h5", "val_perplexity/h5", "data/tn/tokens"):
        history = client.get_metric_history(run.mlflow_run_id, key)
        assert history, key
    assert [p.step for p in client.get_metric_history(run.mlflow_run_id, "val_loss/tn")] == [
        0, 3, 6,
    ]  # fmt: skip
    tags = client.get_run(run.mlflow_run_id).data.tags
    mix = Mixture(cfg.data)
    assert tags["dataset.manifest_sha256"] == mix.manifest_sha256
    assert read_state(run.checkpoint).dataset.manifest_sha256 == mix.manifest_sha256

    # Resumed from the checkpoint of step 3 (a copy, in a run of its own): steps 4..6 are
    # the uninterrupted run's, loss for loss and weight for weight.
    again = run.run_dir.parent / "mixed-resumed"
    again.mkdir()
    shutil.copytree(run.run_dir / "checkpoint_00000003", again / "checkpoint_00000003")
    (again / LOCAL_RECORD).write_text(json.dumps({"checkpoints": ["checkpoint_00000003"]}))
    resumed = train(mixture_config(sources, "mixed-resumed"), resume=True)
    assert {s: losses(resumed)[s] for s in (4, 5, 6)} == pytest.approx(
        {s: losses(run)[s] for s in (4, 5, 6)}, rel=1e-6
    )
    a = load_file(run.checkpoint / "model.safetensors")
    b = load_file(resumed.checkpoint / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert read_state(resumed.checkpoint).data == read_state(run.checkpoint).data


def test_a_mixture_is_refused_before_it_starts(sources, tmp_path):
    from lmforge.data.dataset import DatasetError

    tn, _ = sources
    cfg = tiny_config(tn.path, "refused", f"data.sources=[tn:1:{tn.path},gone:1:{tmp_path}/gone]")
    with pytest.raises(DatasetError, match=r"data.sources\[1\] \(gone\): .*dataset dir not found"):
        train(cfg)
