"""The DeepSpeed engine state inside a checkpoint (`deepspeed/state/`): checked before
DeepSpeed unpickles it, and converted for a resume on another number of workers.

The training side of a checkpoint: only the workers (and the trainer's tests) import it,
so the servable side (`lmforge.checkpoint`), which the CLI and the dashboard read, never
pulls in DeepSpeed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lmforge.checkpoint import ENGINE_DIR, ENGINE_TAG, CheckpointError
from lmforge.errors import first_line

# The classes (besides tensors and plain containers) DeepSpeed 0.19's engine state holds, for
# ZeRO 0-3 in fp32, bf16 and fp16 (found by loading each kind with the restricted unpickler).
ENGINE_STATE_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def check_engine_state(path: Path) -> None:
    """Refuse a DeepSpeed engine state that would run code when unpickled.

    DeepSpeed loads its state with `torch.load(weights_only=False)`, i.e. full pickle. So
    every file is first read here with torch's restricted unpickler (`weights_only=True`,
    memory-mapped: the tensors are not read) allowing only the few DeepSpeed classes its
    checkpoints hold; a file that needs anything else is refused, named, before DeepSpeed
    opens it. Call it after `import deepspeed` (the allowed classes are looked up).
    """
    check_engine_files(path / ENGINE_DIR / ENGINE_TAG)


def check_engine_files(folder: Path) -> None:
    """`check_engine_state` for every `*.pt` under `folder` (e.g. a universal checkpoint)."""
    import importlib

    allowed = []
    for dotted in ENGINE_STATE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: that class cannot be in its files either
    files = sorted(folder.rglob("*.pt"))
    if not files:
        raise CheckpointError(f"{folder}: no DeepSpeed engine state")
    for f in files:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # UnpicklingError, RuntimeError for a non-torch file, ...
            why = str(err).split("WeightsUnpickler error: ")[-1].splitlines()[0]
            raise CheckpointError(f"{f}: refused, not a plain DeepSpeed state ({why})") from None


UNIVERSAL_TAG = "universal"  # DeepSpeed's universal checkpoint of an engine state


def is_partitioned(path: Path) -> bool:
    """Whether the engine state is split per rank (ZeRO 1-3): one optimizer file a rank."""
    return any((path / ENGINE_DIR / ENGINE_TAG).glob("*optim_states.pt"))


def to_universal(path: Path, out: Path) -> Path:
    """Convert a checkpoint's per-rank engine state into DeepSpeed's universal checkpoint
    (one file per parameter and state), which loads into any number of workers: made once
    at `out/UNIVERSAL_TAG` (written aside, then renamed). Returns `out`, the `load_dir` of
    `engine.load_checkpoint(load_dir, tag=UNIVERSAL_TAG)` under the config key
    `checkpoint.load_universal`. Check the files DeepSpeed unpickles, before and after:
    `check_engine_state(path)`, `check_engine_files(out / UNIVERSAL_TAG)`.
    """
    import contextlib
    import io
    import os
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as convert

    if (out / UNIVERSAL_TAG).is_dir():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{UNIVERSAL_TAG}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    args = Namespace(
        input_folder=str(path / ENGINE_DIR / ENGINE_TAG), output_folder=str(tmp),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
        # lmforge's checkpoints hold no Megatron-style layout hints: a plain model needs none.
        inject_missing_state=True,
    )  # fmt: skip
    noise = io.StringIO()  # its progress bars and banners
    try:
        with contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            convert(args)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"{path / ENGINE_DIR}: DeepSpeed could not make a universal checkpoint of it "
            f"({type(err).__name__}: {first_line(err)})"
        ) from err
    tmp.rename(out / UNIVERSAL_TAG)
    return out
