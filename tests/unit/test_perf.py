"""The MFU denominator: a datasheet peak for a known GPU, a timed matmul on a CPU; and the
resident memory figures benchmarks and the estimate's test measure with."""

import logging

import pytest
import torch

from lmforge import perf
from lmforge.perf import Peak, lookup_peak, peak_flops


@pytest.mark.parametrize(
    "name, dtype, label, tflops",
    [
        # names as torch.cuda.get_device_name gives them
        ("NVIDIA H100 80GB HBM3", "bf16", "H100 SXM", 989.4),
        ("NVIDIA H100 PCIe", "bf16", "H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", "fp16", "H100 NVL", 835.5),
        ("NVIDIA H200", "bf16", "H200 SXM", 989.4),
        ("NVIDIA GH200 480GB", "bf16", "GH200", 989.4),
        ("NVIDIA A100-SXM4-40GB", "bf16", "A100", 312),
        ("NVIDIA A100 80GB PCIe", "fp32", "A100", 19.5),
        ("NVIDIA A100-SXM4-80GB", "tf32", "A100", 156),
        ("NVIDIA L4", "bf16", "L4", 121),
        ("NVIDIA L40S", "bf16", "L40S", 362.05),
        ("NVIDIA A10G", "bf16", "A10 (for the A10G)", 125),
        ("Tesla V100-SXM2-16GB", "fp16", "V100 SXM2", 125),
        ("Tesla V100-PCIE-32GB", "fp32", "V100 PCIe", 14),
        ("NVIDIA GeForce RTX 4090", "bf16", "GeForce RTX 4090", 165.2),
        ("Tesla T4", "fp16", "T4", 65),
    ],
)
def test_a_known_gpu_gets_its_datasheet_peak_and_says_which(name, dtype, label, tflops):
    peak = lookup_peak(name, dtype)
    assert peak == Peak(tflops * 1e12, f"{name}: {label} datasheet, {dtype} dense")
    assert f"peak {tflops:,.1f} TFLOP/s" in str(peak)


@pytest.mark.parametrize(
    "name, dtype",
    [
        ("Tesla V100-SXM2-16GB", "bf16"),  # no bf16 tensor cores: not a datasheet figure
        ("NVIDIA GeForce RTX 3090 Ti", "bf16"),  # not the 3090's figures
        ("NVIDIA H800", "bf16"),
        ("AMD Instinct MI300X", "bf16"),
    ],
)
def test_a_gpu_or_dtype_the_table_does_not_hold_has_no_datasheet_peak(name, dtype):
    assert lookup_peak(name, dtype) is None


def test_on_a_cpu_the_peak_is_a_timed_matmul():
    peak = peak_flops(torch.device("cpu"), "fp32")
    assert peak.source == f"cpu: a timed 1024x1024 fp32 matmul, {torch.get_num_threads()} threads"
    # within a factor of a few of a second timing (the machine is shared)
    again = perf.measure_peak_flops(torch.device("cpu"), "fp32", n=512)
    assert again / 10 < peak.flops < again * 10


def test_an_unknown_gpu_is_timed_with_a_warning(monkeypatch, caplog):
    """No GPU here: the CUDA name and the timing are stood in for, the choice is ours."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H800")
    monkeypatch.setattr(perf, "measure_peak_flops", lambda device, precision: 1.5e14)
    with caplog.at_level(logging.WARNING, logger="lmforge.perf"):
        peak = peak_flops(torch.device("cuda", 0), "bf16")
    assert peak.flops == 1.5e14
    assert "NVIDIA H800: a timed bf16 matmul" in peak.source and "inflated" in peak.source
    assert "no datasheet peak for NVIDIA H800" in caplog.text


def test_a_known_gpu_is_not_timed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")

    def timed(*_):
        raise AssertionError("a known GPU is looked up, not timed")

    monkeypatch.setattr(perf, "measure_peak_flops", timed)
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:  # a torch setting (not an attribute monkeypatch can undo)
        matmul.allow_tf32 = False
        assert peak_flops(torch.device("cuda", 0), "fp32").flops == 30.3e12  # CUDA cores
        matmul.allow_tf32 = True
        assert peak_flops(torch.device("cuda", 0), "fp32").flops == 60e12  # TF32 tensor cores
    finally:
        matmul.allow_tf32 = before
    assert (
        peak_flops(torch.device("cuda", 0), "bf16").source == "NVIDIA L4: L4 datasheet, bf16 dense"
    )


def _child_memory(q) -> None:
    before = perf.resident_bytes()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    q.put((before, perf.peak_resident_bytes(), block.numel()))


def test_a_spawned_childs_peak_is_its_own_not_its_parents(plain_main):
    """The CI failure this guards against: getrusage's ru_maxrss in a child that
    multiprocessing spawned from a big pytest process reported the parent's size, and the
    estimate's engine test measured 633 MiB for a 293 MiB engine."""
    import multiprocessing as mp

    ballast = torch.ones(768 * 2**20 // 4)  # 768 MiB resident in this, the parent
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_memory, args=(q,))
    p.start()
    before, peak, _ = q.get(timeout=120)
    p.join()
    assert ballast.sum() > 0
    assert perf.peak_resident_bytes() >= perf.resident_bytes() > ballast.numel() * 4
    # the child holds torch (a few hundred MiB at most) and its 64 MiB block, not 768 MiB
    assert before + 60 * 2**20 < peak < 600 * 2**20
