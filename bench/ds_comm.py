"""DeepSpeed communication settings, measured without Ray: 2 gloo ranks on this machine step
lmforge's model in the engine `deepspeed_config` builds, with one `zero_optimization`
variant at a time, against the plain loop (1 process, 2 threads, the same global batch).

    .venv/bin/python bench/ds_comm.py                       # gpt2 14M, ctx 256, ZeRO 2 fp32
    .venv/bin/python bench/ds_comm.py --stage 3 --steps 8 --rounds 2 --small

A variant is a JSON object merged into `zero_optimization` (e.g. {"overlap_comm": true}).
Every run gathers ZeRO's parameters as the trainer does (`cpu_collectives`: a broadcast per
rank) except "gloo_all_gather" (torch's all_gather_into_tensor, DeepSpeed's own). The runs
alternate (baseline, variants..., plain, then again) so machine noise lands on all.
Random tokens; the median step after 3 warm-up steps. No Ray: the engine, model and data
layout only (what `profile_train.py` says the gap is: gloo's reduce and ZeRO's gathers).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge import dist, models  # noqa: E402
from lmforge.config import load_config  # noqa: E402
from lmforge.training.ds_config import deepspeed_config  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WARMUP = 3
VARIANTS = {
    "baseline": {},
    "overlap_comm": {"overlap_comm": True},
    "buckets_50M": {"reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
    "buckets_5M": {"reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000},
    "no_contiguous_gradients": {"contiguous_gradients": False},
    # not a DeepSpeed setting: torch's gloo all_gather_into_tensor for ZeRO's gathers instead
    # of the trainer's one broadcast per rank (lmforge.training.cpu_collectives)
    "gloo_all_gather": {"_gloo_all_gather": True},
    # not a ZeRO setting either: torch's default (for-loop) AdamW instead of its fused kernel
    "unfused_adamw": {"_unfused_adamw": True},
}


def config(a, world: int):
    size = (
        ["model.n_layer=2", "model.d_model=128", "model.n_head=2", "model.context_length=64"]
        if a.small
        else ["model.n_layer=6", "model.d_model=384", "model.n_head=6", "model.context_length=256"]
    )
    return load_config(
        REPO / "jobs" / "configs" / "tiny.yaml",
        [*size, "model.vocab_size=8192", "model.dropout=0.0", f"zero.stage={a.stage}",
         f"train.micro_batch_size={a.micro_batch * (2 // world)}", f"scaling.num_workers={world}",
         f"train.precision={a.precision}", "train.warmup_steps=1"],
    )  # fmt: skip


def batches(cfg, steps: int, rank: int, world: int):
    g = torch.Generator().manual_seed(0)
    mb, ctx = cfg.train.micro_batch_size * world, cfg.model.context_length
    data = torch.randint(0, cfg.model.vocab_size, (steps, mb, ctx + 1), generator=g)
    part = data[:, rank * cfg.train.micro_batch_size : (rank + 1) * cfg.train.micro_batch_size]
    return [(b[:, :-1], b[:, 1:]) for b in part]


def rank_main(rank: int, a, port: int, variant: dict, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")  # fmt: skip
    torch.set_num_threads(1)
    import deepspeed

    from lmforge.training import cpu_collectives

    deepspeed.init_distributed(dist_backend="gloo")
    variant = dict(variant)
    if not variant.pop("_gloo_all_gather", False):
        cpu_collectives.install()  # as the trainer does
    cfg = config(a, 2)
    ds = deepspeed_config(cfg, 2)
    if variant.pop("_unfused_adamw", False):
        ds["optimizer"]["params"].pop("fused")
    ds["zero_optimization"].update(variant)
    torch.manual_seed(0)
    model = models.build(cfg.model)
    eng, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    times = []
    for x, y in batches(cfg, a.steps, rank, 2):
        t0 = time.perf_counter()
        _, loss = eng(x, y)
        eng.backward(loss)
        eng.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put({"step_s": statistics.median(times[WARMUP:]), "loss": loss.item()})
    torch.distributed.destroy_process_group()
    out.close()  # the result is in the pipe before the process goes (a small dict: no wait)
    out.join_thread()
    dist.leave()  # no interpreter teardown, where a ZeRO 3 engine's gloo threads can abort


def run_ds(a, variant: dict) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, a, port, variant, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=900)
    for p in procs:
        p.join()
    return res


def run_plain(a) -> dict:
    torch.set_num_threads(2)
    cfg = config(a, 1)
    torch.manual_seed(0)
    model = models.build(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=(0.9, 0.95))
    times = []
    for x, y in batches(cfg, a.steps, 0, 1):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16"):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times[WARMUP:]), "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--micro-batch", type=int, default=2, help="per rank")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--small", action="store_true", help="2 layers, d 128, ctx 64: seconds")
    p.add_argument("--variants", help="comma-separated names of VARIANTS (default all)")
    p.add_argument("--variant", action="append", default=[], help="extra: name='{\"k\": v}'")
    a = p.parse_args()
    variants = {k: VARIANTS[k] for k in (a.variants.split(",") if a.variants else VARIANTS)}
    for extra in a.variant:
        name, js = extra.split("=", 1)
        variants[name] = json.loads(js)
    print(f"load average {os.getloadavg()}", flush=True)
    res: dict[str, list[float]] = {k: [] for k in [*variants, "plain"]}
    for r in range(a.rounds):
        order = [*variants, "plain"]
        for name in order if r % 2 == 0 else order[::-1]:
            out = run_plain(a) if name == "plain" else run_ds(a, variants[name])
            res[name].append(out["step_s"])
            print(f"[{r + 1}] {name:24s} {out['step_s']:.3f} s/step  loss {out['loss']:.4f}",
                  flush=True)  # fmt: skip
    plain = statistics.median(res["plain"])
    print(f"load average {os.getloadavg()}")
    for name in variants:
        s = statistics.median(res[name])
        print(f"{name:24s} median {s:.3f} s/step  vs plain {plain / s:.3f}x  runs {res[name]}")
    print(f"{'plain':24s} median {plain:.3f} s/step  runs {res['plain']}")


if __name__ == "__main__":
    main()
