"""Our config -> DeepSpeed's JSON config. The only place that writes DeepSpeed settings."""

from __future__ import annotations

from typing import Any

from lmforge.config import Config


def deepspeed_config(cfg: Config, world_size: int) -> dict[str, Any]:
    t, z = cfg.train, cfg.zero
    offload = z.offload_optimizer != "none"
    zero: dict[str, Any] = {"stage": z.stage}
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
                # torch's AdamW needs no compiled op and works with ZeRO and offload alike;
                # on GPUs with offload, DeepSpeedCPUAdam (a compiled op) is much faster.
                "torch_adam": not (offload and cfg.scaling.use_gpu),
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                "warmup_num_steps": max(1, t.warmup_steps),
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": t.min_lr / t.lr,
            },
        },
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # our own progress lines replace DeepSpeed's
        "wall_clock_breakdown": False,
    }
