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
What DeepSpeed allocates beyond those ideal states is `buffers` (`deepspeed_buffers`:
its gradient buckets, the fp32 partition it clones, the flat gradient and AdamW's temporaries
of the step, ZeRO 3's gathered weights, each read from its source), and a CPU worker's fixed
cost of the DeepSpeed runtime is `runtime` (`RUNTIME_CPU_BYTES`, measured); a CPU worker's
offloaded optimizer state is its own resident memory, so it counts as `host_offload` there.
tests/unit/test_estimate.py holds the total within 20% of a real engine's peak resident
memory at ZeRO 2 and 3 on two gloo ranks, as bench/bench_growth.py --what model compares it.
Parameters and FLOPs are the architecture's own counts (`lmforge.models`: every parameter
for memory; 6 x the matmul weights + attention for FLOPs), the functions the trainer's MFU
uses too. The dashboard's launch form shows these figures live; `lmforge train` prints
none of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge import models
from lmforge.config import Config, ModelConfig

GIB = 1024**3
MIB = 1024**2

# DeepSpeed's defaults for the settings training/ds_config.py leaves unset (elements).
REDUCE_BUCKET = 500_000_000  # zero_optimization.reduce_bucket_size (runtime/zero/config.py)
ALLREDUCE_BUCKET = 500_000_000  # ZeRO 0's MEMORY_OPT_ALLREDUCE_SIZE (runtime/engine.py)
MAX_LIVE_PARAMS = 1_000_000_000  # stage3_max_live_parameters, stage3_max_reuse_distance

# A CPU worker's resident memory that does not grow with the model: the DeepSpeed modules and
# state deepspeed.initialize loads for the stage, the first step's oneDNN/autograd threads and
# their allocator arenas. Measured as bench/bench_growth.py measures a peak (each rank's peak
# RSS above its level before building the model, 6 steps, 2 gloo ranks x 1 thread) with a
# model of ~700 parameters (gpt2, 1 layer, d_model 8, vocab 16, context 8): ZeRO 0 91 MiB,
# ZeRO 1 and 2 92 MiB, ZeRO 3 93 MiB; torch 2.13 (CPU), DeepSpeed 0.19.8, 2026-12-07, with
# DeepSpeed imported as a worker imports it (`dist.import_deepspeed`: no Muon modules, whose
# torch._inductor cost ZeRO 1-3 ~47 MiB more before). A GPU worker's device memory holds
# none of this.
RUNTIME_CPU_BYTES = {0: 91 * MIB, 1: 92 * MIB, 2: 92 * MIB, 3: 93 * MIB}

# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: a freed block at most this big moves malloc's
# mmap threshold up to it, and later ones that size come from the heap, which keeps them
# resident after they are freed; bigger blocks are always mmapped and given back on free.
MMAP_MAX = 32 * MIB


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
    # weights, gradients, optimizer, activations, buffers, runtime (+ host_offload), total
    per_worker_bytes: dict[str, float]
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


def largest_param(m: ModelConfig) -> int:
    """Elements of the model's largest parameter (the embedding, mostly), from a model built
    on the meta device (shapes, no memory)."""
    with torch.device("meta"):
        return max(p.numel() for p in models.build(m).parameters())


@dataclass(frozen=True)
class Buffer:
    """Memory DeepSpeed (or the torch AdamW it steps) allocates beyond the paper's states."""

    name: str
    nbytes: float
    phase: str  # "all": held through the step; else when it lives: backward, reduce, step
    tensor: float  # bytes of its largest single tensor (what decides where malloc puts it)


def deepspeed_buffers(
    n: float,
    largest: float,
    world: int,
    stage: int,
    mixed: bool = True,
    offload: bool = False,
    gpu: bool = False,
) -> list[Buffer]:
    """DeepSpeed's allocations per worker on top of the ZeRO paper's model states, at the
    sizes the trainer's config (training/ds_config.py) leaves at DeepSpeed's defaults. `n`
    parameters, `largest` the largest one's elements. Paths under deepspeed/ (0.19.8)."""
    e = 2.0 if mixed else 4.0  # the model's (and its gradients') bytes per element
    part = n / world  # the elements of this worker's partition (ZeRO 1-3)
    out: list[Buffer] = []

    def add(name: str, nbytes: float, phase: str, tensor: float | None = None) -> None:
        out.append(Buffer(name, nbytes, phase, nbytes if tensor is None else tensor))

    if stage == 0:
        # engine.py allreduce_bucket, after backward: the gradients flattened into one
        # all-reduce bucket of at most MEMORY_OPT_ALLREDUCE_SIZE elements.
        add("allreduce_bucket", e * min(n, ALLREDUCE_BUCKET), "reduce")
        stepped = largest  # torch's AdamW steps each parameter on its own
    else:
        if not mixed:
            # stage_1_and_2.py __init__ (single_partition_of_fp32_groups) / stage3.py
            # _create_fp32_partitions: the fp32 master partition is a clone of the weights'
            # partition even when they are fp32 (in mixed precision it is 4 of the paper's 12
            # optimizer bytes).
            add("fp32_partition", 4.0 * part, "all")
        # stage_1_and_2.py setup_buckets (each backward, released at its epilogue) / stage3.py
        # __init__ (kept): the reduce (ipg) bucket, torch.empty(reduce_bucket_size), resident
        # as far as gradients are copied into it.
        add("reduce_bucket", e * min(n, REDUCE_BUCKET), "all" if stage == 3 else "backward")
        if stage == 3:
            # partitioned_param_coordinator.py __params_to_release: a gathered parameter is
            # released only if not used again within stage3_max_reuse_distance elements, so
            # a model under it keeps its full weights gathered through forward and backward.
            add("gathered_weights", e * min(n, MAX_LIVE_PARAMS), "all", e * largest)
            if not gpu:
                # Every forward gathers the weights afresh and backward frees them into
                # malloc's heap, where those under MMAP_MAX stay resident next to the new
                # step's gathers: a second copy of all but an over-MMAP_MAX largest one.
                # Measured, 14M ZeRO 3 on 2 gloo ranks: peak 761 MiB and creeping step by
                # step; with MALLOC_MMAP_THRESHOLD_=131072 (every freed tensor returned)
                # 539 MiB, flat after step 1 (this model without its malloc terms: 518).
                small = n - largest if e * largest > MMAP_MAX else n
                add("gathered_weights_freed", e * min(small, MAX_LIVE_PARAMS), "all")
        if stage == 1:
            # stage_1_and_2.py reduce_gradients / ipg_epilogue: the averaged gradient
            # partition, get_flat_partition's new fp32 flat tensor (ZeRO 2 reduces into the
            # gradients' own partition, counted as gradients).
            add("averaged_gradients", 4.0 * part, "reduce")
        if offload:
            # stage_1_and_2.py initialize_optimizer_states: the host fp32 partition's
            # gradient, kept; temp_grad_buffer_for_cpu_offload: one largest parameter.
            add("offload_gradients", 4.0 * part, "all")
            add("offload_grad_staging", 4.0 * largest, "all")
        else:
            # stage_1_and_2.py step / stage3.py _prepare_fp32_grad_for_sub_group: the
            # partition's gradients flattened into a new fp32 tensor for the optimizer.
            add("flat_gradient", 4.0 * part, "step")
        stepped = part  # one flat partition a parameter group; the decay group is nearly all
    if not (offload and gpu):  # DeepSpeedCPUAdam (GPU + offload) steps in place
        if gpu:  # torch/optim/adamw.py foreach step: `_foreach_sqrt` of all exp_avg_sq
            add("adamw_step", 4.0 * (part if stage else n), "step", 4.0 * stepped)
        else:  # on CPU the single-tensor step's `(exp_avg_sq.sqrt() / bias_correction2_sqrt)`
            add("adamw_step", 8.0 * stepped, "step", 4.0 * stepped)  # two fp32 temporaries
    return out


def transient_peak(items: list[Buffer], gpu: bool = False) -> float:
    """The peak of what a step allocates and frees (activations, buckets, the optimizer's
    temporaries). Each phase (backward, reduce, step) frees its tensors before the next; on
    a CPU the ones over MMAP_MAX go back to the system, so those phases peak one at a time,
    while smaller ones stay in malloc's heap, so they add up over the phases (on the bench's
    14M model, 16 MiB logits, the measured peaks grow by the sum; on 124M, 98 MiB logits, by
    the largest phase). On a GPU torch's caching allocator reuses freed blocks: the largest
    phase."""
    kept = 0.0 if gpu else sum(b.nbytes for b in items if b.tensor <= MMAP_MAX)
    phases: dict[str, float] = {}
    for b in items:
        if gpu or b.tensor > MMAP_MAX:
            phases[b.phase] = phases.get(b.phase, 0.0) + b.nbytes
    return kept + max(phases.values(), default=0.0)


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
    gpu = cfg.scaling.use_gpu
    offload = cfg.zero.offload_optimizer != "none"
    bufs = deepspeed_buffers(
        p, largest_param(m), cfg.scaling.min_workers, stage, mixed, offload, gpu
    )
    # The activations peak at the start of backward; the logits are their largest tensors.
    acts = Buffer("activations", activations, "backward", b * s * v * 4.0)
    held = sum(x.nbytes for x in bufs if x.phase == "all")
    peak = transient_peak([acts, *(x for x in bufs if x.phase != "all")], gpu)
    per_worker = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optim,
        "activations": activations,
        "buffers": held + peak - activations,  # DeepSpeed's, at the step's peak
        "runtime": 0.0 if gpu else RUNTIME_CPU_BYTES[stage],
    }
    if offloaded and not gpu:  # a CPU worker's host memory is its own
        per_worker["host_offload"] = offloaded
    per_worker["total"] = sum(per_worker.values())
    return Estimate(p, tokens, flops, per_worker, offloaded)
