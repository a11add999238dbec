"""What a user would run instead of lmforge, at lmforge's `train` shape and batch: the peers
`bench/bench_train.py` measures side by side with lmforge (issue 31).

    .venv/bin/python bench/peers.py --peer deepspeed --stage 3 --data ~/.lmforge/bench/... \\
        --set train.max_steps=20 --set model.n_layer=6 ...     # prints PEER_RESULT {json}

Peers (each 2 processes x 1 CPU thread, gloo, in a fresh Python started here, as a user
would launch them):
- `ddp`: torch `DistributedDataParallel`, torch AdamW (ZeRO 0's equivalent);
- `deepspeed`: a plain DeepSpeed script: `deepspeed.initialize`, `engine.backward`,
  `engine.step`, with a ZeRO config of DeepSpeed's defaults (`PEER_DS_CONFIG`);
- `hf`: the Hugging Face `Trainer` with the same DeepSpeed config (`TrainingArguments(
  use_cpu=True, deepspeed=...)`; without `use_cpu` accelerate counts one process a rank and
  DeepSpeed's batch check fails; `ACCELERATE_USE_CPU=1` would silently drop DeepSpeed).

Every peer trains lmforge's own model (`lmforge.models.build`: the same arithmetic, so the
ratio measures what is around the model) on the same data (`TokenStream`, each rank its
share), with the same micro-batch, AdamW hyper-parameters, gradient clipping and the two
weight-decay groups. Throughput is lmforge's measure: tokens/s of the median step after
`WARMUP_STEPS`. Each peer reports the engine and ZeRO stage it really ran (read from the
live objects after training), and `run` refuses a result whose engine or stage is not the
one asked for, so a silent fallback (DeepSpeed dropped, another stage) cannot pass.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MARKER = "PEER_RESULT "
# peer -> (what a user would call it, the ZeRO stages it runs at, the engine it must report)
PEERS = {
    "ddp": ("torch DDP", (0,), "DistributedDataParallel"),
    "deepspeed": ("plain DeepSpeed script", (1, 2, 3), "DeepSpeedEngine"),
    "hf": ("HF Trainer + DeepSpeed", (1, 2, 3), "DeepSpeedEngine"),
}
WORLD = 2


@dataclass
class PeerResult:
    peer: str
    stage: int  # the ZeRO stage the engine ran (0: DDP)
    engine: str  # the wrapper class that trained, read after training
    backend: str  # the process group's backend
    tokens_per_s: float
    step_times: list[float]
    losses: list[float]


class PeerMismatch(RuntimeError):
    """A peer ran another engine or stage than asked for (a silent fallback)."""


def label(peer: str, stage: int) -> str:
    """The peer's name in the report, e.g. "plain DeepSpeed script ZeRO 3"."""
    name = PEERS[peer][0]
    return name if peer == "ddp" else f"{name} ZeRO {stage}"


def check(result: PeerResult, peer: str, stage: int) -> PeerResult:
    """`result` if it ran the engine and stage asked for, on gloo; else PeerMismatch."""
    want = PEERS[peer][2]
    if result.peer != peer or result.engine != want or result.stage != stage:
        raise PeerMismatch(
            f"{label(peer, stage)}: ran {result.engine} at ZeRO {result.stage} "
            f"(asked for {want} at ZeRO {stage}): a silent fallback, not the peer"
        )
    if result.backend != "gloo":
        raise PeerMismatch(f"{label(peer, stage)}: ran on {result.backend}, not gloo")
    return result


def peer_ds_config(cfg, stage: int) -> dict:
    """The DeepSpeed config a user writes for this batch and optimizer: ZeRO `stage` with
    DeepSpeed's default settings (none of lmforge's: no `reduce_scatter: false`, no
    broadcast gathers)."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * WORLD,
        "gradient_clipping": t.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.beta1, t.beta2],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                "torch_adam": True,
            },
        },  # fmt: skip
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
    }


def run(peer: str, stage: int, data: Path, overrides: list[str], config: Path) -> PeerResult:
    """Train the peer in a fresh process (which starts its 2 ranks); its checked result."""
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--peer", peer, "--stage", str(stage),
        "--data", str(data), "--config", str(config),
        *[a for o in overrides for a in ("--set", o)],
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"{label(peer, stage)} failed (exit {proc.returncode}):\n{tail}")
    return check(PeerResult(**json.loads(lines[-1][len(MARKER) :])), peer, stage)


# -- inside the peer's process ----------------------------------------------------------------


def _rank_main(rank: int, args, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    import torch

    torch.set_num_threads(1)  # as lmforge's workers: 1 CPU each
    from lmforge.config import load_config

    cfg = load_config(args.config, [f"data.path={args.data}", *args.overrides])
    fn = {"ddp": _ddp, "deepspeed": _deepspeed, "hf": _hf}[args.peer]
    result = fn(cfg, rank, args.stage)
    if rank == 0:
        Path(out).write_text(json.dumps(asdict(result)))
    # The HF Trainer at ZeRO 3 leaves a native thread that aborts the interpreter's
    # teardown: the result is written and no collective is left, so the rank ends here.
    from lmforge import dist

    dist.leave()


def _setup(cfg, rank: int):
    """(model, data batches of this rank, weight-decay groups) as lmforge's trainer has them."""
    import torch

    from lmforge import models, paths
    from lmforge.data.dataset import Dataset
    from lmforge.data.stream import TokenStream
    from lmforge.training.loop import param_groups

    t = cfg.train
    dataset = Dataset(paths.resolve(cfg.data.path))
    torch.manual_seed(t.seed)
    model = models.build(cfg.model.model_copy(update={"vocab_size": dataset.vocab_size}))
    stream = TokenStream(
        dataset, "train", cfg.model.context_length, t.micro_batch_size, rank, WORLD, seed=t.seed
    )
    return model, stream.batches(), param_groups(model, t.weight_decay)


def _tokens_per_s(cfg, times: list[float]) -> float:
    from lmforge.training.loop import WARMUP_STEPS

    t = cfg.train
    tokens = t.micro_batch_size * t.grad_accum_steps * WORLD * cfg.model.context_length
    return tokens / statistics.median(times[WARMUP_STEPS:] or times)


def _ddp(cfg, rank: int, stage: int) -> PeerResult:
    import torch
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmforge.training.ds_config import lr_factor

    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model, batches, groups = _setup(cfg, rank)
    ddp = DDP(model)
    t = cfg.train
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(lr_factor, cfg=cfg))
    times, losses = [], []
    for _ in range(t.max_steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        _, loss = ddp(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    result = PeerResult(
        "ddp", 0, type(ddp).__name__, tdist.get_backend(), _tokens_per_s(cfg, times), times,
        losses,
    )  # fmt: skip
    tdist.destroy_process_group()
    return result


def _deepspeed(cfg, rank: int, stage: int) -> PeerResult:
    import torch
    import torch.distributed as tdist

    tdist.init_process_group("gloo", rank=rank, world_size=WORLD)
    import deepspeed

    from lmforge.training.ds_config import lr_factor

    model, batches, groups = _setup(cfg, rank)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=groups, config=peer_ds_config(cfg, stage),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, functools.partial(lr_factor, cfg=cfg)
        ),
    )  # fmt: skip
    times, losses = [], []
    for _ in range(cfg.train.max_steps):
        t0 = time.perf_counter()
        x, y = next(batches)
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        times.append(time.perf_counter() - t0)
    return PeerResult(
        "deepspeed", engine.zero_optimization_stage(), type(engine).__name__,
        tdist.get_backend(), _tokens_per_s(cfg, times), times, losses,
    )  # fmt: skip


def _hf(cfg, rank: int, stage: int) -> PeerResult:
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    t = cfg.train
    out = tempfile.mkdtemp(prefix="lmforge-peer-hf-")
    args = TrainingArguments(
        output_dir=out, use_cpu=True, deepspeed=peer_ds_config(cfg, stage),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum_steps, max_steps=t.max_steps,
        learning_rate=t.lr, weight_decay=t.weight_decay, adam_beta1=t.beta1, adam_beta2=t.beta2,
        adam_epsilon=1e-8, max_grad_norm=t.grad_clip, warmup_steps=t.warmup_steps,
        lr_scheduler_type="cosine", logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        remove_unused_columns=False, seed=t.seed,
    )  # fmt: skip
    import deepspeed
    import torch.distributed as tdist

    # ZeRO 3: a model built under `from_config` would run deepspeed.zero.Init before
    # DeepSpeed's comm is up; a user calls this after TrainingArguments (a no-op if up).
    deepspeed.init_distributed("gloo")
    model, batches, _ = _setup(cfg, rank)

    class LM(torch.nn.Module):
        """lmforge's model with the Trainer's calling convention (a dict with its loss)."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, labels):
            return {"loss": self.inner(input_ids, labels)[1]}

    class Rows(torch.utils.data.Dataset):
        """The stream's sequences, both ranks' in the order the Trainer's sampler deals."""

        def __init__(self, n: int) -> None:
            self.rows = []
            while len(self.rows) < n:
                x, y = next(batches)
                self.rows += [{"input_ids": a, "labels": b} for a, b in zip(x, y, strict=True)]

        def __len__(self) -> int:
            return len(self.rows)

        def __getitem__(self, i: int):
            return self.rows[i]

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = [time.perf_counter()]
            self.losses: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            if len(self.ends) == 1:
                self.ends[0] = time.perf_counter()  # the first step starts here

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    clock = Clock()
    rows = Rows(t.max_steps * t.micro_batch_size * t.grad_accum_steps * WORLD)
    trainer = Trainer(model=LM(model), args=args, train_dataset=rows, callbacks=[clock])
    trainer.train()
    engine = trainer.model_wrapped
    times = [b - a for a, b in zip(clock.ends, clock.ends[1:], strict=False)]
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    ran = engine.zero_optimization_stage() if trainer.is_deepspeed_enabled else -1
    del transformers
    return PeerResult(
        "hf", ran, type(engine).__name__, tdist.get_backend(), _tokens_per_s(cfg, times), times,
        losses,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", choices=sorted(PEERS), required=True)
    p.add_argument("--stage", type=int, default=0)
    p.add_argument("--data", required=True, help="a dataset dir made by `lmforge prepare`")
    p.add_argument("--config", default=str(REPO / "jobs" / "configs" / "tiny.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.stage not in PEERS[args.peer][1]:
        p.error(f"{args.peer} runs at ZeRO {PEERS[args.peer][1]}, not {args.stage}")
    sys.path.insert(0, str(REPO))
    import torch.multiprocessing as mp

    from lmforge.services import free_port

    with tempfile.TemporaryDirectory(prefix="lmforge-peer-") as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(
            _rank_main, args=(args, free_port(), out), nprocs=WORLD, join=True,
            start_method="spawn",
        )  # fmt: skip
        print(MARKER + Path(out).read_text(), flush=True)


if __name__ == "__main__":
    main()
