"""The model architectures, one file per `model.arch`, behind one small interface.

    from lmforge import models
    model = models.build(cfg.model)                   # an nn.Module
    logits, loss = model(idx, targets)                # (B, T) ids -> (B, T, V), mean CE loss
    arch = models.get(cfg.model.arch)                 # or models.of(model)
    cache = arch.new_cache(model, 1, device, dtype)   # arch.new_cache is None: no cache
    arch.n_params(cfg.model), arch.flops_per_token(cfg.model)
    arch.activation_bytes(cfg.model, micro_batch, 2)  # bf16 activations, the logits apart

What `build` returns is an `nn.Module` with `cfg` (its `ModelConfig`) and
`forward(idx, targets=None, cache=None, *, segments=None) -> (logits, loss)`: the loss is
None without targets; with a cache, `idx` continues the cached sequence and the cache
advances. A cache has `length` (positions it holds) and `capacity` (the most it can hold).
`segments` (B, T) ids make `idx` a packed window of several examples that never see each
other (`attention.segment_layout`; lstm restarts its state at each example). Targets of
-100 are no targets (`lm_loss`).

Counting, one definition for every caller (the launch estimate, the trainer's log line
and MFU, the benchmarks):
- `n_params`: every parameter the model holds, tied weights once. It is what memory holds,
  so the ZeRO estimate, the "M params" line and the logged `model.n_params` use it.
- `flops_per_token`: training FLOPs (forward and backward) of one token, PaLM's convention
  (Chowdhery et al. 2022, appendix B): 6 × the weights of the matrix multiplies (Kaplan et
  al. 2020's non-embedding N: lookup tables do no arithmetic; an output projection, tied
  or not, is a matmul and counts) plus attention's 12·L·d·T. The MFU numerator.
- `activation_bytes`: what one micro-batch's forward keeps for backward, every layer and
  the final norm, at the start of backward (the step's peak): the tensors autograd saves
  (and a fused kernel's own workspace), counted per architecture as Korthikanti et al.
  2022 (sec. 4.1) count GPT-3's, but for the kernels our code actually calls. The logits
  (the same cross-entropy in every architecture) are `lmforge.estimate`'s, counted once.

Adding an architecture is a new file `models/<name>.py` that defines `ARCH =
Architecture(...)` and `<name>` added to `ModelConfig.arch`'s choices; the trainer,
generation, estimate, checkpoints and export know only this interface, never a name.
This package imports no Ray, DeepSpeed or MLflow.
"""

from __future__ import annotations

import functools
import importlib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from lmforge.config import ConfigError, ModelConfig

if typing.TYPE_CHECKING:
    import torch


class Cache(Protocol):
    length: int  # positions held
    capacity: int | float  # the most it can hold (math.inf: a recurrent state)


class LanguageModel(Protocol):
    """What `build` returns (an `nn.Module`), as generation and the trainer use it."""

    cfg: ModelConfig

    def __call__(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: Any = None,
        *,
        segments: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass(frozen=True)
class Architecture:
    """One `model.arch`: how to build it, count it, cache it and map it to Hugging Face."""

    name: str
    build: Callable[[ModelConfig], Any]  # -> an nn.Module that is a LanguageModel
    n_params: Callable[[ModelConfig], int]  # every parameter, from the config alone
    flops_per_token: Callable[[ModelConfig], float]  # training FLOPs of one token
    # (cfg, micro batch, bytes per activation element: 2 for bf16/fp16, 4 for fp32) -> bytes
    # the forward keeps for backward, the logits and the cross-entropy excepted.
    activation_bytes: Callable[[ModelConfig, int, int], float]
    # (model, batch, device, dtype) -> a Cache for generation; None: generate without one.
    new_cache: Callable[[Any, int, Any, Any], Cache] | None = None
    # False for a recurrent model: a prompt of any length is fed whole when generating.
    context_limited: bool = True
    # cfg -> the state-dict names that alias another weight (tied): not written, not
    # expected on load.
    tied: Callable[[ModelConfig], tuple[str, ...]] = lambda cfg: ()
    # Our state dict -> Hugging Face's names and layouts; None: no transformers equivalent.
    # (cfg, state dict) -> HF state dict; (cfg, eot id) -> config.json.
    hf_state_dict: (
        Callable[[ModelConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None
    ) = None
    hf_config: Callable[[ModelConfig, int], dict] | None = None
    # Hugging Face -> ours (`lmforge import-hf`): the config.json `architectures` entries
    # this maps exactly, and (config.json, HF state dict) -> (the ModelConfig fields it
    # sets, vocab_size and context_length included; our state dict). It raises ConfigError,
    # naming the key, for a config it cannot map exactly.
    hf_architectures: tuple[str, ...] = ()
    from_hf: (
        Callable[
            [dict[str, Any], dict[str, torch.Tensor]],
            tuple[dict[str, Any], dict[str, torch.Tensor]],
        ]
        | None
    ) = None


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (fp32) of `logits` (B, T, V) over the `targets` (B, T) that are not
    -100 (F.cross_entropy's ignore_index: prompt tokens, padding).

    A batch with no target at all gives a loss of 0 (still on the graph: backward gives zero
    gradients), not cross_entropy's NaN of 0/0; a caller averaging over micro-batches should
    weight each by its target count, so such a batch weighs 0. No host sync.
    """
    import torch
    import torch.nn.functional as F

    flat = targets.reshape(-1)
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), flat)
    return torch.where((flat != -100).any(), loss, torch.zeros_like(loss))


def names() -> tuple[str, ...]:
    """The architectures `model.arch` accepts (the config schema's list)."""
    return typing.get_args(ModelConfig.model_fields["arch"].annotation)


@functools.cache
def get(arch: str) -> Architecture:
    """The architecture named `arch`, from `lmforge/models/<arch>.py`."""
    if arch not in names():
        raise ConfigError(f"model.arch={arch!r}: unknown architecture (one of {names()})")
    return importlib.import_module(f"{__name__}.{arch}").ARCH


def of(model: LanguageModel) -> Architecture:
    """The architecture of a built model."""
    return get(model.cfg.arch)


def build(cfg: ModelConfig):
    """The model `cfg` describes, freshly initialised (seed torch first for a fixed init)."""
    return get(cfg.arch).build(cfg)
