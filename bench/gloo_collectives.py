"""gloo's collectives on one machine, at the size ZeRO moves each step: which way of
gathering the parameters and reducing the gradients is fastest (BENCHMARKS.md's notes).

    .venv/bin/python bench/gloo_collectives.py              # 14M fp32 values, 2 ranks, 8 rounds
    .venv/bin/python bench/gloo_collectives.py --numel 2000000 --rounds 20

Two processes, one thread each (as lmforge's 2 CPU workers), no DeepSpeed or Ray. Each
round times, after a barrier: the gradient all-reduce DeepSpeed does, a reduce of each
half to its owner, reduce-scatter; then the parameter all-gather DeepSpeed does
(`all_gather_into_tensor`), the same bytes as one broadcast per rank into its slice (its
result checked equal), and the list form of all_gather. Prints rank 0's median and min.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _rank(rank: int, port: int, numel: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    full = torch.randn(numel)
    parts = list(full.chunk(2))
    mine = parts[rank].clone()
    half = torch.empty_like(mine)

    def broadcast_gather() -> None:
        parts[rank].copy_(mine)
        for r, part in enumerate(parts):
            dist.broadcast(part, r)

    res: dict[str, list[float]] = {}
    for _ in range(rounds):
        res.setdefault("all_reduce (gradients, DeepSpeed's)", []).append(
            _timed(lambda: dist.all_reduce(full))
        )
        res.setdefault("reduce of each half to its owner", []).append(
            _timed(lambda: [dist.reduce(p, r) for r, p in enumerate(parts)])
        )
        res.setdefault("reduce_scatter_tensor", []).append(
            _timed(lambda: dist.reduce_scatter_tensor(half, full))
        )
        res.setdefault("all_gather_into_tensor (parameters, DeepSpeed's)", []).append(
            _timed(lambda: dist.all_gather_into_tensor(full, mine))
        )
        reference = full.clone()
        res.setdefault("one broadcast per rank into its slice", []).append(_timed(broadcast_gather))
        assert torch.equal(reference, full), "the broadcasts gathered other bytes"
        res.setdefault("all_gather (list)", []).append(_timed(lambda: dist.all_gather(parts, mine)))
    if rank == 0:
        mb = numel * 4 / 1e6
        print(f"{numel:,} fp32 values ({mb:.0f} MB), 2 gloo ranks x 1 thread, {rounds} rounds")
        for name, v in res.items():
            print(
                f"  {name}: median {statistics.median(v) * 1e3:.0f} ms, min {min(v) * 1e3:.0f} ms"
            )
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--numel", type=int, default=14_000_000, help="values (default 14M: gpt2 14M)")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (default 8)")
    args = p.parse_args()
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(port, args.numel, args.rounds), nprocs=2)


if __name__ == "__main__":
    main()
