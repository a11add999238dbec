"""`precision: bf16` on a CPU without avx512_bf16 or AMX: one warning line at launch (the
flags read from a cpuinfo file written here, as /proc/cpuinfo would give them); and the
generation dtype `auto` picks bf16 only where those flags are."""

from __future__ import annotations

import logging

import pytest
import torch

from lmforge import perf
from lmforge.config import load_config
from lmforge.training import launch
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "tiny.yaml"
OLD_CPU = "fpu sse2 avx avx2 fma avx512f avx512bw"  # AVX-512, but no bf16 instructions


def cpuinfo(tmp_path, flags: str):
    path = tmp_path / "cpuinfo"
    path.write_text(
        f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n"
        f"processor\t: 1\nflags\t\t: {flags}\n"
    )
    return path


def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(tmp_path, monkeypatch, caplog):
    path = cpuinfo(tmp_path, OLD_CPU)
    read = launch.cpu_flags
    monkeypatch.setattr(launch, "cpu_flags", lambda: read(path))
    cfg = load_config(TINY, ["train.precision=bf16"])
    with caplog.at_level(logging.WARNING, logger="lmforge.training.launch"):
        launch.warn_slow_bf16(cfg)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "without avx512_bf16 or amx_bf16" in lines[0] and "slower than fp32" in lines[0]
    assert "\n" not in lines[0]


@pytest.mark.parametrize(
    "flags, overrides",
    [
        (OLD_CPU + " avx512_bf16", ["train.precision=bf16"]),  # AVX512-BF16
        (OLD_CPU + " amx_tile amx_bf16", ["train.precision=bf16"]),  # AMX
        (OLD_CPU, ["train.precision=fp32"]),  # not bf16
        (OLD_CPU, ["train.precision=bf16", "scaling.use_gpu=true"]),  # the GPU's bf16
        ("", ["train.precision=bf16"]),  # flags unknown: no guess
    ],
)
def test_no_warning_where_bf16_is_fast_or_not_asked_for(tmp_path, flags, overrides):
    cfg = load_config(TINY, overrides)
    got = launch.cpu_flags(cpuinfo(tmp_path, flags)) if flags else set()
    assert launch.slow_bf16_warning(cfg, got) is None


def test_cpu_flags_reads_the_first_cpus_flags_and_survives_no_cpuinfo(tmp_path):
    assert launch.cpu_flags(cpuinfo(tmp_path, "avx2 avx512_bf16")) == {"avx2", "avx512_bf16"}
    assert launch.cpu_flags(tmp_path / "absent") == set()


@pytest.mark.parametrize(
    "flags, asked, want",
    [
        (OLD_CPU + " avx512_bf16", "auto", torch.bfloat16),
        (OLD_CPU + " amx_tile amx_bf16", "auto", torch.bfloat16),
        (OLD_CPU, "auto", torch.float32),  # bf16 would be ~0.3x here
        ("", "auto", torch.float32),  # flags unknown: the safe one
        (OLD_CPU, "bf16", torch.bfloat16),  # asked for: given, slow or not
        (OLD_CPU + " avx512_bf16", "fp32", torch.float32),
        (OLD_CPU, "fp16", torch.float16),
    ],
)
def test_generation_dtype_auto_is_bf16_only_where_the_cpu_has_fast_kernels(
    tmp_path, flags, asked, want
):
    """`generate --dtype` / `serve up --dtype` (lmforge.perf.inference_dtype)."""
    got = perf.cpu_flags(cpuinfo(tmp_path, flags)) if flags else set()
    assert perf.inference_dtype(asked, torch.device("cpu"), got) == want
    with pytest.raises(ValueError, match="use one of fp32, bf16, fp16, auto"):
        perf.inference_dtype("float32", torch.device("cpu"), got)
