"""A DeepSpeed engine built as the trainer builds it, for the unit tests' gloo group of one."""

from __future__ import annotations

import functools

import torch

from lmforge.training.ds_config import deepspeed_config, lr_factor
from lmforge.training.loop import param_groups


def one_rank_engine(model: torch.nn.Module, cfg):
    """`model` in DeepSpeed with the trainer's parameter groups, config and LR schedule."""
    import deepspeed

    eng, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg, world_size=1),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, functools.partial(lr_factor, cfg=cfg)
        ),
    )
    return eng
