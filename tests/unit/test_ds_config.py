import pytest

from lmforge.config import load_config
from lmforge.training.ds_config import deepspeed_config
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "tiny.yaml"


def test_batch_sizes_follow_workers_and_accumulation():
    cfg = load_config(TINY, ["train.micro_batch_size=4", "train.grad_accum_steps=3"])
    ds = deepspeed_config(cfg, world_size=5)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 5


def test_schedule_optimizer_and_clipping_come_from_train():
    cfg = load_config(TINY, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=7",
                             "train.max_steps=70", "train.grad_clip=0.5", "train.weight_decay=0.2"])  # fmt: skip
    ds = deepspeed_config(cfg, 2)
    sched = ds["scheduler"]["params"]
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert sched["total_num_steps"] == 70 and sched["warmup_num_steps"] == 7
    assert sched["cos_min_ratio"] == pytest.approx(0.1)
    assert ds["optimizer"]["params"]["lr"] == 1e-3
    assert ds["optimizer"]["params"]["weight_decay"] == 0.2
    assert ds["gradient_clipping"] == 0.5


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
