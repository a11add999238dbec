"""`train.activation_checkpointing` and `train.compile`: the same losses as without them.

Real models (gpt2, llama) in real DeepSpeed engines of one process (a gloo group of one, as in
test_ds_config.py), a few optimizer steps at ZeRO 0-3 each; compile on a 1-layer model (the
CPU inductor compiles a larger one too slowly for a unit test).
"""

from __future__ import annotations

import functools

import pytest
import torch

from lmforge import models
from lmforge.config import ConfigError, load_config
from lmforge.training import speed
from lmforge.training.ds_config import deepspeed_config, lr_factor
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "tiny.yaml"
VOCAB, MICRO, CONTEXT, STEPS = 64, 2, 16, 3
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("gloo_group"),  # torch.distributed over gloo (tests/unit/conftest.py)
]


def config(*overrides: str):
    return load_config(
        TINY,
        [f"model.vocab_size={VOCAB}", f"model.context_length={CONTEXT}", "model.dropout=0.1",
         f"train.micro_batch_size={MICRO}", "train.warmup_steps=1", *overrides],
    )  # fmt: skip


def losses(cfg, steps: int = STEPS) -> list[float]:
    """Train `cfg`'s model as the trainer does (its options applied) for `steps` steps."""
    import deepspeed

    torch.manual_seed(0)
    model = models.build(cfg.model)
    if cfg.train.activation_checkpointing:
        assert speed.checkpoint_blocks(model) == cfg.model.n_layer
    eng, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=deepspeed_config(cfg, world_size=1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, functools.partial(lr_factor, cfg=cfg)
        ),
    )
    if cfg.train.compile:
        speed.compile_engine(eng)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (MICRO, CONTEXT), generator=g)
        torch.manual_seed(2)  # the same dropout masks in both runs
        _, loss = eng(x, x.roll(-1, 1))
        eng.backward(loss)
        eng.step()
        out.append(loss.item())
    eng.destroy()
    return out


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activation_checkpointing_same_losses(arch, stage):
    base = [f"model.arch={arch}", f"zero.stage={stage}"]
    plain = losses(config(*base))
    ckpt = losses(config(*base, "train.activation_checkpointing=true"))
    assert plain[0] != plain[-1]  # it trains: the steps change the loss
    assert ckpt == pytest.approx(plain, rel=1e-5, abs=1e-6)


def test_activation_checkpointing_saves_activations():
    """What autograd keeps for backward shrinks: the blocks' insides are recomputed."""
    cfg = config("model.dropout=0.0", "model.n_layer=4")

    def saved_bytes(checkpointed: bool) -> int:
        torch.manual_seed(0)
        model = models.build(cfg.model)
        if checkpointed:
            speed.checkpoint_blocks(model)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        x = torch.randint(0, VOCAB, (MICRO, CONTEXT))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(x, x)
        loss.backward()
        return total

    assert saved_bytes(True) < 0.6 * saved_bytes(False)


def test_activation_checkpointing_leaves_eval_and_names_alone():
    cfg = config("model.dropout=0.0")
    torch.manual_seed(0)
    model = models.build(cfg.model)
    names = list(model.state_dict())
    x = torch.randint(0, VOCAB, (MICRO, CONTEXT))
    with torch.no_grad():
        before = model(x)[0]
    speed.checkpoint_blocks(model)
    assert list(model.state_dict()) == names
    with torch.no_grad():
        assert torch.equal(model(x)[0], before)


def test_activation_checkpointing_refused_for_lstm():
    cfg = config("model.arch=lstm", "train.activation_checkpointing=true")
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: model.arch=lstm"):
        speed.check(cfg)
    speed.check(config("model.arch=llama", "train.activation_checkpointing=true"))
    # As the launch plan checks it: before the dataset has set the vocab.
    unset = config("train.activation_checkpointing=true")
    speed.check(
        unset.model_copy(update={"model": unset.model.model_copy(update={"vocab_size": None})})
    )


def test_compile_same_losses():
    """ZeRO 3, whose parameter hooks are what compile could break (ZeRO 0 passes too; each
    compile takes the CPU inductor a minute, so one stage here)."""
    base = ["model.n_layer=1", "model.dropout=0.0", "zero.stage=3"]
    plain = losses(config(*base), steps=2)
    compiled = losses(config(*base, "train.compile=true"), steps=2)
    assert compiled == pytest.approx(plain, rel=1e-4, abs=1e-5)
