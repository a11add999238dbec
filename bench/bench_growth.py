"""How cost grows: with the model's size, the data's size, the number of workers, and with
the speed options (`train.activation_checkpointing`, `train.compile`). One section each:

    .venv/bin/python bench/bench_growth.py --what model     # 1M/14M/124M x ZeRO 0-3 + offload
    .venv/bin/python bench/bench_growth.py --what data      # prepare at 1x/10x/100x the corpus
    .venv/bin/python bench/bench_growth.py --what workers   # 1 vs 2 workers, same global batch
    .venv/bin/python bench/bench_growth.py --what options   # checkpointing / compile per arch
    .venv/bin/python bench/bench_growth.py --what model --tiny   # smallest size: checks it runs

model, workers, options: lmforge's model in the engine `deepspeed_config` builds, stepped as
the trainer steps it, in fresh processes (gloo ranks spawned here, no Ray: the engine's cost
without Ray Train's start-up), random tokens, the median step after 3 warm-up steps. Memory
is each rank's peak resident set above what it held before building the model (imports
excluded), the largest rank's; next to it the launch estimate (`lmforge.estimate`) per
worker. data: `prepare()` (Ray Data, a private local Ray with every core) on the bundled
plays repeated with their lines shuffled (copy i with seed i); memory is the driver's peak
resident set above its level before each prepare (Ray's workers are separate processes, not
counted). One run a point for model, data and options (their curves span 10-100x, and the
full bench must fit an idle hour), two for workers, unless `--repeats` says otherwise. Each
section writes a PNG plot (matplotlib) beside BENCHMARKS.md under
bench/plots/ (with --tiny, under artifacts/bench-plots/, not meant to be kept).
"""

from __future__ import annotations

import functools
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, Figure, bench_args, machine_info, report  # noqa: E402

WARMUP = 3
CONTEXT = 256
SIZES = {  # name -> model overrides (gpt2; vocab 8192 but for 124M, GPT-2's padded 50304)
    "1M": ["model.n_layer=2", "model.d_model=96", "model.n_head=2", "model.vocab_size=8192"],
    "14M": ["model.n_layer=6", "model.d_model=384", "model.n_head=6", "model.vocab_size=8192"],
    "124M": ["model.n_layer=12", "model.d_model=768", "model.n_head=12",
             "model.vocab_size=50304"],
}  # fmt: skip
ZERO = {  # name -> overrides
    "ZeRO 0": ["zero.stage=0"],
    "ZeRO 1": ["zero.stage=1"],
    "ZeRO 2": ["zero.stage=2"],
    "ZeRO 3": ["zero.stage=3"],
    "ZeRO 2 + offload": ["zero.stage=2", "zero.offload_optimizer=cpu"],
}
ARCH_SIZE = {  # options section: each arch at its bench_train size, ctx 256
    "gpt2": ["model.n_layer=6", "model.d_model=384", "model.n_head=6"],
    "llama": ["model.arch=llama", "model.n_layer=6", "model.d_model=384", "model.n_head=6",
              "model.n_kv_head=2"],
    "lstm": ["model.arch=lstm", "model.n_layer=2", "model.d_model=512"],
}  # fmt: skip
TINY_MODEL = ["model.n_layer=1", "model.d_model=64", "model.n_head=2", "model.vocab_size=512"]


def config(overrides: list[str], world: int):
    from lmforge.config import load_config

    return load_config(
        REPO / "jobs" / "configs" / "tiny.yaml",
        [f"model.context_length={CONTEXT}", "model.vocab_size=8192", "model.dropout=0.0",
         "train.warmup_steps=1", f"scaling.num_workers={world}", *overrides],
    )  # fmt: skip


def _rank(rank: int, world: int, port: int, overrides, steps: int, threads: int, q) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")  # fmt: skip
    import torch

    torch.set_num_threads(threads)
    import deepspeed

    from lmforge import dist, models, perf
    from lmforge.training import speed
    from lmforge.training.loop import build_engine

    deepspeed.init_distributed(dist_backend="gloo")
    cfg = config(overrides, world)
    before = perf.resident_bytes()
    torch.manual_seed(0)
    model = models.build(cfg.model)
    if cfg.train.activation_checkpointing:
        speed.checkpoint_blocks(model)
    eng = build_engine(model, cfg, world)  # the trainer's engine, its gathers included
    if cfg.train.compile:
        speed.compile_engine(eng)
    mb, ctx = cfg.train.micro_batch_size, cfg.model.context_length
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(steps):
        x = torch.randint(0, cfg.model.vocab_size, (mb, ctx + 1), generator=g)
        t0 = time.perf_counter()
        _, loss = eng(x[:, :-1], x[:, 1:])
        eng.backward(loss)
        eng.step()
        loss.item()
        times.append(time.perf_counter() - t0)
    peak = perf.peak_resident_bytes() - before
    q.put({"rank": rank, "step_s": statistics.median(times[WARMUP:]), "peak": peak,
           "tokens": mb * ctx})  # fmt: skip
    torch.distributed.destroy_process_group()
    q.close()  # the result is in the pipe before the process goes (a small dict: no wait)
    q.join_thread()
    dist.leave()  # no interpreter teardown, where a ZeRO 3 engine's gloo threads can abort


def engine_run(overrides: list[str], world: int, steps: int, threads: int = 1) -> dict:
    """Step lmforge's engine on `world` spawned gloo ranks; tokens/s (all ranks) and the
    largest rank's peak memory above its pre-model level."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [
        ctx.Process(target=_rank, args=(r, world, port, overrides, steps, threads, q))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    res = [q.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    step = max(r["step_s"] for r in res)
    return {"tokens_per_s": sum(r["tokens"] for r in res) / step,
            "peak": max(r["peak"] for r in res), "step_s": step}  # fmt: skip


def plot(path: Path, title: str, xlabel: str, series: dict, ylabel: str, right=None) -> None:
    """One PNG: each series {label: (xs, ys)}; `right` another (ylabel, series) on a second
    axis (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if right:
        ax2 = ax.twinx()
        for label, (xs, ys) in right[1].items():
            ax2.plot(xs, ys, marker="x", linestyle="--", label=label)
        ax2.set_ylabel(right[0])
        ax2.legend(loc="upper right", fontsize=7)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


@functools.cache
def _peak(precision: str) -> float:
    import torch

    from lmforge.perf import peak_flops

    return peak_flops(torch.device("cpu"), precision).flops  # a timed matmul on a CPU


def _mfu(tps: float, cfg) -> float:
    from lmforge import models

    return tps * models.get(cfg.model.arch).flops_per_token(cfg.model) / _peak(cfg.train.precision)


def grow_model(args, plots: Path) -> tuple[list[Figure], dict]:
    from lmforge.estimate import estimate

    sizes = ["1M"] if args.tiny else list(SIZES)
    zeros = ["ZeRO 0", "ZeRO 3"] if args.tiny else list(ZERO)
    steps = 4 if args.tiny else 6
    figures, tps_series, mem_series = [], {}, {}
    for z in zeros:
        xs, tps, mem = [], [], []
        for size in sizes:
            ov = [*SIZES[size], *ZERO[z], "train.micro_batch_size=2"]
            runs = [engine_run(ov, 2, steps) for _ in range(args.repeats)]
            cfg = config(ov, 2)
            est = estimate(cfg).per_worker_bytes["total"]
            t = [r["tokens_per_s"] for r in runs]
            peak = statistics.median(r["peak"] for r in runs)
            figures.append(Figure(f"{size} {z}", "tokens/s", _spread(t),
                                  note=f"MFU {_mfu(statistics.median(t), cfg):.1%}; peak "
                                  f"{peak / 2**20:,.0f} MiB/worker, estimate "
                                  f"{est / 2**20:,.0f} MiB ({peak / est:.2f}x)"))  # fmt: skip
            xs.append(_n_params(cfg) / 1e6)
            tps.append(statistics.median(t))
            mem.append(peak / 2**20)
        tps_series[z], mem_series[z] = (xs, tps), (xs, mem)
    plot(plots / "growth-model.png", "Model size: 2 workers, ctx 256, micro-batch 2",
         "parameters (M)", tps_series, "tokens/s (solid)",
         right=("peak MiB per worker (dashed)", mem_series))  # fmt: skip
    return figures, {"sizes": sizes, "zero": zeros, "steps": steps}


def _n_params(cfg) -> int:
    from lmforge import models

    return models.get(cfg.model.arch).n_params(cfg.model)


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def grow_workers(args, plots: Path) -> tuple[list[Figure], dict]:
    size = TINY_MODEL if args.tiny else SIZES["14M"]
    steps = 4 if args.tiny else 8
    one, two = [], []
    for _ in range(args.repeats):  # same global batch 4 and 2 CPU threads in all
        one.append(engine_run([*size, "train.micro_batch_size=4"], 1, steps, threads=2))
        two.append(engine_run([*size, "train.micro_batch_size=2"], 2, steps, threads=1))
    f = Figure.ratio_of(
        "2 workers x 1 thread", "tokens/s", [r["tokens_per_s"] for r in two],
        [r["tokens_per_s"] for r in one], baseline="1 worker x 2 threads",
        note="ZeRO 2 fp32, global batch 4 x 256 tokens",
    )  # fmt: skip
    plot(plots / "growth-workers.png", "Workers on one machine, same global batch", "workers",
         {"tokens/s": ([1, 2], [f.baseline_value["median"], f.value["median"]])}, "tokens/s")  # fmt: skip
    return [f], {"steps": steps, "model": size}


def grow_options(args, plots: Path) -> tuple[list[Figure], dict]:
    arches = ["gpt2"] if args.tiny else list(ARCH_SIZE)
    refused: list[str] = []
    steps = 4 if args.tiny else 8
    options = {"none": [], "activation_checkpointing": ["train.activation_checkpointing=true"],
               "compile": ["train.compile=true"]}  # fmt: skip
    figures, series_t, series_m = [], {}, {}
    for arch in arches:
        size = [a for a in ARCH_SIZE[arch] if a.startswith("model.arch")] + (
            TINY_MODEL if args.tiny else ARCH_SIZE[arch]
        )
        base = None
        ts, ms = [], []
        for name, ov in options.items():
            if name == "activation_checkpointing" and arch == "lstm":
                refused.append(f"{arch} {name}")  # one fused nn.LSTM: no blocks to recompute
                ts.append(float("nan"))
                ms.append(float("nan"))
                continue
            cfg_ov = [*size, "zero.stage=0", "train.micro_batch_size=4", *ov]
            runs = [engine_run(cfg_ov, 1, steps, threads=2) for _ in range(args.repeats)]
            t = [r["tokens_per_s"] for r in runs]
            peak = statistics.median(r["peak"] for r in runs)
            if base is None:
                base = (statistics.median(t), peak)
            figures.append(Figure(f"{arch} {name}", "tokens/s", _spread(t),
                                  note=f"{statistics.median(t) / base[0]:.2f}x tokens/s, peak "
                                  f"{peak / 2**20:,.0f} MiB ({peak / base[1]:.2f}x)"))  # fmt: skip
            ts.append(statistics.median(t))
            ms.append(peak / 2**20)
        series_t[arch] = (list(options), ts)
        series_m[arch] = (list(options), ms)
    plot(plots / "growth-options.png", "Speed options, 1 worker x 2 threads, ZeRO 0",
         "option", series_t, "tokens/s (solid)", right=("peak MiB (dashed)", series_m))  # fmt: skip
    return figures, {"arches": arches, "steps": steps, "refused": refused}


def _corpus(plays: list[Path], copies: int, out: Path) -> list[Path]:
    import random

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(copies):
        for p in plays:
            lines = p.read_text(encoding="utf-8").splitlines()
            if i:
                random.Random(i).shuffle(lines)
            f = out / f"{p.stem}-{i}.txt"
            f.write_text("\n".join(lines) + "\n", encoding="utf-8")
            files.append(f)
    return files


class _PeakRSS:
    """The peak of this process's resident set above its level at entry, sampled."""

    def __enter__(self):
        from lmforge.perf import resident_bytes as rss

        self._rss = rss
        self.base = self.peak = rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss()) - self.base


def grow_data(args, plots: Path) -> tuple[list[Figure], dict]:
    from bench.bench_prepare import start_ray, trained_tokenizer
    from lmforge.data.prepare import PrepareOptions, prepare

    n_plays, vocab = (3, 512) if args.tiny else (21, 8192)
    plays = sorted((REPO / "data" / "shakespeare").glob("*.txt"))[:n_plays]
    scales = [1, 2] if args.tiny else [1, 10, 100]
    tok = trained_tokenizer(plays, vocab)
    start_ray(os.cpu_count() or 1)
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="lmforge-growth-"))
    figures, xs, rates, mems = [], [], [], []
    try:
        opts = PrepareOptions(vocab_size=vocab, tokenizer=tok, overwrite=True)
        prepare(_corpus(plays, 1, tmp / "warm"), tmp / "out", opts)  # Ray Data's warm-up
        for k in scales:
            files = _corpus(plays, k, tmp / f"x{k}")
            mb = sum(f.stat().st_size for f in files) / 1e6
            r, m = [], []
            for _ in range(args.repeats):
                with _PeakRSS() as peak:
                    t0 = time.perf_counter()
                    prepare(files, tmp / "out", opts)
                r.append(mb / (time.perf_counter() - t0))
                m.append(peak.peak)
            shutil.rmtree(tmp / f"x{k}")
            figures.append(Figure(f"{k}x corpus ({mb:,.1f} MB)", "MB/s", _spread(r),
                                  note=f"driver peak +{statistics.median(m) / 2**20:,.0f} MiB"))  # fmt: skip
            xs.append(mb)
            rates.append(statistics.median(r))
            mems.append(statistics.median(m) / 2**20)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    plot(plots / "growth-data.png", "Data size: prepare (Ray Data, every core)", "corpus MB",
         {"MB/s": (xs, rates)}, "MB/s (solid)",
         right=("driver peak MiB (dashed)", {"driver peak": (xs, mems)}))  # fmt: skip
    return figures, {"scales": scales, "plays": n_plays, "vocab": vocab}


DEFAULT_REPEATS = {"model": 1, "data": 1, "workers": 2, "options": 1}
WHAT = {"model": grow_model, "data": grow_data, "workers": grow_workers,
        "options": grow_options}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = bench_args(__doc__.splitlines()[0])
    p.add_argument("--what", choices=sorted(WHAT), required=True)
    p.set_defaults(repeats=None)
    args = p.parse_args(argv)
    if args.tiny:
        args.repeats = 1
    elif args.repeats is None:  # curves over 10-100x in size: one run a point; the
        args.repeats = DEFAULT_REPEATS[args.what]  # 1-vs-2 workers comparison: two
    plots = REPO / ("artifacts/bench-plots" if args.tiny else "bench/plots")
    print(f"load average {os.getloadavg()}", flush=True)
    figures, config = WHAT[args.what](args, plots)
    png = plots / f"growth-{args.what}.png"
    config.update(repeats=args.repeats, plot=str(png.relative_to(REPO)), machine=machine_info())
    report(f"growth-{args.what}", figures, config=config)


if __name__ == "__main__":
    main()
