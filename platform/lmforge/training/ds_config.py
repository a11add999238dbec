"""Our config -> DeepSpeed's JSON config, and the learning-rate schedule.

The only place that writes DeepSpeed settings.
"""

from __future__ import annotations

import math
from typing import Any

from lmforge.config import Config


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed's config for `cfg` on `world_size` workers. `load_universal`: the engine
    will load a universal checkpoint (a resume on another number of workers)."""
    t, z = cfg.train, cfg.zero
    offload = z.offload_optimizer != "none"
    # torch's AdamW needs no compiled op and works with ZeRO and offload alike; on GPUs with
    # offload, DeepSpeedCPUAdam (a compiled op) is much faster.
    torch_adam = not (offload and cfg.scaling.use_gpu)
    zero: dict[str, Any] = {"stage": z.stage}
    if not cfg.scaling.use_gpu:
        # gloo: one all-reduce of the gradient bucket, each rank keeping its partition, is
        # faster than DeepSpeed's reduce of each slice to its owner (ZeRO 1/2; 14M fp32, 2
        # ranks: 0.585 -> 0.555 s a step, bench/ds_comm.py). On NCCL the reduce is the
        # better path; it is DeepSpeed's default there.
        zero["reduce_scatter"] = False
    if offload:
        zero["offload_optimizer"] = {
            "device": z.offload_optimizer,
            "pin_memory": cfg.scaling.use_gpu,
        }
    if z.offload_params != "none":
        zero["offload_param"] = {"device": z.offload_params, "pin_memory": cfg.scaling.use_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": torch_adam,
                # torch's fused kernel (CPU and CUDA): one pass over each of ZeRO's flat
                # partitions instead of ~10 elementwise ones, and no partition-sized
                # temporaries. A 7M-parameter partition on one CPU thread: 58.8 ms a step
                # for the default (for-loop) AdamW, 7.4 ms fused.
                **({"fused": True} if torch_adam else {}),
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 1 << 30,  # our own progress lines replace DeepSpeed's
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, cfg: Config) -> float:
    """Multiplier of `train.lr` for optimizer step `step` (0-based): linear warm-up, then
    cosine decay to `train.min_lr` at `train.max_steps`.

    Our own rather than DeepSpeed's WarmupCosineLR, which spends its first two steps at
    lr 0 and forces at least two warm-up steps.
    """
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    floor = t.min_lr / t.lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
