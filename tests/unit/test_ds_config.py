"""What the DeepSpeed config we derive does: real engines built from `deepspeed_config(cfg, 1)`.

One process, a gloo group of one (DS_ACCELERATOR=cpu where no other accelerator was picked
first), a tiny token model, a few steps each: the ZeRO stage, optimizer, offload, gradient
accumulation, clipping, bf16 and the learning-rate schedule are checked by what the engine
does when stepped, not by reading back the dict.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lmforge.config import load_config
from lmforge.training.ds_config import deepspeed_config, lr_factor
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "tiny.yaml"
VOCAB, WIDTH, MICRO, CONTEXT = 32, 16, 4, 8
# DeepSpeed calls torch.distributed APIs that torch has deprecated; not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.usefixtures("gloo_group"),  # torch.distributed over gloo (tests/unit/conftest.py)
]


class TokenModel(torch.nn.Module):
    """Embedding -> linear head: the shape of a language model, a few hundred weights."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, WIDTH)
        self.head = torch.nn.Linear(WIDTH, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


def engine(*overrides: str):
    """A DeepSpeed engine as the trainer builds one: our config, our lr schedule."""
    import deepspeed

    cfg = load_config(TINY, [f"train.micro_batch_size={MICRO}", *overrides])
    torch.manual_seed(0)
    model = TokenModel()
    eng, *_ = deepspeed.initialize(
        model=model,
        model_parameters=model.parameters(),
        config=deepspeed_config(cfg, world_size=1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, functools.partial(lr_factor, cfg=cfg)
        ),
    )
    return cfg, eng


def batch(seed: int = 0, tokens: int = VOCAB) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, tokens, (MICRO, CONTEXT), generator=g)
    return x, torch.randint(0, VOCAB, (MICRO, CONTEXT), generator=g)


def micro_step(eng, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> float:
    logits = eng(x.to(eng.device))
    loss = torch.nn.functional.cross_entropy(
        logits.float().flatten(0, 1), y.to(eng.device).flatten()
    )
    eng.backward(loss * scale)
    eng.step()
    return loss.item()


def full_weights(eng) -> dict[str, torch.Tensor]:
    """fp32 weights: the optimizer's master copy under ZeRO 1-3, the module's under stage 0."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in eng.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p if full is None else full).detach().float().cpu().clone()
    return out


def adam_state(eng) -> list[dict[str, torch.Tensor]]:
    """The AdamW moments of every (fp32, possibly flattened) tensor the optimizer steps."""
    return [s for s in eng.basic_optimizer.state.values() if "exp_avg" in s]


def norm(tensors) -> float:
    return math.sqrt(sum(float(t.float().pow(2).sum()) for t in tensors))


@pytest.mark.parametrize(
    "stage, offload_optimizer, offload_params",
    [(0, "none", "none"), (1, "none", "none"), (2, "cpu", "none"), (3, "cpu", "cpu")],
)
def test_zero_stage_and_offload_are_the_engines(stage, offload_optimizer, offload_params):
    cfg, eng = engine(
        f"zero.stage={stage}", f"zero.offload_optimizer={offload_optimizer}",
        f"zero.offload_params={offload_params}",
    )  # fmt: skip
    assert eng.zero_optimization_stage() == stage
    # torch's AdamW on CPU (DeepSpeedCPUAdam is a compiled op), with our hyperparameters.
    assert type(eng.basic_optimizer) is torch.optim.AdamW
    group = eng.basic_optimizer.param_groups[0]
    assert tuple(group["betas"]) == (cfg.train.beta1, cfg.train.beta2)
    assert group["weight_decay"] == cfg.train.weight_decay
    micro_step(eng, *batch())
    state = adam_state(eng)
    assert state, "no optimizer step was taken"
    # ZeRO-Offload keeps the optimizer state in host memory, else it lives on the engine's
    # device (the same place on a CPU-only machine; on a GPU this tells them apart).
    where = torch.device("cpu") if offload_optimizer == "cpu" else eng.device
    assert {s["exp_avg"].device.type for s in state} == {where.type}
    offload = eng.zero_offload_optimizer()
    assert (offload.device if offload else "none") == offload_optimizer
    if stage == 3:  # ZeRO 3 partitions the parameters themselves, offloaded or not
        assert all(hasattr(p, "ds_tensor") for p in eng.module.parameters())
        where = torch.device("cpu") if offload_params == "cpu" else eng.device
        assert {p.ds_tensor.device.type for p in eng.module.parameters()} == {where.type}
        assert eng.zero_offload_param().device == offload_params
    else:
        assert not any(hasattr(p, "ds_tensor") for p in eng.module.parameters())


def test_optimizer_steps_once_per_accumulation_and_averages_the_micro_batches():
    common = ["train.warmup_steps=0", "train.grad_clip=0"]
    _, acc = engine("train.grad_accum_steps=3", *common)
    assert acc.train_batch_size() == MICRO * 3  # world size 1
    x, y = batch()
    before = full_weights(acc)
    for micro in range(3):
        assert acc.is_gradient_accumulation_boundary() == (micro == 2)
        micro_step(acc, x, y)
        changed = any(not torch.equal(before[k], w) for k, w in full_weights(acc).items())
        assert changed == (micro == 2), f"weights changed after micro-step {micro}"
        assert acc.global_steps == (micro == 2)
    # Three micro-batches of the same data are one step on it: DeepSpeed averages the
    # accumulated gradients (a sum would triple exp_avg = (1 - beta1) * gradient).
    _, one = engine("train.grad_accum_steps=1", *common)
    micro_step(one, x, y)
    for a, b in zip(adam_state(acc), adam_state(one), strict=True):
        torch.testing.assert_close(a["exp_avg"], b["exp_avg"], rtol=1e-5, atol=1e-8)
    for k, w in full_weights(one).items():
        torch.testing.assert_close(full_weights(acc)[k], w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "stage, precision, clip",
    [(0, "fp32", 0.5), (0, "bf16", 0.5), (2, "fp32", 0.5), (3, "bf16", 0.5), (2, "fp32", 0.0)],
)
def test_gradients_are_clipped_to_train_grad_clip(stage, precision, clip):
    cfg, eng = engine(
        f"zero.stage={stage}", f"train.precision={precision}", f"train.grad_clip={clip}"
    )
    micro_step(eng, *batch(), scale=1e3)  # a gradient far above the clip norm
    # After one AdamW step exp_avg = (1 - beta1) * the gradient the optimizer was given.
    stepped = norm(s["exp_avg"] for s in adam_state(eng)) / (1 - cfg.train.beta1)
    raw = eng.get_global_grad_norm()  # before clipping; DeepSpeed keeps none for stage 0 fp32
    if clip:
        assert stepped == pytest.approx(clip, rel=2e-2)
        assert raw is None or float(raw) > 100 * clip
    else:  # 0 disables clipping: the whole gradient reaches the optimizer
        assert stepped > 100 and stepped == pytest.approx(float(raw), rel=1e-3)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_bf16_computes_in_bf16_and_steps_fp32_master_weights(stage):
    _, eng = engine(f"zero.stage={stage}", "train.precision=bf16")
    assert eng.bfloat16_enabled()
    assert {p.dtype for p in eng.module.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert eng(batch()[0].to(eng.device)).dtype == torch.bfloat16
    micro_step(eng, *batch())
    master = list(eng.basic_optimizer.state)  # the tensors AdamW stepped
    assert master and {p.dtype for p in master} == {torch.float32}
    assert {s["exp_avg"].dtype for s in adam_state(eng)} == {torch.float32}
    _, fp32 = engine(f"zero.stage={stage}", "train.precision=fp32")
    assert not fp32.bfloat16_enabled()
    assert {p.dtype for p in fp32.module.parameters()} == {torch.float32}


def test_lr_follows_lr_factor_at_each_optimizer_step_not_each_micro_step():
    cfg, eng = engine(
        "zero.stage=1", "train.lr=1e-2", "train.min_lr=1e-3", "train.warmup_steps=2",
        "train.max_steps=5", "train.grad_accum_steps=2",
    )  # fmt: skip
    lrs = []
    for step in range(cfg.train.max_steps):
        for _ in range(2):
            lrs.append(eng.get_lr()[0])  # the rate the next optimizer step uses
            micro_step(eng, *batch(seed=step))
    want = [cfg.train.lr * lr_factor(s, cfg) for s in range(cfg.train.max_steps)]
    assert lrs == pytest.approx([lr for lr in want for _ in range(2)])
    assert want[0] == pytest.approx(cfg.train.lr / 2)  # warm-up starts above 0
    assert eng.get_lr()[0] == pytest.approx(cfg.train.min_lr)  # the end of the cosine


def test_first_step_uses_the_scheduled_lr_and_decays_weights():
    cfg, eng = engine(
        "zero.stage=2", "train.lr=1e-2", "train.warmup_steps=4", "train.max_steps=10",
        "train.weight_decay=0.2", "train.grad_clip=0",
    )  # fmt: skip
    lr0, wd, half = cfg.train.lr * lr_factor(0, cfg), cfg.train.weight_decay, VOCAB // 2
    before = full_weights(eng)["emb.weight"]
    micro_step(eng, *batch(tokens=half))  # embedding rows half.. get no gradient
    after = full_weights(eng)["emb.weight"]
    # AdamW's first step: w * (1 - lr * wd) - lr * g / (|g| + eps), elementwise.
    moved = (before[:half] * (1 - lr0 * wd) - after[:half]).abs()
    assert moved.median().item() == pytest.approx(lr0, rel=1e-3)
    assert moved.max().item() <= lr0 * (1 + 1e-4)
    # A row without a gradient only decays.
    torch.testing.assert_close(after[half:], before[half:] * (1 - lr0 * wd))


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_the_engine_steps_torchs_fused_adamw(stage):
    """The AdamW DeepSpeed builds is torch's fused kernel (one pass over each flat partition)."""
    _, eng = engine(f"zero.stage={stage}")
    assert isinstance(eng.basic_optimizer, torch.optim.AdamW)
    groups = eng.basic_optimizer.param_groups
    assert groups and all(g["fused"] for g in groups)
    micro_step(eng, *batch())  # the kernel takes ZeRO's partitions
    assert adam_state(eng)


def test_on_gpus_offload_uses_deepspeeds_cpu_adam():
    """Our own choice (no GPU needed to check it): with offload on GPUs DeepSpeedCPUAdam,
    a compiled op, steps the optimizer; everywhere else torch's AdamW (built above)."""
    gpu = load_config(TINY, ["zero.stage=2", "zero.offload_optimizer=cpu", "scaling.use_gpu=true"])
    assert deepspeed_config(gpu, 2)["optimizer"]["params"]["torch_adam"] is False
    assert "fused" not in deepspeed_config(gpu, 2)["optimizer"]["params"]  # not CPUAdam's
    assert deepspeed_config(gpu, 2)["zero_optimization"]["offload_optimizer"]["pin_memory"]


def test_lr_warms_up_from_the_first_step_then_decays_to_min_lr():
    cfg = load_config(TINY, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=4",
                             "train.max_steps=20"])  # fmt: skip
    lrs = [1e-3 * lr_factor(s, cfg) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # no step wasted at lr 0
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))  # then only down
    assert 1e-3 * lr_factor(20, cfg) == pytest.approx(1e-4)
    no_warmup = load_config(TINY, ["train.warmup_steps=0", "train.lr=1e-3"])
    assert lr_factor(0, no_warmup) == 1.0
