"""The one place that knows rank, world size and device (nothing else reads RANK).

The session has set up the process group already (Ray Train's TorchConfig, or a local
session's `init_process_group`: gloo on CPU, NCCL on GPU); without one, everything is
rank 0 of 1.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

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
    accelerator once, on first use, from DS_ACCELERATOR (on CPU it is imported here, after
    that choice, to skip its shm op: `skip_shm_op`).
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    _prefer_own_tools()
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


def all_reduce_mean_(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over the workers, in place (one collective whatever its size)."""
    import torch.distributed as dist

    if info.world > 1:
        dist.all_reduce(t)
        t /= info.world
    return t
