"""The launch form's estimates against their references."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from lmforge import models
from lmforge.config import load_config
from lmforge.estimate import estimate, human_bytes, model_state_bytes, n_params
from tests.conftest import REPO


@pytest.mark.parametrize("stage, per_gpu_gb", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_model_states_match_the_zero_paper(stage, per_gpu_gb):
    """ZeRO paper, Figure 1: a 7.5B-parameter model with Adam, mixed precision, 64 GPUs."""
    total = sum(model_state_bytes(7.5e9, 64, stage, mixed=True)) / 1e9
    assert total == pytest.approx(per_gpu_gb, rel=0.02)


@pytest.mark.parametrize("shape", [[], ["model.n_layer=3", "model.d_model=96", "model.n_head=3"]])
def test_parameter_count_is_the_models(shape):
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["model.vocab_size=300", *shape])
    assert n_params(cfg) == sum(p.numel() for p in models.build(cfg.model).parameters())


@pytest.mark.parametrize("preset", ["tiny.yaml", "llama-tiny.yaml"])
def test_flops_per_step_are_the_counted_flops_of_its_tokens(preset):
    """The estimate's FLOPs (the trainer's MFU numerator too) against torch's FLOP counter
    over one worker's micro-batch, forward and backward, times the micro-batches of a step.
    (lstm: nn.LSTM is one op the counter cannot see into; test_lstm.py counts its
    recurrence written out.)"""
    overrides = ["model.vocab_size=300", "scaling.num_workers=2", "train.grad_accum_steps=3"]
    cfg = load_config(REPO / "jobs" / "configs" / preset, overrides)
    est = estimate(cfg)
    b, t = cfg.train.micro_batch_size, cfg.model.context_length
    idx = torch.randint(0, 300, (b, t))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = models.build(cfg.model)(idx, targets=idx)
        loss.backward()
    assert est.tokens_per_step == b * t * 3 * 2
    assert est.flops_per_step == counter.get_total_flops() * 3 * 2


def measure_training_step(cfg) -> tuple[int, int]:
    """(model state, peak of everything else) in bytes of a CPU training step in fp32.

    "Peak" is the most bytes live in torch's CPU allocator at once, summed from the
    profiler's record of every allocation and free: the CPU counterpart of
    `torch.cuda.max_memory_allocated`, what a GPU runs out of. Not the process's RSS, which
    also holds torch's code and what malloc keeps cached. The step is the trainer's:
    forward holding the logits (as its `_, loss = engine(...)` does), backward, AdamW. It
    is the second step that is measured: the gradients and Adam's moments exist by then and
    stay allocated (`zero_grad(set_to_none=False)`, as DeepSpeed's flat buffers keep
    them), so the model state is exactly what the ZeRO formula counts, and what the
    profiler sees on top of it is the activations and their transients.
    """
    torch.manual_seed(0)
    model = models.build(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(
        0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.context_length)
    )

    def step():
        _logits, loss = model(idx, targets=idx)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    step()
    state = [*model.parameters(), *(p.grad for p in model.parameters())]
    state += [t for s in opt.state.values() for k, t in s.items() if k != "step"]  # m, v
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Allocations (+bytes) and frees (-bytes) in time order; the profiler's public tables
    # give each op's net memory only.
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return sum(t.numel() * t.element_size() for t in state), peak


@pytest.mark.parametrize(
    "preset, shape",
    [
        ("tiny.yaml", ["model.context_length=128", "model.d_model=128", "model.n_head=4"]),
        (
            "llama-tiny.yaml",
            ["model.context_length=128", "model.d_model=128", "model.n_head=4",
             "model.n_kv_head=2"],
        ),
        ("lstm-tiny.yaml", ["model.context_length=64"]),
    ],
)  # fmt: skip
def test_memory_estimate_is_within_20_percent_of_a_measured_training_step(preset, shape):
    """One worker, ZeRO 0, fp32 on CPU: the estimate's total against the measured peak, and
    its activations against the measured peak less the model state, the part that is a
    formula rather than a byte count. Sizes where activations outweigh the model state, so
    that the total is mostly the activation formula."""
    overrides = ["model.vocab_size=512", "zero.stage=0", "scaling.num_workers=1", *shape]
    cfg = load_config(REPO / "jobs" / "configs" / preset, overrides)
    assert cfg.train.precision == "fp32" and cfg.model.dropout == 0
    est = estimate(cfg).per_worker_bytes
    state, activations = measure_training_step(cfg)
    est_mib, got_mib = est["activations"] / 2**20, activations / 2**20
    total_mib, got_total_mib = est["total"] / 2**20, (state + activations) / 2**20
    print(
        f"{cfg.model.arch}: estimated/measured MiB: activations {est_mib:.2f}/{got_mib:.2f},"
        f" total {total_mib:.2f}/{got_total_mib:.2f}"
    )
    assert activations > state
    assert est["total"] - est["activations"] == state  # 16 bytes a parameter in fp32
    assert est["activations"] == pytest.approx(activations, rel=0.2)
    assert est["total"] == pytest.approx(state + activations, rel=0.2)


def test_offload_moves_optimizer_state_to_the_host_and_tokens_count_every_worker():
    base = ["model.vocab_size=512", "scaling.num_workers=4", "train.grad_accum_steps=2"]
    path = REPO / "jobs" / "configs" / "tiny.yaml"
    on_device = estimate(load_config(path, [*base, "zero.stage=2"]))
    offloaded = estimate(load_config(path, [*base, "zero.stage=2", "zero.offload_optimizer=cpu"]))
    assert offloaded.per_worker_bytes["optimizer"] == 0
    assert offloaded.offloaded_bytes == on_device.per_worker_bytes["optimizer"] > 0
    assert on_device.tokens_per_step == 8 * 64 * 2 * 4


def test_human_bytes():
    assert [human_bytes(x) for x in (12, 1536, 5 * 2**20, 3 * 2**30)] == [
        "12 B", "1.5 KiB", "5.0 MiB", "3.0 GiB"
    ]  # fmt: skip
