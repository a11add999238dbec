"""The DeepSpeed engine state inside a checkpoint (`deepspeed/state/`): checked before
DeepSpeed unpickles it, and converted for a resume on another number of workers.

The training side of a checkpoint: only the workers (and the trainer's tests) import it,
so the servable side (`lmforge.checkpoint`), which the CLI and the dashboard read, never
pulls in DeepSpeed.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

import torch

from lmforge import dist
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
    allowed = _allowed_globals()
    files = sorted(folder.rglob("*.pt"))
    if not files:
        raise CheckpointError(f"{folder}: no DeepSpeed engine state")
    for f in files:
        _restricted_load(f, allowed)


def _allowed_globals() -> list:
    import importlib

    allowed = []
    for dotted in ENGINE_STATE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: that class cannot be in its files either
    return allowed


def _restricted_load(f: Path, allowed: list) -> Any:
    """One engine state file through torch's restricted unpickler, memory-mapped (a zip
    file, DeepSpeed's default): its tensors are views of the page cache until copied."""
    try:
        with open(f, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"
        with torch.serialization.safe_globals(allowed):
            return torch.load(f, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as err:  # UnpicklingError, RuntimeError for a non-torch file, ...
        why = str(err).split("WeightsUnpickler error: ")[-1].splitlines()[0]
        raise CheckpointError(f"{f}: refused, not a plain DeepSpeed state ({why})") from None


def load_engine_state(engine, load_dir: Path, tag: str, **kwargs) -> None:
    """`engine.load_checkpoint(load_dir, tag, **kwargs)`, each file read once, safely.

    DeepSpeed's own loading unpickles every file fully (`weights_only=False`), reads the
    model states file twice (once only to count ranks), and reads each tensor into newly
    allocated memory before copying it where it belongs. Here its checkpoint engine is
    stood in for while it loads: every file goes through the restricted unpickler of
    `check_engine_state` (the check is the load, so nothing is unpickled twice),
    memory-mapped, so the weights and fp32 partitions are copied straight from the page
    cache into the engine's tensors, and the optimizer's moments into the ones it already
    holds (`_into_resident`), instead of into fresh allocations.
    """
    if not any((load_dir / tag).glob("*.pt")):
        raise CheckpointError(f"{load_dir / tag}: no DeepSpeed engine state")
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _StateLoader(inner, _allowed_globals(), _base_optimizer(engine))
    try:
        engine.load_checkpoint(str(load_dir), tag=tag, **kwargs)
    finally:
        engine.checkpoint_engine = inner


def _base_optimizer(engine) -> torch.optim.Optimizer | None:
    """The torch optimizer under DeepSpeed's wrapper (ZeRO, bf16/fp16), if any."""
    opt = engine.optimizer
    for _ in range(3):
        if isinstance(opt, torch.optim.Optimizer):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


class _StateLoader:
    """The engine's checkpoint engine, but `load` as `load_engine_state` says."""

    def __init__(self, inner, allowed: list, optimizer: torch.optim.Optimizer | None):
        self._inner, self._allowed, self._optimizer = inner, allowed, optimizer
        self._loaded: dict[str, Any] = {}  # DeepSpeed opens the model states file twice

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None) -> Any:  # noqa: ARG002 - always to the CPU
        if path not in self._loaded:
            sd = _restricted_load(Path(path), self._allowed)
            _into_resident(sd, _current_state(self._optimizer))
            self._loaded[path] = sd
        return self._loaded[path]


def _current_state(opt: torch.optim.Optimizer | None) -> dict:
    """The optimizer's state by the indices its `state_dict` (and `load_state_dict`) use;
    empty where that does not apply (ZeRO 3 swaps its sub-groups' state in and out)."""
    try:
        return opt.state_dict()["state"] if opt is not None else {}
    except (KeyError, RuntimeError):
        return {}


def _into_resident(sd: Any, current: dict, depth: int = 0) -> None:
    """Find the torch optimizer state (`{"state": {i: {...}}, "param_groups": [...]}`) in a
    loaded file and make its tensors resident: each copied into the tensor the optimizer
    holds now (same index, key, shape and dtype: DeepSpeed's load keeps it, no
    allocation), any other cloned, so no optimizer state stays a view of the file."""
    if not isinstance(sd, dict) or depth > 4:
        return
    state = sd.get("state")
    if isinstance(state, dict) and isinstance(sd.get("param_groups"), list):
        for i, entry in state.items():
            now = current.get(i, {})
            for key, value in entry.items():
                if not isinstance(value, torch.Tensor):
                    continue
                have = now.get(key)
                if (isinstance(have, torch.Tensor) and have.shape == value.shape
                        and have.dtype == value.dtype):  # fmt: skip
                    entry[key] = have.copy_(value)  # to the device it is on, too
                else:
                    entry[key] = value.clone()
        return
    for value in sd.values():
        _into_resident(value, current, depth + 1)


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


@contextlib.contextmanager
def loading_universal(engine):
    """`engine.load_checkpoint` reads a universal checkpoint within this block, though the
    engine was built without `checkpoint.load_universal` (a guard's rollback to a checkpoint
    saved before an elastic resize). DeepSpeed reads that key from its config at each load
    and has no public setter; its ZeRO optimizers load either kind."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def consolidated_weights(
    engine, info: dist.DistInfo, trainable_only: bool = False
) -> dict[str, torch.Tensor]:
    """Full fp32 weights on rank 0 (empty elsewhere). Collective: every rank calls it.
    `trainable_only`: a LoRA run's adapters, not its frozen base.

    Under ZeRO 1-3 the fp32 master copy is the truth (in bf16 the module holds rounded
    weights); `safe_get_full_fp32_param` gathers it. Stage 0 has no partitioned master:
    in fp32 the module's own weights are the full ones, in bf16/fp16 the optimizer's flat
    fp32 copy is (`_stage0_masters`).
    """
    from deepspeed.utils import safe_get_full_fp32_param

    masters = _stage0_masters(engine)
    out = {}
    for name, p in engine.module.named_parameters():  # tied weights are listed once
        if trainable_only and not p.requires_grad:
            continue
        full = safe_get_full_fp32_param(p)
        if full is None:
            full = masters.get(id(p), p)
        if info.is_main:
            out[name] = full.detach().float().cpu().clone()
    return out


def _stage0_masters(engine) -> dict[int, torch.Tensor]:
    """id(parameter) -> its fp32 master weight, under ZeRO 0 in bf16/fp16.

    There DeepSpeed wraps the optimizer in its FP16 optimizer (for bf16 too: "DDP_BFLOAT16"):
    `FP16_UnfusedOptimizer` for torch's AdamW (what lmforge uses), `FP16_Optimizer` for a
    fused Adam. Both step fp32 copies of the module's rounded weights (`fp16_groups`): one
    tensor per parameter (`fp32_groups`) or one flat tensor per group (`fp32_groups_flat`),
    which `safe_get_full_fp32_param` does not reach. Empty for every other optimizer.
    """
    from torch._utils import _unflatten_dense_tensors

    opt = engine.optimizer
    groups = getattr(opt, "fp16_groups", None)
    if not groups:
        return {}
    if flats := getattr(opt, "fp32_groups_flat", None):
        masters = [_unflatten_dense_tensors(f, ps) for ps, f in zip(groups, flats, strict=True)]
    elif not (masters := getattr(opt, "fp32_groups", None)):
        return {}
    return {
        id(p): master
        for params, group in zip(groups, masters, strict=True)
        for p, master in zip(params, group, strict=True)
    }
