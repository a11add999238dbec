import pytest

from lmforge.config import load_config
from lmforge.training.ds_config import deepspeed_config, lr_factor
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "tiny.yaml"


def test_batch_sizes_follow_workers_and_accumulation():
    cfg = load_config(TINY, ["train.micro_batch_size=4", "train.grad_accum_steps=3"])
    ds = deepspeed_config(cfg, world_size=5)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 5


def test_optimizer_and_clipping_come_from_train():
    cfg = load_config(TINY, ["train.lr=1e-3", "train.grad_clip=0.5", "train.weight_decay=0.2"])
    ds = deepspeed_config(cfg, 2)
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["optimizer"]["params"]["weight_decay"] == 0.2
    assert ds["gradient_clipping"] == 0.5


def test_lr_warms_up_from_the_first_step_then_decays_to_min_lr():
    cfg = load_config(TINY, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=4",
                             "train.max_steps=20"])  # fmt: skip
    lrs = [1e-3 * lr_factor(s, cfg) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # no step wasted at lr 0
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))  # then only down
    assert 1e-3 * lr_factor(20, cfg) == pytest.approx(1e-4)
    no_warmup = load_config(TINY, ["train.warmup_steps=0", "train.lr=1e-3"])
    assert lr_factor(0, no_warmup) == 1.0


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_and_precision(stage):
    cfg = load_config(TINY, [f"zero.stage={stage}", "train.precision=bf16"])
    ds = deepspeed_config(cfg, 2)
    assert ds["zero_optimization"] == {"stage": stage}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]


def test_offload_on_cpu_keeps_torch_adam_and_on_gpu_uses_deepspeed_cpu_adam():
    cpu = load_config(
        TINY, ["zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_params=cpu"]
    )
    ds = deepspeed_config(cpu, 2)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no compiled op on CPU
    gpu = load_config(TINY, ["zero.stage=2", "zero.offload_optimizer=cpu", "scaling.use_gpu=true"])
    assert deepspeed_config(gpu, 2)["optimizer"]["params"]["torch_adam"] is False
    assert deepspeed_config(gpu, 2)["zero_optimization"]["offload_optimizer"]["pin_memory"]
