"""The one place that knows rank, world size and device (nothing else reads RANK).

The session has set up the process group already (Ray Train's TorchConfig, or a local
session's `init_process_group`: gloo on CPU, NCCL on GPU); without one, everything is
rank 0 of 1.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(use_gpu: bool, device: torch.device | None = None) -> DistInfo:
    """Read the topology and pick the device (`device`: the orchestrator's choice of GPU,
    else cuda:LOCAL_RANK); tell DeepSpeed which accelerator to use.

    Must run before `deepspeed` is imported in this process: DeepSpeed picks its
    accelerator once, on first use, from DS_ACCELERATOR; it is imported here, after that
    choice (`import_deepspeed`; on CPU its shm op is skipped: `skip_shm_op`).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    _prefer_own_tools()
    import_deepspeed()
    if not use_gpu:
        skip_shm_op()
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_gpu:
        device = device or torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's ShareMemCommBuilder.NAME


def skip_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op.

    On the CPU accelerator `deepspeed.init_distributed` builds `deepspeed_shm_comm` into the
    torch extensions dir (about 1.5 min of both cores the first time on a machine, and again
    whenever another ninja judges the build stale) for one use only: `inference_all_reduce`,
    tensor-parallel inference. Training's collectives are gloo's and `broadcast_gather`, so
    the op buys a training job nothing. DeepSpeed builds it only when its op probe
    (`deepspeed.ops.__compatible_ops__`, one dict per process) says it is compatible:
    marked incompatible, `build_shm_op` returns None and nothing is compiled or loaded.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[SHM_OP] = False


MUON = "deepspeed.runtime.zero.muon"  # its muon_optimizer and original_muon modules


def import_deepspeed() -> None:
    """Import DeepSpeed less two imports a training engine of lmforge never uses, each paid
    by every worker process (measured here: 2.1 s of CPU a process, of a job start's ~9 s on
    2 cores; bench_jobstart). Call after DS_ACCELERATOR is chosen; safe to call again.

    - mlflow (1.2 s): `deepspeed.autotuning.autotuner` tries `import mlflow` at import time,
      for its own experiment logging; lmforge never runs DeepSpeed's autotuner. It is
      hidden only while DeepSpeed imports (an ImportError there: `has_mlflow = False`), so
      `import mlflow` works as usual afterwards (rank 0's tracker).
    - Muon's modules (0.9 s: they import torch._inductor's compiler): ZeRO imports
      `MuonWithAuxAdam` and `muon_update` in its reduce and step paths, only to ask
      `isinstance(optimizer, MuonWithAuxAdam)` and to call `muon_update` on parameters
      marked `use_muon` under a Muon optimizer. lmforge's DeepSpeed config names AdamW
      (`ds_config`), never Muon: stand-ins give the same answers (a class nothing is an
      instance of, a function that is never called and says so if it were). Not done where
      something already imported the real modules.
    """
    import types

    if "deepspeed" not in sys.modules:
        hide = "mlflow" not in sys.modules
        if hide:
            sys.modules["mlflow"] = None  # type: ignore[assignment]  (import: ImportError)
        try:
            import deepspeed  # noqa: F401
        finally:
            if hide and sys.modules.get("mlflow", 0) is None:
                del sys.modules["mlflow"]
    if f"{MUON}.muon_optimizer" in sys.modules or f"{MUON}.original_muon" in sys.modules:
        return

    class MuonWithAuxAdam:  # what ZeRO's isinstance checks read; never instantiated
        pass

    def muon_update(*args, **kwargs):
        raise RuntimeError("lmforge configures no Muon optimizer (lmforge.dist.import_deepspeed)")

    for name, attrs in (
        ("muon_optimizer", {"MuonWithAuxAdam": MuonWithAuxAdam}),
        ("original_muon", {"MuonWithAuxAdam": MuonWithAuxAdam, "muon_update": muon_update}),
    ):
        stand_in = types.ModuleType(f"{MUON}.{name}", "lmforge's stand-in (dist.import_deepspeed)")
        stand_in.__dict__.update(attrs)
        sys.modules[stand_in.__name__] = stand_in


def _prefer_own_tools() -> None:
    """Put this environment's bin dir first on PATH, for the `ninja` DeepSpeed builds with.

    DeepSpeed JIT-compiles a small op into ~/.cache/torch_extensions. Two ninja versions (the
    pip one in the venv, a system one) each judge the other's build log stale, so processes
    with different PATHs (a Ray worker of `lmforge cluster up`, a plain `python`) would
    rebuild it in turn, a minute each time.
    """
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = os.pathsep.join([bin_dir, path]) if path else bin_dir


def print0(info: DistInfo, *args) -> None:
    """Print from rank 0 only, flushed, so the line shows up in the job log at once."""
    if info.is_main:
        print(*args, flush=True, file=sys.stdout)


def all_gather_object(obj, info: DistInfo) -> list:
    import torch.distributed as dist

    if info.world == 1:
        return [obj]
    out: list = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    import torch.distributed as dist

    if info.world > 1:
        dist.barrier()


def leave() -> NoReturn:
    """End this rank's process now: its work is done and written, its process group
    destroyed. It skips the interpreter's teardown, in which gloo's native threads can still
    hold tensors (a DeepSpeed engine keeps its groups alive) and abort the process with
    "terminate called without an active exception" (pytorch/pytorch#179291; seen here with
    ZeRO 3 engines): a finished rank would then read as a crashed one. For ranks started by
    `spawn`, which end by finalizing the interpreter; forked ranks (`local_session`'s
    forkserver) already end in `os._exit`."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def all_reduce_mean_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over the workers, in place (one collective whatever its size)."""
    import torch.distributed as dist

    if info.world > 1:
        dist.all_reduce(t)
        t /= info.world
    return t
