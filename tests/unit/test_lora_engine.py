"""LoRA under each ZeRO stage: a real DeepSpeed engine (one process, gloo group of one) over
a tiny gpt2 whose base is frozen, built as the trainer builds it (`param_groups` hands
DeepSpeed only the adapters). The base stays bit-identical; the engine state saved without
the frozen base is small and resumes the adapters and their optimizer state exactly."""

from __future__ import annotations

import pytest
import torch

from lmforge import dist, lora, models
from lmforge.config import load_config
from lmforge.training.engine_state import consolidated_weights
from lmforge.training.plan import LORA_ZERO_STAGES
from tests.conftest import REPO
from tests.unit.engines import one_rank_engine

TINY = REPO / "jobs" / "configs" / "tiny.yaml"
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("gloo_group"),  # torch.distributed over gloo (tests/unit/conftest.py)
]


def lora_engine(stage: int):
    cfg = load_config(
        TINY,
        [f"zero.stage={stage}", "model.n_layer=2", "model.d_model=64", "model.n_head=2",
         "model.context_length=16", "model.vocab_size=64", "train.micro_batch_size=2",
         "train.lr=0.01", "train.warmup_steps=0", "train.lora.r=4"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = models.build(cfg.model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_adapters(model, lora.settings_of(cfg.train.lora))
    eng = one_rank_engine(model, cfg)
    return eng, base


def steps(eng, n: int, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, 64, (2, 17), generator=g)
        _, loss = eng(x[:, :-1], x[:, 1:])
        eng.backward(loss)
        eng.step()
    return loss.item()


def full_base(eng) -> dict[str, torch.Tensor]:
    """The module's base weights, gathered under ZeRO 3."""
    import deepspeed

    params = list(eng.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {k: v.clone() for k, v in lora.base_state_dict(eng.module).items()}


@pytest.mark.parametrize("stage", LORA_ZERO_STAGES)
def test_lora_keeps_the_base_and_resumes_under_zero(stage, tmp_path):
    eng, base = lora_engine(stage)
    steps(eng, 3)
    after = full_base(eng)
    assert after.keys() == base.keys()
    assert all(torch.equal(after[k], base[k]) for k in base)  # bit-identical
    info = dist.DistInfo(0, 1, 0, torch.device("cpu"))
    adapters = consolidated_weights(eng, info, trainable_only=True)
    assert adapters and all("lora_" in k for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # it learned

    eng.save_checkpoint(str(tmp_path), tag="state", exclude_frozen_parameters=True)
    saved = sum(f.stat().st_size for f in tmp_path.rglob("*.pt"))
    base_bytes = sum(v.numel() * 4 for v in base.values())
    assert saved < base_bytes  # adapters + their Adam moments; the base alone would be more
    expected = steps(eng, 2, seed=1)

    again, _ = lora_engine(stage)
    again.load_checkpoint(str(tmp_path), tag="state", load_module_strict=False)
    restored = consolidated_weights(again, info, trainable_only=True)
    assert all(torch.equal(restored[k], adapters[k]) for k in adapters)
    assert steps(again, 2, seed=1) == pytest.approx(expected, abs=1e-6)  # optimizer state too


def test_lora_without_a_base_is_refused_in_one_line():
    from lmforge.config import ConfigError
    from lmforge.training.plan import check_lora

    cfg = load_config(TINY, ["train.lora.r=4"])
    with pytest.raises(ConfigError, match=r"^train.lora: LoRA adapts a base model; name it with"):
        check_lora(cfg, resume=False, init_from=None)
    check_lora(cfg, resume=False, init_from="models:/base/1")  # a base: accepted


def test_lora_targets_are_checked_before_ray_on_the_plans_model():
    """lstm has no linear layer to adapt by default, and a misspelt target module is named:
    both at plan time on a meta-device model, not in a Ray worker."""
    from lmforge.errors import UsageError
    from lmforge.training.plan import check_lora_targets

    lstm = load_config(TINY, ["model.arch=lstm", "model.vocab_size=64", "train.lora.r=4"])
    with pytest.raises(UsageError, match=r"^train.lora: lstm has no linear layers to adapt"):
        check_lora_targets(lstm)
    typo = load_config(TINY, ["model.vocab_size=64", "train.lora.r=4",
                              "train.lora.target_modules=[q_proj]"])  # fmt: skip
    with pytest.raises(UsageError, match=r"\['q_proj'\] are not linear layers"):
        check_lora_targets(typo)
    check_lora_targets(load_config(TINY, ["model.vocab_size=64", "train.lora.r=4"]))  # gpt2: ok
