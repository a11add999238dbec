"""Where a training step's time goes: lmforge's own `Trainer` (DeepSpeed engine, 2 worker
processes, 1 thread each, as the train job runs it but without Ray) against the plain loop
(`bench/plain_loop.py`: one process, 2 threads), each under `torch.profiler` for a few
steps after a warm-up. Prints each side's step time and its top operators by self CPU time.

    .venv/bin/python bench/profile_train.py --arch llama            # bench_train's full size
    .venv/bin/python bench/profile_train.py --arch lstm --steps 4 --stage 2
    .venv/bin/python bench/profile_train.py --arch gpt2 --shape small --stage 2 --steps 20
    .venv/bin/python bench/profile_train.py --arch gpt2 --stage 2 --precision bf16 --side plain

The dataset is bench_train.py's (prepared there on first use). It answers "is the gap in
DeepSpeed's step (all-reduce, optimizer) or in the arithmetic" without Ray in the way: if
these two processes already show the gap, Ray Train is not where the time goes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_train import PRESETS, build_config, prepared_dataset  # noqa: E402

WARMUP = 3


def profiled(steps: int, step_fn, row_limit: int, label: str) -> list[float]:
    """Run `step_fn` WARMUP + `steps` times, profiling the last `steps`; print the table."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(WARMUP):
        step_fn()
    times = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            step_fn()
            times.append(time.perf_counter() - t0)
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=row_limit)
    per_step = sum(e.self_cpu_time_total for e in averages) / 1e3 / steps
    comm = [
        f"  {e.key}: {e.cpu_time_total / 1e3 / steps:,.1f} ms a step ({e.count // steps} calls)"
        for e in averages
        if any(w in e.key.lower() for w in ("reduce", "gather", "broadcast", "barrier", "wait"))
    ]
    print(
        f"\n== {label}: median step {statistics.median(times) * 1e3:.0f} ms, in operators "
        f"{per_step:,.0f} ms a step ==\n{table}\ncollectives (wall time, children included):\n"
        + ("\n".join(comm) or "  none recorded")
    )
    return times


def worker(rank: int, port: int, args, dataset: Path, storage: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
    )  # fmt: skip
    import torch.distributed

    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)  # as Ray Train on CPU
    from lmforge.training.local_session import LocalSession

    session = LocalSession(storage, keep=None, use_gpu=False)  # the loop without Ray
    from lmforge.data.dataset import Dataset
    from lmforge.training.loop import Trainer

    cfg = build_config(
        args.arch, dataset, False, 100, Path(storage), args.stage, args.precision, args.shape
    )
    # The launcher's plan sets the vocabulary from the dataset; so does the plain loop.
    model = cfg.model.model_copy(update={"vocab_size": Dataset(dataset).vocab_size})
    trainer = Trainer(cfg.model_copy(update={"model": model}), session, storage)
    batches = trainer.stream.batches()
    label = f"lmforge Trainer rank {rank}, ZeRO {args.stage}, {args.precision}, 1 thread"
    times = profiled(args.steps, lambda: trainer.train_step(batches), args.rows, label)
    if rank == 0:
        tps = trainer.tokens_per_step / statistics.median(times)
        print(f"lmforge (2 processes, no Ray): {tps:,.0f} tokens/s", flush=True)
    torch.distributed.destroy_process_group()
    from lmforge import dist

    dist.leave()  # ZeRO 3 engines' gloo threads can abort the interpreter's teardown


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(PRESETS), default="llama")
    p.add_argument("--stage", type=int, default=1, help="ZeRO stage (default 1)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (default 5)")
    p.add_argument("--rows", type=int, default=15, help="operators listed (default 15)")
    p.add_argument("--side", choices=["both", "lmforge", "plain"], default="both")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: DeepSpeed's bf16 for lmforge, torch.autocast for the plain loop")  # fmt: skip
    p.add_argument("--shape", choices=["full", "small"], default="full",
                   help="small: bench_train's small-step shape (gpt2 4 layers d 128 ctx 64)")  # fmt: skip
    args = p.parse_args(argv)
    dataset = prepared_dataset(tiny=False)
    storage = tempfile.mkdtemp(prefix="lmforge-profile-train-")
    try:
        run_sides(args, dataset, storage)
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def run_sides(args, dataset: Path, storage: str) -> None:
    if args.side in ("both", "plain"):
        import torch

        from bench import plain_loop

        cfg = build_config(
            args.arch, dataset, False, WARMUP + args.steps, Path(storage), 1, args.precision,
            args.shape,
        )  # fmt: skip
        torch.set_num_threads(2)
        state = plain_loop.Stepper(cfg)
        label = f"plain loop, {args.precision}, 2 threads"
        times = profiled(args.steps, state.step, args.rows, label)
        print(f"plain loop: {state.tokens_per_step / statistics.median(times):,.0f} tokens/s")
    if args.side in ("both", "lmforge"):
        import torch.multiprocessing as mp

        from lmforge.services import free_port

        mp.spawn(worker, args=(free_port(), args, dataset, storage), nprocs=2, join=True)


if __name__ == "__main__":
    main()
