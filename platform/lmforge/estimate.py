"""What a config will cost before it runs: parameters, memory per worker, tokens per step.

    est = estimate(cfg)
    est.n_params, est.per_worker_bytes["total"], est.tokens_per_step

Model-state memory follows the ZeRO paper (Rajbhandari et al. 2020, sec. 3 and 5): with
mixed precision each parameter costs 2 bytes of weights, 2 of gradients and 12 of fp32
optimizer state (master weights, Adam m and v); in fp32 it is 4 + 4 + 8. Stage 1
partitions the optimizer state over the workers, stage 2 the gradients too, stage 3 the
weights as well. Activations are the architecture's own count (`activation_bytes`:
what its forward keeps for backward, Korthikanti et al. 2022's per-layer method applied
to the kernels it calls) plus the logits, counted here once for all of them (`logit_bytes`);
tests/unit/test_estimate.py holds the total within 20% of a CPU training step's measured
peak for each architecture.
Parameters and FLOPs are the architecture's own counts (`lmforge.models`: every parameter
for memory; 6 x the matmul weights + attention for FLOPs), the functions the trainer's MFU
uses too. The dashboard's launch form shows these figures live; `lmforge train` prints
none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge import models
from lmforge.config import Config, ModelConfig

GIB = 1024**3


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; what the launch form shows."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Estimate:
    n_params: int
    tokens_per_step: int  # all workers (elastic: the most), all micro-steps of one step
    flops_per_step: float
    per_worker_bytes: dict[str, float]  # weights, gradients, optimizer, activations, total
    offloaded_bytes: float  # per worker, held in host memory by ZeRO-Offload


def model_config(cfg: Config, vocab_size: int | None = None) -> ModelConfig:
    """`cfg.model` with its vocab size: `model.vocab_size`, else `vocab_size` (the dataset's)."""
    v = cfg.model.vocab_size or vocab_size
    if v is None:
        raise ValueError("the estimate needs model.vocab_size or the dataset's vocab size")
    return cfg.model.model_copy(update={"vocab_size": v})


def n_params(cfg: Config, vocab_size: int | None = None) -> int:
    """Every parameter of the model the config describes (its architecture's count)."""
    return models.get(cfg.model.arch).n_params(model_config(cfg, vocab_size))


def model_state_bytes(
    n: float, world: int, stage: int, mixed: bool = True
) -> tuple[float, float, float]:
    """(weights, gradients, optimizer state) bytes per worker under ZeRO `stage`."""
    weight_b, grad_b, optim_b = (2.0, 2.0, 12.0) if mixed else (4.0, 4.0, 8.0)
    return (
        n * weight_b / (world if stage >= 3 else 1),
        n * grad_b / (world if stage >= 2 else 1),
        n * optim_b / (world if stage >= 1 else 1),
    )


def logit_bytes(tokens: int, vocab: int, elem: int) -> float:
    """The logits' share of the peak, the same cross-entropy in every architecture.

    The peak of a step comes at the start of backward, in log-softmax's backward: the
    logits themselves (`elem` bytes; the trainer holds them until the step ends), the fp32
    log-softmax output cross-entropy saved, the fp32 gradient nll_loss hands back and the
    fp32 gradient of the logits it is turned into are all alive then, every other
    activation still saved: (elem + 3 * 4) bytes a token and vocabulary entry.
    """
    return tokens * vocab * (elem + 3 * 4)


def estimate(cfg: Config, vocab_size: int | None = None) -> Estimate:
    m = model_config(cfg, vocab_size)
    arch = models.get(m.arch)
    p, v = arch.n_params(m), m.vocab_size
    # Elastic [min, max]: memory with the fewest workers (ZeRO gives each the most to hold),
    # tokens per step with the most (the global batch follows the worker count).
    world, stage = cfg.scaling.max_workers, cfg.zero.stage
    mixed = cfg.train.precision != "fp32"
    weights, grads, optim = model_state_bytes(p, cfg.scaling.min_workers, stage, mixed)
    offloaded = 0.0
    if cfg.zero.offload_optimizer == "cpu":
        offloaded += optim
        optim = 0.0
    if cfg.zero.offload_params == "cpu":
        offloaded += weights
        weights = 0.0
    b, s = cfg.train.micro_batch_size, m.context_length
    elem = 2 if mixed else 4  # bytes of an activation (DeepSpeed casts the model)
    activations = arch.activation_bytes(m, b, elem) + logit_bytes(b * s, v, elem)
    tokens = b * s * cfg.train.grad_accum_steps * world
    flops = arch.flops_per_token(m) * tokens
    per_worker = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "activations": activations,
    }
    per_worker["total"] = sum(per_worker.values())
    return Estimate(p, tokens, flops, per_worker, offloaded)
