"""The baseline of the training benchmark: a plain single-process PyTorch loop, what a user
would write instead of lmforge (no Ray, no DeepSpeed, no process group).

    .venv/bin/python bench/plain_loop.py --data ~/.lmforge/bench/train-plays3-v512 \\
        --set train.max_steps=8 --set zero.stage=1     # jobs/configs/tiny.yaml, 2 threads

It trains the same model (`lmforge.models.build`) on the same data (`TokenStream`, rank 0 of
1) with the same global batch (micro_batch_size x num_workers x grad_accum_steps sequences
in one forward/backward), the same AdamW hyper-parameters and learning-rate schedule, the
same gradient clipping, and the same total number of CPU threads as lmforge's workers hold
together (num_workers x cpus_per_worker). bf16 runs under `torch.autocast` (fp32 weights
and optimizer, bf16 matmuls): that is what a PyTorch user writes for mixed precision on a
CPU. Throughput is measured as lmforge's trainer measures it: the median step time after
the first `WARMUP_STEPS` steps.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge import models, paths  # noqa: E402
from lmforge.config import Config, load_config  # noqa: E402
from lmforge.data.dataset import Dataset  # noqa: E402
from lmforge.data.stream import TokenStream  # noqa: E402
from lmforge.training.ds_config import lr_factor  # noqa: E402
from lmforge.training.loop import WARMUP_STEPS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@dataclass
class PlainResult:
    tokens_per_step: int
    step_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @property
    def steady_tokens_per_s(self) -> float:
        """Tokens/s of the median step after the warm-up steps (as lmforge's trainer)."""
        warm = self.step_times[WARMUP_STEPS:] or self.step_times
        return self.tokens_per_step / statistics.median(warm)


def global_batch(cfg: Config) -> int:
    t = cfg.train
    return t.micro_batch_size * cfg.scaling.max_workers * t.grad_accum_steps


def total_threads(cfg: Config) -> int:
    return max(1, int(cfg.scaling.max_workers * cfg.scaling.cpus_per_worker))


class Stepper:
    """The plain loop's model, optimizer, schedule and batches; `step()` is one optimizer
    step (returns its loss). Threads are the caller's (`train` sets them)."""

    def __init__(self, cfg: Config) -> None:
        t, m = cfg.train, cfg.model
        if t.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision={t.precision}: the plain loop runs fp32 or bf16")
        self.cfg = cfg
        dataset = Dataset(paths.resolve(cfg.data.path))
        torch.manual_seed(t.seed)
        self.model = models.build(m.model_copy(update={"vocab_size": dataset.vocab_size}))
        # nanoGPT's grouping: decay the matrices, not the biases and LayerNorm gains.
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
        )  # fmt: skip
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, functools.partial(lr_factor, cfg=cfg)
        )
        batch = global_batch(cfg)
        stream = TokenStream(dataset, "train", m.context_length, batch, 0, 1, seed=t.seed)
        self.batches = stream.batches()
        self.tokens_per_step = batch * m.context_length
        self.bf16 = t.precision == "bf16"
        self.model.train()

    def step(self) -> float:
        x, y = next(self.batches)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            _, loss = self.model(x, y)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def train(cfg: Config, threads: int | None = None) -> PlainResult:
    """Train `cfg.train.max_steps` steps; returns every step's time and loss."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or total_threads(cfg))
    try:
        stepper = Stepper(cfg)
        result = PlainResult(tokens_per_step=stepper.tokens_per_step)
        for _ in range(cfg.train.max_steps):
            t0 = time.perf_counter()
            loss = stepper.step()  # data loading included, as lmforge's step time
            result.step_times.append(time.perf_counter() - t0)
            result.losses.append(loss)
        return result
    finally:
        torch.set_num_threads(before)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "tiny.yaml"),
                   help="an lmforge training config (default jobs/configs/tiny.yaml)")  # fmt: skip
    p.add_argument("--data", required=True, help="a dataset dir made by `lmforge prepare`")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="config override, as for `lmforge train`")  # fmt: skip
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: num_workers x cpus_per_worker)")  # fmt: skip
    args = p.parse_args(argv)
    cfg = load_config(args.config, [f"data.path={args.data}", *args.overrides])
    r = train(cfg, args.threads)
    for i, (dt, loss) in enumerate(zip(r.step_times, r.losses, strict=True), 1):
        print(f"step {i:>4} | loss {loss:.4f} | {r.tokens_per_step / dt:,.0f} tok/s")
    print(
        f"throughput {r.steady_tokens_per_s:,.0f} tok/s (median step after {WARMUP_STEPS} "
        f"warm-up steps), {args.threads or total_threads(cfg)} threads, {cfg.train.precision}"
    )


if __name__ == "__main__":
    main()
