"""Checkpoint speed: save and restore a ~125M-parameter DeepSpeed engine state and write
its consolidated safetensors, against the disk's sequential write (and read) speed
measured in the same run with `dd`.

    .venv/bin/python bench/bench_checkpoint.py            # GPT-2 small shape (124M), ZeRO 1
    .venv/bin/python bench/bench_checkpoint.py --tiny     # a 2-layer model: checks it runs

The engine is a single-process DeepSpeed engine on this machine's accelerator (gloo on
CPU), built by the same functions a training worker uses (`deepspeed_config`,
`param_groups`, `consolidated_weights`, `save_servable`), with its optimizer state filled by
one step. Every timed write ends with fsync, like dd's `conv=fsync`, so both measure the
disk rather than the page cache. Reads come right after the writes (from the page cache
where it holds them) for both sides alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Figure, alternate, bench_args, machine_info, report  # noqa: E402


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _build_engine(overrides: list[str]):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():  # fmt: skip
        os.environ.setdefault(k, v)
    from lmforge import dist

    info = dist.setup(False)  # before deepspeed: the accelerator, and the tools it builds with
    import deepspeed
    import torch

    from lmforge import models
    from lmforge.config import load_config
    from lmforge.training.loop import build_engine

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", overrides)
    torch.manual_seed(0)
    model = models.build(cfg.model)
    engine = build_engine(model, cfg, 1)
    x = torch.randint(0, cfg.model.vocab_size, (1, 32))
    _, loss = engine(x, x)  # one step, so the optimizer state exists
    engine.backward(loss)
    engine.step()
    return engine, cfg, models.of(model).n_params(cfg.model), info


def dd_write(path: Path, nbytes: int) -> float:
    """Seconds for dd to write `nbytes` sequentially and fsync them."""
    count = max(1, nbytes // (16 << 20))
    t0 = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={path}", "bs=16M", f"count={count}", "conv=fsync"],
        check=True, capture_output=True,
    )  # fmt: skip
    return (time.perf_counter() - t0) * nbytes / (count * (16 << 20))


def main(argv: list[str] | None = None) -> None:
    args = bench_args(__doc__.splitlines()[0]).parse_args(argv)
    repeats = 1 if args.tiny else args.repeats
    shape = (
        ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.vocab_size=512"]
        if args.tiny
        else [
            "model.n_layer=12",
            "model.d_model=768",
            "model.n_head=12",
            "model.context_length=1024",
            "model.vocab_size=50257",
        ]  # fmt: skip
    )
    overrides = [*shape, "zero.stage=1", "train.warmup_steps=0"]
    print(f"building the engine ({'tiny' if args.tiny else 'GPT-2 small, 124M'}) ...", flush=True)
    engine, cfg, n_params, info = _build_engine(overrides)
    from lmforge import checkpoint as ckpt_io
    from lmforge.training import engine_state
    from lmforge.training.engine_state import consolidated_weights

    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-ckpt-", dir=os.environ.get("TMPDIR")))
    tokenizer = work / "tokenizer.json"
    tokenizer.write_text("{}")  # save_servable copies it; its content is not timed
    sizes: dict[str, int] = {}

    def save_engine() -> float:
        d = work / "engine"
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        engine.save_checkpoint(str(d), tag=ckpt_io.ENGINE_TAG)
        _fsync_tree(d)
        dt = time.perf_counter() - t0
        sizes["engine"] = _tree_bytes(d)
        return sizes["engine"] / dt

    def load_engine() -> float:  # what a resume's `Trainer.restore` does
        # into an engine as freshly built: its torch optimizer holds no moments yet
        engine_state._base_optimizer(engine).state.clear()
        t0 = time.perf_counter()
        engine_state.load_engine_state(engine, work / "engine", ckpt_io.ENGINE_TAG)
        return sizes["engine"] / (time.perf_counter() - t0)

    def save_weights() -> float:
        d = work / "servable"
        shutil.rmtree(d, ignore_errors=True)
        t0 = time.perf_counter()
        weights = consolidated_weights(engine, info)
        ckpt_io.save_servable(d, weights, cfg, tokenizer, ckpt_io.TrainerState(1))
        _fsync_tree(d)
        dt = time.perf_counter() - t0
        sizes["weights"] = (d / ckpt_io.WEIGHTS).stat().st_size
        return sizes["weights"] / dt

    def dd_rate(key: str) -> float:
        nbytes = sizes.get(key) or 64 << 20
        path = work / "dd.bin"
        seconds = dd_write(path, nbytes)
        path.unlink()
        return nbytes / seconds

    def read_rate() -> float:
        files = [p for p in (work / "engine").rglob("*") if p.is_file()]
        t0 = time.perf_counter()
        for p in files:
            with open(p, "rb") as f:
                while f.read(16 << 20):
                    pass
        return sizes["engine"] / (time.perf_counter() - t0)

    save_engine()  # warm-up: first-time allocations and directory creation
    save_weights()
    mb = 1 << 20
    runs = alternate(
        {
            "save": save_engine,
            "dd_engine": lambda: dd_rate("engine"),
            "weights": save_weights,
            "dd_weights": lambda: dd_rate("weights"),
            "load": load_engine,
            "read": read_rate,
        },
        repeats,
    )
    mbps = {k: [v / mb for v in vs] for k, vs in runs.items()}
    seconds = {
        "save": [sizes["engine"] / v for v in runs["save"]],
        "load": [sizes["engine"] / v for v in runs["load"]],
        "weights": [sizes["weights"] / v for v in runs["weights"]],
    }
    for k, vs in seconds.items():
        print(f"{k}: {min(vs):.2f}-{max(vs):.2f} s")
    figures = [
        Figure.ratio_of(
            "save engine state (DeepSpeed)", "MB/s", mbps["save"], mbps["dd_engine"],
            baseline="dd write+fsync", target=0.5,
            note=f"{sizes['engine'] / mb:,.0f} MB in {sorted(seconds['save'])[len(seconds['save']) // 2]:.2f} s",
        ),
        Figure.ratio_of(
            "write consolidated safetensors", "MB/s", mbps["weights"], mbps["dd_weights"],
            baseline="dd write+fsync", target=0.5,
            note=f"{sizes['weights'] / mb:,.0f} MB, gather + write",
        ),
        Figure.ratio_of(
            "restore engine state", "MB/s", mbps["load"], mbps["read"],
            baseline="sequential read of the same files", target=0.5,
        ),
    ]  # fmt: skip
    report(
        "checkpoint",
        figures,
        config={
            "params": n_params,
            "zero_stage": 1,
            "overrides": overrides,
            "machine": machine_info(),
        },  # fmt: skip
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
