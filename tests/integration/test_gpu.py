"""GPU path (NCCL, CUDA devices, bf16): runs only where a CUDA GPU is present."""

import pytest
import torch

from lmforge.checkpoint import read_state
from lmforge.training.launch import run_training
from tests.integration.conftest import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_one_gpu_worker_bf16_zero2(ray_cluster, dataset):
    cfg = tiny_config(dataset, "gpu", "scaling.use_gpu=true", "scaling.num_workers=1",
                      "train.precision=bf16", "train.max_steps=10", "train.checkpoint_every=10")  # fmt: skip
    result = run_training(cfg)
    state = read_state(result.checkpoint)
    assert state.step == 10
    assert state.evals[-1]["val_loss"] < state.evals[0]["val_loss"]
