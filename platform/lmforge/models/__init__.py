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

Settings: `ModelConfig` holds the `model:` keys every architecture has; each architecture
adds its own, with their defaults and checks, in a subclass named `Settings` in its file
(llama's `n_kv_head`, lstm's `tie_embeddings`). `ModelConfig(...)` and a validated config
give the `Settings` of their `arch`, so `cfg.model.n_kv_head` is llama's field; a key of
another architecture is refused, one left at None (an older config) dropped.

Adding an architecture is one new file `models/<name>.py` that defines `class
Settings(ModelConfig)` and `ARCH = Architecture(settings=Settings, ...)`: the file's name
is its `model.arch` (`names()` finds it), and the config schema, trainer, generation,
estimate, checkpoints, export and the Launch form know only this interface, never a name.
This package imports no Ray, DeepSpeed or MLflow; importing it (or `lmforge.config`)
imports no torch: an architecture's file is imported when a config names it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import pkgutil
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from lmforge.errors import ConfigError

if typing.TYPE_CHECKING:
    import torch


class ModelConfig(BaseModel):
    """The `model:` section: which architecture (`lmforge/models/<arch>.py`) and the sizes
    every architecture has. An architecture's file adds its own keys, defaults and checks in
    a subclass, its `Settings`; `ModelConfig(arch=..., ...)` and a validated config are
    instances of the `Settings` of their `arch`."""

    # extra="forbid": a misspelt key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Which of the keys below an architecture does not read (an LSTM has no heads): their
    # checks are skipped and the Launch form leaves them out.
    unused: ClassVar[frozenset[str]] = frozenset()

    arch: str = Field(
        "gpt2",
        description="Architecture: the name of a file in lmforge/models/, e.g. gpt2 (learned "
        "positions, LayerNorm, GELU MLP), llama (rotary positions, RMSNorm, SwiGLU, "
        "grouped-query attention, no biases) or lstm (a recurrent baseline: embedding, LSTM "
        "layers, linear head); each adds settings of its own.",
    )
    n_layer: int = Field(2, ge=1, description="Number of blocks (LSTM layers for lstm).")
    n_head: int = Field(
        2, ge=1, description="Attention heads per block; must divide d_model (not for lstm)."
    )
    d_model: int = Field(
        128, ge=8, description="Width of the residual stream (embedding and hidden size for lstm)."
    )
    context_length: int = Field(128, ge=8, description="Longest sequence the model sees.")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on attention and MLP (between LSTM layers and before the head "
        "for lstm).",
    )
    vocab_size: int | None = Field(
        None, ge=2, description="Taken from the dataset's tokenizer when unset; must match it."
    )

    def __new__(cls, *args: Any, **data: Any) -> ModelConfig:
        # `ModelConfig(arch="llama", ...)` is llama's `Settings`. An unknown arch stays a
        # ModelConfig, whose validation refuses it with the error of any other bad value.
        if cls is ModelConfig:
            with contextlib.suppress(ConfigError, TypeError):  # TypeError: no name at all
                cls = settings(data.get("arch", cls.model_fields["arch"].default))
        return super().__new__(cls)

    @model_validator(mode="wrap")
    @classmethod
    def _as_its_architecture(cls, data: Any, handler: Any) -> ModelConfig:
        """Validate a mapping as the `Settings` of its `arch`. A key another architecture
        reads is refused unless None (an older config listed every architecture's keys, at
        None); None for a key of this one's means its default."""
        if not isinstance(data, dict):
            return handler(data)
        data = dict(data)
        default = cls.model_fields["arch"].default if cls is ModelConfig else _name(cls)
        arch = data.setdefault("arch", default)
        try:
            target = settings(arch)
        except (ConfigError, TypeError):  # TypeError: no name at all (a list, a mapping)
            known = names()
            expected = ", ".join(map(repr, known[:-1])) + f" or {known[-1]!r}"
            _refuse(cls, [("arch", f"Input should be {expected}", arch)])
        if cls is not ModelConfig and target is not cls:
            _refuse(cls, [("arch", f"{cls.__module__}.Settings is {default}'s", arch)])
        own, problems = target.model_fields, []
        for key, value in list(data.items()):
            if key in own:
                if value is None and key not in ModelConfig.model_fields:
                    del data[key]  # the architecture's default
                continue
            if any(key in settings(n).model_fields for n in names()):
                if value is None:
                    del data[key]  # another architecture's key, unset
                    continue
                msg = f"model.{key}={value} is not a setting of model.arch={arch}; remove it"
            else:
                msg = f"unknown key (known: {', '.join(own)})"
            problems.append((key, msg, data))
        if problems:
            _refuse(cls, problems)
        return handler(data) if target is cls else target.model_validate(data)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> ModelConfig:
        if "n_head" not in self.unused and self.d_model % self.n_head:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}"
            )
        return self


def _name(settings_class: type[ModelConfig]) -> str:
    """The architecture a `Settings` class belongs to: the name of the file defining it."""
    return settings_class.__module__.rpartition(".")[2]


def _refuse(cls: type, problems: list[tuple[str, str, Any]]) -> typing.NoReturn:
    """Raise (key, message, input) problems as pydantic's errors of those keys, so that the
    config's report files each under `model.<key>` (an input that is the whole mapping adds
    no "(got ...)")."""
    raise ValidationError.from_exception_data(
        cls.__name__,
        [
            {
                "type": PydanticCustomError("model_setting", "{msg}", {"msg": msg}),
                "loc": (key,),
                "input": value,
            }
            for key, msg, value in problems
        ],
    )


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


@dataclass(frozen=True, kw_only=True)
class Architecture:
    """One `model.arch`: its settings, how to build it, count it, cache it and map it to
    Hugging Face."""

    settings: type[ModelConfig]  # the file's `Settings`: the model.* keys it reads
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
    # (model, slots, device, dtype) -> a server's running-batch cache (lmforge.serving:
    # `use`, `put`, `move`, `capacity`, `rows`); None: attention.SlotCache when `new_cache`
    # gives a KVCache, else requests run one at a time.
    new_slots: Callable[[Any, int, Any, Any], Any] | None = None
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
    name: str = ""  # the file's name, which `get` fills in: a copied file needs no edit


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


def vocab(cfg: ModelConfig) -> int:
    """`model.vocab_size`, which a model needs (the config may leave it to the tokenizer)."""
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size must be set (it comes from the tokenizer)")
    return cfg.vocab_size


def _files() -> list[str]:
    """The modules of this package that may be architectures (helpers like `attention` too)."""
    found = pkgutil.iter_modules(__path__)
    return sorted(m.name for m in found if not m.ispkg and not m.name.startswith("_"))


def names() -> tuple[str, ...]:
    """The architectures `model.arch` accepts: the files of this package with an `ARCH`."""
    return tuple(n for n in _files() if _spec(n) is not None)


def _spec(name: str) -> Architecture | None:
    spec = getattr(importlib.import_module(f"{__name__}.{name}"), "ARCH", None)
    return spec if isinstance(spec, Architecture) else None


@functools.cache
def get(arch: str) -> Architecture:
    """The architecture named `arch`, from `lmforge/models/<arch>.py`."""
    spec = _spec(arch) if arch in _files() else None
    if spec is None:
        raise ConfigError(f"model.arch={arch!r}: unknown architecture (one of {names()})")
    if not (issubclass(spec.settings, ModelConfig) and spec.settings is not ModelConfig):
        raise TypeError(f"{__name__}.{arch}: ARCH.settings must be a subclass of ModelConfig")
    return dataclasses.replace(spec, name=arch)


def settings(arch: str) -> type[ModelConfig]:
    """The `Settings` of architecture `arch`: the `model.*` keys it reads."""
    return get(arch).settings


def own_keys(arch: str) -> tuple[str, ...]:
    """The `model.*` keys architecture `arch` adds to the shared ones."""
    return tuple(k for k in settings(arch).model_fields if k not in ModelConfig.model_fields)


def of(model: LanguageModel) -> Architecture:
    """The architecture of a built model."""
    return get(model.cfg.arch)


def build(cfg: ModelConfig):
    """The model `cfg` describes, freshly initialised (seed torch first for a fixed init)."""
    return get(cfg.arch).build(cfg)
