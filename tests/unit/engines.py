"""A DeepSpeed engine built as the trainer builds it, for the unit tests' gloo group of one."""

from __future__ import annotations

import torch

from lmforge.training.loop import build_engine


def one_rank_engine(model: torch.nn.Module, cfg):
    """`model` in DeepSpeed with the trainer's parameter groups, config and LR schedule."""
    return build_engine(model, cfg, world=1)
