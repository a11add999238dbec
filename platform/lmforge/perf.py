"""Throughput and memory figures shared by training logs, benchmarks and tests: peak FLOP/s,
MFU, and a process's resident memory.

    peak = peak_flops(device, "bf16")   # Peak(flops=989.4e12, source="NVIDIA H100 ... datasheet")
    mfu = tokens_per_s * flops_per_token / peak.flops

On a GPU the MFU denominator is the vendor's dense peak for the training dtype, looked up by
`torch.cuda.get_device_name` (a timed matmul reaches well under it, so it would inflate MFU);
on a CPU, and on a GPU the table does not know, it is a timed matmul, and `source` says so.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Dense (no 2:4 sparsity) peak FLOP/s per dtype from the vendors' datasheets, where a sheet
# gives "X | 2X*" the X. fp32 is the CUDA cores' (PyTorch's default for fp32 matmuls);
# tf32 the tensor cores', used when torch.backends.cuda.matmul.allow_tf32 is on; bf16 and
# fp16 the tensor cores' with fp32 accumulation (what PyTorch's matmuls use). First match
# wins, so a name that contains another (GH200 / H200, L40S / L40 / L4) comes first.
#   H100, H100 NVL: NVIDIA H100 Tensor Core GPU datasheet (SXM, PCIe and NVL columns)
#   H200, H200 NVL, GH200: NVIDIA H200 datasheet; GH200 Grace Hopper Superchip datasheet
#   A100 (40/80 GB, SXM/PCIe): NVIDIA A100 datasheet (every variant has the same compute)
#   B200: NVIDIA HGX B200 datasheet (8-GPU figures with sparsity, per GPU and dense here)
#   L40S, L40, L4, A10: their NVIDIA datasheets
#   A10G: AWS's A10 variant has no NVIDIA sheet; the A10's figures, an upper bound (some
#     report ~70 TFLOP/s of tensor math for it, so MFU may read low, never inflated)
#   V100 SXM2/PCIe, V100S, T4: their NVIDIA datasheets (no bf16 tensor math: not listed)
#   RTX 4090: NVIDIA Ada GPU architecture whitepaper, appendix A (fp32-accumulate rates)
#   RTX 3090: NVIDIA Ampere GA102 GPU architecture whitepaper, appendix A (likewise)


def _tflops(fp32: float, tf32: float | None = None, bf16: float | None = None, fp16=None):
    """FLOP/s by dtype from TFLOP/s; fp16 is bf16's rate unless given."""
    peaks = {"fp32": fp32, "tf32": tf32, "bf16": bf16, "fp16": fp16 or bf16}
    return {k: v * 1e12 for k, v in peaks.items() if v is not None}


_TABLE: tuple[tuple[str, str, dict[str, float]], ...] = (
    # (pattern in the CUDA name, label, peaks in TFLOP/s: fp32, tf32, bf16[, fp16])
    (r"GH200", "GH200", _tflops(67, 494.7, 989.4)),
    (r"H200 NVL", "H200 NVL", _tflops(60, 417.5, 835.5)),
    (r"H200", "H200 SXM", _tflops(67, 494.7, 989.4)),
    (r"H100 NVL", "H100 NVL", _tflops(60, 417.5, 835.5)),
    (r"H100 PCIe", "H100 PCIe", _tflops(51, 378, 756.5)),
    (r"H100", "H100 SXM", _tflops(67, 494.7, 989.4)),
    (r"A100", "A100", _tflops(19.5, 156, 312)),
    (r"B200", "B200", _tflops(75, 1125, 2250)),
    (r"\bL40S\b", "L40S", _tflops(91.6, 183, 362.05)),
    (r"\bL40\b", "L40", _tflops(90.5, 90.5, 181.05)),
    (r"\bL4\b", "L4", _tflops(30.3, 60, 121)),
    (r"\bA10G\b", "A10 (for the A10G)", _tflops(31.2, 62.5, 125)),
    (r"\bA10\b", "A10", _tflops(31.2, 62.5, 125)),
    (r"V100S", "V100S PCIe", _tflops(16.4, fp16=130)),
    (r"V100.*PCIE", "V100 PCIe", _tflops(14, fp16=112)),
    (r"V100", "V100 SXM2", _tflops(15.7, fp16=125)),
    (r"\bT4\b", "T4", _tflops(8.1, fp16=65)),
    (r"RTX 4090", "GeForce RTX 4090", _tflops(82.6, 82.6, 165.2)),
    (r"RTX 3090(?! Ti)", "GeForce RTX 3090", _tflops(35.6, 35.6, 71)),
)


@dataclass(frozen=True)
class Peak:
    """The MFU denominator and where it came from (printed once when training starts)."""

    flops: float  # FLOP/s
    source: str  # e.g. "NVIDIA H100 80GB HBM3: H100 SXM datasheet, bf16 dense"

    def __str__(self) -> str:
        return f"peak {self.flops / 1e12:,.1f} TFLOP/s ({self.source})"


def lookup_peak(device_name: str, dtype: str) -> Peak | None:
    """The datasheet peak of a GPU by its CUDA name for `dtype` (fp32, tf32, bf16, fp16);
    None for a GPU or dtype the table does not hold."""
    for pattern, label, peaks in _TABLE:
        if re.search(pattern, device_name, re.IGNORECASE):
            if dtype not in peaks:
                return None
            return Peak(peaks[dtype], f"{device_name}: {label} datasheet, {dtype} dense")
    return None


def peak_flops(device: torch.device, precision: str) -> Peak:
    """The peak FLOP/s MFU is measured against, for training in `precision` on `device`."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        dtype = (
            "tf32" if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32 else precision
        )
        if found := lookup_peak(name, dtype):
            return found
        flops = measure_peak_flops(device, precision)
        log.warning(
            "no datasheet peak for %s in %s: MFU is against a timed matmul, so it may be "
            "inflated", name, dtype,
        )  # fmt: skip
        return Peak(
            flops, f"{name}: a timed {precision} matmul (not in the table: MFU may be inflated)"
        )
    flops = measure_peak_flops(device, precision)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return Peak(flops, f"{device.type}: a timed 1024x1024 {precision} matmul{threads}")


def measure_peak_flops(
    device: torch.device, precision: str, n: int = 1024, seconds: float = 0.3
) -> float:
    """FLOP/s of a large square matmul in the training dtype on this device.

    The MFU denominator on CPUs: there a measured peak is the honest reference for "how
    much of this machine does training use". On a GPU it underestimates the peak.
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


# The CPU features that give bf16 matmuls fast kernels (oneDNN): AVX512-BF16 or AMX-BF16.
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INFERENCE_DTYPES = ("fp32", "bf16", "fp16", "auto")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The feature flags of this machine's first CPU (empty where /proc/cpuinfo is absent)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def fast_bf16(device: torch.device, flags: set[str] | None = None) -> bool:
    """Whether bf16 matmuls beat fp32 on `device`: a CUDA GPU that supports bf16, or a CPU
    with avx512_bf16 or AMX (`flags`: the CPU's, read from /proc/cpuinfo when None)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in FAST_BF16_FLAGS)


def inference_dtype(name: str, device: torch.device, flags: set[str] | None = None) -> torch.dtype:
    """The dtype a model generates in: `fp32`, `bf16`, `fp16`, or `auto` (bf16 where
    `fast_bf16`, else fp32). Training's precision stays a training choice; this one is only
    for decoding (bf16 weights and KV cache: half the memory, and on those devices faster)."""
    if name not in INFERENCE_DTYPES:
        raise ValueError(f"dtype {name!r}: use one of {', '.join(INFERENCE_DTYPES)}")
    if name == "auto":
        return torch.bfloat16 if fast_bf16(device, flags) else torch.float32
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def resident_bytes() -> int:
    """This process's resident memory now (Linux `/proc/self/statm`)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """This process's own resident high-water mark (`VmHWM` in `/proc/self/status`).

    Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries the high-water mark of the
    address space an `exec` replaces into it, so a child that multiprocessing spawns from
    a 1 GiB pytest reports at least 1 GiB however little it touches itself.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line")
