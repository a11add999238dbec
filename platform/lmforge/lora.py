"""Low-rank adapters (LoRA, Hu et al. 2021) on a frozen base, through the peft library.

    settings = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=("c_attn", "c_proj"))
    add_adapters(model, settings)        # in place: the base is frozen, adapters train
    adapter_state_dict(model)            # only the adapters: what a LoRA version stores
    merged_state_dict(model)             # the base's names and shapes, W + (alpha/r)·B·A

peft's `inject_adapter_in_model` replaces each targeted `nn.Linear` in place by a LoRA
layer (`base_layer` plus `lora_A`/`lora_B`), so the model keeps its own class, `cfg` and
forward: the trainer, DeepSpeed, generation and `lmforge.models` see the same module.
Every base parameter has `requires_grad=False`: an optimizer over the trainable
parameters never moves it (tested bit for bit). peft's own state-dict helpers name the
adapter weights; the merged weights are computed with the layers' `get_delta_weight`,
which is the formula peft's `merge()` applies.

The targets are module names (the last part of the dotted path, as peft matches them):
`target_modules` from the config, else every linear layer but the output head. A model
without linear layers to adapt (an LSTM's recurrent weights are not `nn.Linear`) is
refused with a message that names the targets it has.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lmforge.errors import UsageError

HEAD = "lm_head"  # our models' output projection: not adapted by default


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # None: every linear layer but the head


def linear_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's `nn.Linear` modules (what peft can target)."""
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if _is_linear(m) and not _in_adapter(n)
    }
    return sorted(names)


def _is_linear(m: torch.nn.Module) -> bool:
    """An `nn.Linear`, or one an earlier adapter wrapped (peft's layer around `base_layer`)."""
    return isinstance(m, torch.nn.Linear) or isinstance(
        getattr(m, "base_layer", None), torch.nn.Linear
    )


def _in_adapter(name: str) -> bool:
    """A linear layer peft added (an adapter's A or B) or wrapped (its `base_layer`): not a
    layer of the model itself, when another adapter is added beside the first."""
    parts = name.split(".")
    return "base_layer" in parts or any(p.startswith("lora_") for p in parts)


def targets(model: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """The module names to adapt, checked against the model."""
    have = linear_names(model)
    if settings.target_modules is None:
        chosen = [n for n in have if n != HEAD]
        if not chosen:
            arch = getattr(getattr(model, "cfg", None), "arch", type(model).__name__)
            raise UsageError(
                f"train.lora: {arch} has no linear layers to adapt besides {HEAD} "
                f"(its linear layers: {have}); set train.lora.target_modules or train fully"
            )
        return chosen
    missing = [n for n in settings.target_modules if n not in have]
    if missing:
        raise UsageError(
            f"train.lora.target_modules: {missing} are not linear layers of this model "
            f"(it has {have})"
        )
    return list(settings.target_modules)


def add_adapters(
    model: torch.nn.Module, settings: LoraSettings, name: str = "default"
) -> torch.nn.Module:
    """Freeze `model` and add LoRA adapters to its target layers, in place (`name`: to hold
    several adapters side by side, as a server does)."""
    from peft import LoraConfig, inject_adapter_in_model

    chosen = targets(model, settings)
    for p in model.parameters():
        p.requires_grad_(False)
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=chosen,
        bias="none",
    )
    with warnings.catch_warnings():  # a second adapter: peft warns of several adapters
        warnings.filterwarnings("ignore", "Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)  # new adapters require grad
    return model


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only, under peft's names (`...c_attn.lora_A.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter(
    model: torch.nn.Module, state: dict[str, torch.Tensor], name: str = "default"
) -> None:
    """Put saved adapter weights into a model that `add_adapters` prepared the same way."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state, adapter_name=name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    # Only this adapter's layers: another adapter loaded before is not "missing" here.
    missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
    if unexpected or missing:
        raise UsageError(
            f"the adapter does not fit this model: {len(unexpected)} adapter weights match no "
            f"layer (e.g. {unexpected[:2]}), {len(missing)} layers get none (e.g. {missing[:2]})"
        )


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under their own names (adapters left out, unmerged)."""
    out = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = tensor
    return out


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base's state dict with every adapter folded in: a plain model of the same shape."""
    from peft.tuners.lora import LoraLayer

    out = base_state_dict(model)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter)
                key = f"{name}.weight"
                out[key] = (out[key].float() + delta.float()).to(out[key].dtype)
    return out


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameters, for the run's first line."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def settings_of(lora_config) -> LoraSettings:
    """LoraSettings from the config's `train.lora` section."""
    targets = lora_config.target_modules
    return LoraSettings(
        r=lora_config.r,
        alpha=lora_config.alpha,
        dropout=lora_config.dropout,
        target_modules=tuple(targets) if targets is not None else None,
    )


def saved_names(
    named: dict[str, torch.Tensor], adapter: str = "default"
) -> dict[str, torch.Tensor]:
    """Trainable parameters by `named_parameters()` name -> peft's saved names (the adapter's
    name dropped: `...lora_A.default.weight` -> `...lora_A.weight`), as
    `adapter_state_dict` gives them and `load_adapter` takes them."""
    return {k.replace(f".{adapter}.", "."): v for k, v in named.items()}
