"""bench/gpu.sh and bench/gpu_train.py without a GPU: they stop at once, in one clear line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")


def test_gpu_train_without_cuda_fails_in_one_line():
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_train.py"), "--steps", "2"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench/gpu_train.py: no CUDA device")


def test_gpu_sh_without_wheels_fails_in_one_line(tmp_path):
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh")],
        capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**os.environ, "WHEELS": str(tmp_path / "none")},
    )  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"bench/gpu.sh: no wheels in {tmp_path / 'none'}/; run bash bench/gpu-wheels.sh "
        "where a registry is reachable"
    ]


def test_gpu_train_defaults_are_gpt2_small_bf16_ctx_1024():
    from bench import gpu_train
    from lmforge import models

    cfg = gpu_train.make_config(gpu_train.parse([]))
    m = cfg.model
    assert (m.arch, m.n_layer, m.d_model, m.n_head, m.context_length) == ("gpt2", 12, 768, 12, 1024)
    assert 124e6 < models.get("gpt2").n_params(m) < 125e6
    assert cfg.train.precision == "bf16" and cfg.scaling.use_gpu
