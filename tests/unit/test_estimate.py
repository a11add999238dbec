"""The launch form's estimates against their references."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
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


def test_flops_per_step_are_the_counted_flops_of_its_tokens():
    """The estimate's FLOPs (the trainer's MFU numerator too) against torch's FLOP counter
    over one worker's micro-batch, forward and backward, times the micro-batches of a step."""
    overrides = ["model.vocab_size=300", "scaling.num_workers=2", "train.grad_accum_steps=3"]
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", overrides)
    est = estimate(cfg)
    b, t = cfg.train.micro_batch_size, cfg.model.context_length
    idx = torch.randint(0, 300, (b, t))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = models.build(cfg.model)(idx, targets=idx)
        loss.backward()
    assert est.tokens_per_step == b * t * 3 * 2
    assert est.flops_per_step == counter.get_total_flops() * 3 * 2


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
