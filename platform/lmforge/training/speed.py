"""Speed and memory options of the model the trainer builds: `train.activation_checkpointing`
and `train.compile`.

    from lmforge.training import speed
    speed.check(cfg)                  # refuses an unsupported combination, one line
    speed.checkpoint_blocks(model)    # before deepspeed.initialize
    speed.compile_engine(engine)      # after it: DeepSpeed's engine.compile (module.compile)

Activation checkpointing recomputes each block's forward in backward instead of keeping its
activations: torch.utils.checkpoint with use_reentrant=False around every block of the
model's one `nn.ModuleList` of blocks (gpt2's `h`, llama's `layers`). The block's forward is
replaced on the instance, so parameter names, state dicts and checkpoints are unchanged, and
ZeRO 3's gather hooks (on the submodules) fire again for the recomputation. The RNG state is
restored for the recomputation (dropout draws the same mask): the loss and gradients equal
those without it. Without grad (evaluation, generation) the block runs as before.

`compile` uses `nn.Module.compile` (in place, through DeepSpeed's `engine.compile`), so the
parameter names keep no `_orig_mod.` prefix either.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from lmforge.config import Config, ConfigError


def blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of blocks: its one direct `nn.ModuleList` child; None if it has none
    (an LSTM's layers are one fused `nn.LSTM`) or several."""
    lists = [m for m in model.children() if isinstance(m, nn.ModuleList)]
    return lists[0] if len(lists) == 1 else None


def check(cfg: Config) -> None:
    """Refuse what the options cannot do, before any engine is built."""
    if cfg.train.activation_checkpointing:
        from lmforge import models

        arch = models.get(cfg.model.arch)
        with torch.device("meta"):  # its module layout only: no memory, no weights
            probe = arch.build(cfg.model.model_copy(update={"vocab_size": 16}))
        if blocks(probe) is None:
            raise ConfigError(
                f"train.activation_checkpointing: model.arch={cfg.model.arch} has no list of "
                "blocks to recompute (its layers are one fused module); set it to false"
            )
    if cfg.train.compile and not hasattr(torch, "compile"):
        raise ConfigError(f"train.compile: torch {torch.__version__} has no torch.compile")


def _checkpointed(forward, *args: Any, **kwargs: Any):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module) -> int:
    """Wrap every block's forward in activation checkpointing; returns how many."""
    found = blocks(model)
    if found is None:
        raise ConfigError(
            f"train.activation_checkpointing: {type(model).__name__} has no list of blocks "
            "to recompute; set it to false"
        )
    for block in found:
        if not getattr(block, "_lmforge_checkpointed", False):
            block.forward = functools.partial(_checkpointed, block.forward)
            block._lmforge_checkpointed = True
    return len(found)


def compile_engine(engine) -> None:
    """torch.compile the engine's module in place (DeepSpeed's `engine.compile`)."""
    engine.compile()


def apply_plain(model: nn.Module, cfg: Config) -> nn.Module:
    """The same options on a model trained without DeepSpeed (the benchmarks' plain loop)."""
    if cfg.train.activation_checkpointing:
        checkpoint_blocks(model)
    if cfg.train.compile:
        model.compile()
    return model
