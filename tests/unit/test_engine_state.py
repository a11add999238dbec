"""Restoring a DeepSpeed engine state the way a resume does (`engine_state.load_engine_state`:
restricted unpickler, memory-mapped, moments copied into the optimizer's own tensors): a real
engine (one process, gloo group of one) over a tiny gpt2, saved after a few steps and loaded
into a freshly built one, continues exactly as the saved one does."""

from __future__ import annotations

import pytest
import torch

from lmforge import dist, models
from lmforge.checkpoint import ENGINE_TAG, CheckpointError
from lmforge.config import load_config
from lmforge.training import engine_state
from lmforge.training.engine_state import consolidated_weights
from tests.conftest import REPO
from tests.unit.engines import one_rank_engine

TINY = REPO / "jobs" / "configs" / "tiny.yaml"
INFO = dist.DistInfo(0, 1, 0, torch.device("cpu"))
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("gloo_group"),  # torch.distributed over gloo (tests/unit/conftest.py)
]


def engine(stage: int, precision: str = "fp32", seed: int = 0):
    cfg = load_config(
        TINY,
        [f"zero.stage={stage}", f"train.precision={precision}", "model.n_layer=2",
         "model.d_model=64", "model.n_head=2", "model.context_length=16",
         "model.vocab_size=64", "train.micro_batch_size=2", "train.lr=0.01",
         "train.warmup_steps=2"],
    )  # fmt: skip
    torch.manual_seed(seed)  # the fresh engine starts from other weights than the saved one
    model = models.build(cfg.model)
    eng = one_rank_engine(model, cfg)
    return eng


def losses(eng, n: int, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 64, (2, 17), generator=g)
        _, loss = eng(x[:, :-1], x[:, 1:])
        eng.backward(loss)
        eng.step()
        out.append(loss.item())
    return out


def moments(eng) -> dict[tuple, torch.Tensor]:
    opt = engine_state._base_optimizer(eng)
    return {(i, k): v for i, s in opt.state_dict()["state"].items()
            for k, v in s.items() if isinstance(v, torch.Tensor)}  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "precision"), [(0, "fp32"), (1, "fp32"), (2, "bf16"), (3, "fp32")]
)
def test_a_fresh_engine_continues_exactly_as_the_saved_one(stage, precision, tmp_path):
    eng = engine(stage, precision)
    losses(eng, 3)
    eng.save_checkpoint(str(tmp_path), tag=ENGINE_TAG)
    weights = consolidated_weights(eng, INFO)
    saved_moments = {k: v.clone() for k, v in moments(eng).items()} if stage < 3 else {}
    expected = losses(eng, 3, seed=1)

    again = engine(stage, precision, seed=1)
    before = {k: v.data_ptr() for k, v in moments(again).items()} if stage < 3 else {}
    engine_state.load_engine_state(again, tmp_path, ENGINE_TAG)
    restored = consolidated_weights(again, INFO)
    assert restored.keys() == weights.keys()
    assert all(torch.equal(restored[k], weights[k]) for k in weights)
    assert again.global_steps == 3
    if stage < 3:  # ZeRO 3's sub-groups swap their state in and out of the torch optimizer
        now = moments(again)
        assert now.keys() == saved_moments.keys() and now
        assert all(torch.equal(now[k], saved_moments[k]) for k in now)
        assert not before  # a fresh engine holds none: the loaded ones were made resident
    assert losses(again, 3, seed=1) == expected  # bit for bit: weights, moments, LR schedule
    if stage < 3:  # moments an engine already holds are filled in place, not re-allocated
        held = {k: v.data_ptr() for k, v in moments(eng).items()}
        engine_state.load_engine_state(eng, tmp_path, ENGINE_TAG)
        now = moments(eng)
        assert held and {k: v.data_ptr() for k, v in now.items()} == held
        assert all(torch.equal(now[k], saved_moments[k]) for k in now)


class _RunsCode:
    """What a tampered engine state could hold: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_state_is_refused_while_loading(tmp_path):
    eng = engine(1)
    losses(eng, 1)
    eng.save_checkpoint(str(tmp_path), tag=ENGINE_TAG)
    marker = tmp_path / "code-ran"
    optim = next((tmp_path / ENGINE_TAG).glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, optim)
    with pytest.raises(CheckpointError, match=f"{optim.name}: refused"):
        engine_state.load_engine_state(eng, tmp_path, ENGINE_TAG)
    assert not marker.exists()
    assert eng.checkpoint_engine.__class__.__name__ == "TorchCheckpointEngine"  # put back
    with pytest.raises(CheckpointError, match="no DeepSpeed engine state"):
        engine_state.load_engine_state(eng, tmp_path, "missing")
