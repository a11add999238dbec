"""Throughput figures shared by training logs and benchmarks: peak FLOP/s and MFU."""

from __future__ import annotations

import time

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measure_peak_flops(
    device: torch.device, precision: str, n: int = 1024, seconds: float = 0.3
) -> float:
    """FLOP/s of a large square matmul in the training dtype on this device.

    Used as the MFU denominator: on CPUs (and GPUs without a known spec) a measured peak is
    the honest reference for "how much of this machine does training use".
    """
    dtype = _DTYPES[precision]
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        torch.matmul(a, b)
        reps += 1
        _sync(device)
        dt = time.perf_counter() - t0
        if dt >= seconds and reps >= 3:
            return 2 * n**3 * reps / dt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
