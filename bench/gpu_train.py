"""lmforge's model in lmforge's DeepSpeed engine against a plain PyTorch loop, on one GPU.

    bash bench/gpu.sh                       # on the GPU machine (installs the carried wheels)
    python3 bench/gpu_train.py --steps 30 --zero 1 --micro-batch 8

Single process, no Ray: the model (`lmforge.models.build`, gpt2-small's shape by default:
124M parameters, context 1024, vocab 50304) and the DeepSpeed config the trainer derives
(`lmforge.training.ds_config.deepspeed_config`, bf16, the given ZeRO stage), stepped as the
trainer steps it (forward, engine.backward, engine.step), against what a PyTorch user writes:
the same model in fp32 under `torch.autocast(bfloat16)` with fused AdamW and the same
clipping. Random tokens (the speed does not depend on them). The two alternate `--repeats`
times; each prints tokens/s (median step after `--warmup` steps), MFU against the device's
bf16 dense peak (`lmforge.perf`'s datasheet table by device name) and peak memory, and the
last line is a `BENCH_RESULT {json}` with lmforge / plain.

Without CUDA it stops at once with one line saying so (exit status 2).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "platform"))  # lmforge without installing it


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304, help="GPT-2's 50257, padded to 64")
    p.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=25, help="timed and warm-up steps per run")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="plain and lmforge runs, alternated")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    return p.parse_args(argv)


def require_cuda() -> None:
    """Exit with one line unless a CUDA device is usable."""
    import torch

    if not torch.cuda.is_available():
        print(
            f"bench/gpu_train.py: no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); run it on a GPU machine (bash bench/gpu.sh)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def make_config(a: argparse.Namespace):
    from lmforge.config import Config

    return Config.model_validate(
        {
            "model": {"arch": a.arch, "n_layer": a.layers, "n_head": a.heads,
                      "d_model": a.d_model, "context_length": a.context,
                      "vocab_size": a.vocab, "dropout": 0.0},
            "data": {"path": "unused"},
            "train": {"max_steps": 10_000, "warmup_steps": 10, "micro_batch_size": a.micro_batch,
                      "precision": "bf16", "lr": 6e-4, "min_lr": 6e-5,
                      "activation_checkpointing": a.activation_checkpointing,
                      "compile": a.compile},
            "zero": {"stage": a.zero},
            "scaling": {"num_workers": 1, "use_gpu": True, "cpus_per_worker": 1},
        }
    )  # fmt: skip


def _process_group() -> None:
    """A NCCL group of one, as a launcher would set it up (DeepSpeed wants one)."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():  # fmt: skip
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="nccl")


def _timed(step, batches, warmup: int) -> tuple[list[float], float]:
    """Step through `batches`; the step times (synchronised) and the last loss."""
    import torch

    times, loss = [], float("nan")
    for i, (x, y) in enumerate(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = step(x, y)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if i == warmup - 1:
            torch.cuda.reset_peak_memory_stats()
    return times, loss


def param_groups(model, weight_decay: float) -> list[dict]:
    """lmforge.training.loop's groups (decay on matrices only), without importing the loop
    (it imports the data path: pyarrow, tokenizers, safetensors, which do not travel)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def run_lmforge(cfg, batches, warmup: int) -> dict[str, float]:
    import deepspeed
    import torch

    from lmforge import models
    from lmforge.training import speed
    from lmforge.training.ds_config import deepspeed_config

    torch.manual_seed(0)
    model = models.build(cfg.model)
    if cfg.train.activation_checkpointing:
        speed.checkpoint_blocks(model)
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg, 1),
    )
    if cfg.train.compile:
        speed.compile_engine(engine)

    def step(x, y):
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        return loss

    times, loss = _timed(step, batches, warmup)
    out = {"step_times": times, "loss": float(loss), "peak_mem": torch.cuda.max_memory_allocated()}
    engine.destroy()
    return out  # the model and optimizer go with this frame


def run_plain(cfg, batches, warmup: int) -> dict[str, float]:
    import torch

    from lmforge import models
    from lmforge.training import speed

    torch.manual_seed(0)
    model = speed.apply_plain(models.build(cfg.model).cuda(), cfg)
    t = cfg.train
    opt = torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), fused=True
    )

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times, loss = _timed(step, batches, warmup)
    out = {"step_times": times, "loss": float(loss), "peak_mem": torch.cuda.max_memory_allocated()}
    return out  # the model and optimizer go with this frame


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    require_cuda()
    os.environ.setdefault("DS_ACCELERATOR", "cuda")  # before deepspeed is imported
    import torch

    from lmforge import models
    from lmforge.perf import peak_flops

    torch.backends.cuda.matmul.allow_tf32 = True
    cfg = make_config(a)
    _process_group()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    arch = models.get(cfg.model.arch)
    n_params, fpt = arch.n_params(cfg.model), arch.flops_per_token(cfg.model)
    peak = peak_flops(device, "bf16")
    tokens = a.micro_batch * a.context
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, a.vocab, (a.steps, a.micro_batch, a.context + 1), generator=g)
    batches = [(b[:, :-1].to(device), b[:, 1:].to(device)) for b in data]
    print(f"{torch.cuda.get_device_name(device)}; {n_params / 1e6:.1f}M params, "
          f"{a.micro_batch}x{a.context} tokens/step, ZeRO {a.zero}, bf16; {peak}", flush=True)  # fmt: skip
    results: dict[str, list[dict[str, float]]] = {"plain": [], "lmforge": []}
    for r in range(a.repeats):
        for name, fn in (("plain", run_plain), ("lmforge", run_lmforge)):
            res = fn(cfg, batches, a.warmup)
            gc.collect()  # the last run's engine gone before the next one's peak
            torch.cuda.empty_cache()
            tps = tokens / statistics.median(res["step_times"][a.warmup :])
            res["tokens_per_s"], res["mfu"] = tps, tps * fpt / peak.flops
            results[name].append(res)
            print(f"[{r + 1}/{a.repeats}] {name:8s} {tps:12,.0f} tokens/s  MFU {res['mfu']:6.1%}  "
                  f"peak mem {res['peak_mem'] / 2**30:6.2f} GiB  loss {res['loss']:.3f}",
                  flush=True)  # fmt: skip
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in results.items()}
    ratio = best["lmforge"]["tokens_per_s"] / best["plain"]["tokens_per_s"]
    print(f"lmforge / plain loop: {ratio:.3f}x tokens/s (best of {a.repeats} each)")
    summary = {
        "device": torch.cuda.get_device_name(device), "peak_source": str(peak),
        "n_params": n_params, "context": a.context, "micro_batch": a.micro_batch,
        "zero": a.zero, "ratio": ratio,
        **{f"{k}_{m}": best[k][m] for k in best for m in ("tokens_per_s", "mfu", "peak_mem")},
    }  # fmt: skip
    print("BENCH_RESULT " + json.dumps(summary))


if __name__ == "__main__":
    main()
