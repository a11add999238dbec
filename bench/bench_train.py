"""Training throughput: lmforge's train job (Ray Train, 2 workers, DeepSpeed ZeRO 0-3, fp32
and bf16) against a plain single-process PyTorch loop (`bench/plain_loop.py`) on the same
model, data, global batch and number of CPU threads; its MFU; and bf16 against fp32.

    .venv/bin/python bench/bench_train.py                 # gpt2 ~14M params, ZeRO 0-3: ~15 min
    .venv/bin/python bench/bench_train.py --arch llama    # llama ~12.6M, ZeRO 1-2 fp32
    .venv/bin/python bench/bench_train.py --arch lstm     # lstm ~8.4M, ZeRO 1-2 fp32
    .venv/bin/python bench/bench_train.py --shape small   # gpt2 4 layers d 128 ctx 64: small steps
    .venv/bin/python bench/bench_train.py --tiny          # 2-layer model, ZeRO 1 fp32: checks it runs
    .venv/bin/python -m bench.bench_train --repeats 3 --stages 1,2 --precisions fp32

Models (full size; `--arch`, the preset `jobs/configs/<arch>-tiny.yaml` at these sizes), on
the bundled Shakespeare (21 plays) with a vocab of 8192, context 256:
- gpt2 (`tiny.yaml`): n_layer 6, d_model 384, n_head 6: 13.9M parameters, 10.6M of them in
  the blocks; 6N counts the 13.8M weights of the matmuls (the tied output projection
  included, `lmforge.models`).
- llama (`llama-tiny.yaml`): n_layer 6, d_model 384, n_head 6, n_kv_head 2 (grouped-query),
  SwiGLU ffn_hidden 1024 (the default), tied embeddings: 12.6M parameters.
- lstm (`lstm-tiny.yaml`): n_layer 2, d_model 512, tied head: 8.4M parameters.
- `--shape small` (gpt2 only, section `train-small`): n_layer 4, d_model 128, n_head 4,
  context 64, micro-batch 6 (768 tokens a step): steps of ~0.1 s, where the fixed cost of a
  step (collectives' latency, Python, DeepSpeed's bookkeeping) weighs most. ZeRO 2 fp32.
Peers (issue 31; gpt2's full shape, fp32, `--peers`): what a user would run instead, at the
same shape and batch, alternated with lmforge's runs (`bench/peers.py`): torch DDP beside
ZeRO 0, a plain DeepSpeed script and the Hugging Face `Trainer` + DeepSpeed beside ZeRO 2
and 3; each its column pair in the table (goal: lmforge / DDP >= 1.0x, the others
>= 1.05x). The plain loop stays the limit. `--peers local` (not in the default set) adds
lmforge's own trainer without Ray (`lmforge train --local`: the same engine on 2 local
processes) at each fp32 stage: lmforge under Ray / it is what Ray Train's processes cost.
Each arch's report is its own section: `train` (gpt2), `train-llama`, `train-lstm`. gpt2
runs ZeRO 0-3 in fp32 and ZeRO 2 in bf16 (issue 16's rows); llama and lstm default to the
stages the throughput target is set for (ZeRO 1-2, fp32). Targets (lmforge / plain loop):
>= 0.90x at ZeRO 1-2 fp32 and ZeRO 2 bf16, >= 0.75x at ZeRO 3 (issue 31); bf16 / fp32 >= 2.0x where
the CPU has avx512_bf16 (bf16 is ~25x slower without it).
Global batch 2 workers x micro-batch 2 x 256 tokens = 1024 tokens a step, each worker with
1 CPU thread; the plain loop trains the same 4 sequences a step in one forward/backward
with 2 threads.

What is measured: tokens/s of the median step after 3 warm-up steps, on both sides
(lmforge's trainer reports it as `steady_tokens_per_s`; the plain loop times its steps the
same way, data loading included). Ray Train's start-up (~20-30 s a run), the final
evaluation and checkpoint are not measured. MFU = tokens/s x `flops_per_token` (6N +
12·L·d·T) over the FLOP/s of a large matmul in the same dtype (`lmforge.perf`), measured
once here with 2 threads before anything else starts. In bf16 the plain loop uses
`torch.autocast` (fp32 weights, bf16 matmuls), lmforge DeepSpeed's bf16 (bf16 weights,
fp32 master copy).

Runs alternate (lmforge ZeRO 0..3, plain, then the reverse) so machine noise lands on both.
On a CPU without avx512_bf16, bf16 matmuls fall back to slow kernels (a bf16 step takes
~25x an fp32 step at full size): bf16 then runs at ZeRO 1 only, 1 repeat, 5 steps, and
the result says so.

The dataset is prepared once (Ray needed: a private local Ray starts if no cluster runs)
and cached under `$LMFORGE_HOME/bench/`; runs write under a temp dir, with tracking off.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from bench import peers as peer_runs  # noqa: E402
from bench.common import REPO, Figure, alternate, bench_args, machine_info, report, spread  # noqa: E402

cpu_flags_line = common.cpu_flags_line

THREADS = 2  # lmforge: 2 workers x 1 CPU; the plain loop: 2 torch threads
# Per architecture: its CPU preset and the full-size model overrides on top of it.
PRESETS = {"gpt2": "tiny.yaml", "llama": "llama-tiny.yaml", "lstm": "lstm-tiny.yaml"}
CONTEXT = ["model.context_length=256"]
FULL_MODEL = {
    "gpt2": ["model.n_layer=6", "model.d_model=384", "model.n_head=6", *CONTEXT],
    "llama": [
        "model.n_layer=6", "model.d_model=384", "model.n_head=6", "model.n_kv_head=2", *CONTEXT
    ],
    "lstm": ["model.n_layer=2", "model.d_model=512", *CONTEXT],
}  # fmt: skip
# The small-step shape (`--shape small`, gpt2): the fixed cost of a step weighs most.
SMALL_MODEL = [
    "model.n_layer=4", "model.d_model=128", "model.n_head=4", "model.context_length=64",
    "train.micro_batch_size=6", "train.grad_accum_steps=1",
]  # fmt: skip
# precision -> ZeRO stages run by default; gpt2 issue 16's rows, the others the targeted ones.
DEFAULT_RUNS = {
    ("gpt2", "full"): {"fp32": [0, 1, 2, 3], "bf16": [2]},
    ("gpt2", "small"): {"fp32": [2]},
}
TARGETED_RUNS = {"fp32": [1, 2]}
FULL_BATCH = ["train.micro_batch_size=2", "train.grad_accum_steps=1"]
# lmforge / plain loop tokens/s, per (ZeRO stage, precision) (issue 16's goals).
THROUGHPUT_TARGETS = {(1, "fp32"): 0.90, (2, "fp32"): 0.90, (3, "fp32"): 0.75, (2, "bf16"): 0.90}
# What a user would run instead (bench/peers.py, issue 31), fp32 only: peer -> the ZeRO
# stages it runs at here, and the goal of lmforge / it at the same stage.
PEER_STAGES = {"ddp": (0,), "deepspeed": (2, 3), "hf": (2, 3), "local": (0, 1, 2, 3)}
PEER_TARGETS = {"ddp": 1.0, "deepspeed": 1.05, "hf": 1.05, "local": None}
DEFAULT_PEERS = ("ddp", "deepspeed", "hf")  # "local" is lmforge itself, asked for by name
LOCAL_LABEL = "lmforge without Ray"
MFU_TARGET = 50.0  # %, ZeRO 1-2 fp32
BF16_TARGET = 2.0  # bf16 / fp32 tokens/s, on a CPU with avx512_bf16
SLOW_BF16_TARGET = 1.5  # without it (never met: the fallback kernels are ~25x slower)
TARGET_STAGES = (1, 2)
STARTUP_S = 50.0  # Ray Train workers + DeepSpeed init + final eval, checkpoint and teardown
SLOW_BF16_STEPS = 5  # 3 warm-up + 2 measured, where a bf16 step takes half a minute


def prepared_dataset(tiny: bool) -> Path:
    """The benchmark's dataset dir, prepared on first use and reused afterwards."""
    from lmforge import paths

    n_plays, vocab = (3, 512) if tiny else (21, 8192)
    out = paths.home() / "bench" / f"train-plays{n_plays}-v{vocab}"
    if (out / "manifest.json").is_file():
        return out
    from lmforge.cluster import connect
    from lmforge.data.prepare import PrepareOptions, prepare

    plays = sorted((REPO / "data" / "shakespeare").glob("*.txt"))[:n_plays]
    print(f"preparing {len(plays)} plays (vocab {vocab}) into {out} ...", flush=True)
    connect()
    # 8 rows of 1024 tokens a row group: enough row groups for 2 workers even at 3 plays.
    opts = PrepareOptions(vocab_size=vocab, seq_tokens=1024, rows_per_group=8, overwrite=True)
    prepare(plays, out, opts)
    return out


def section(arch: str, shape: str = "full") -> str:
    """The benchmark's name in BENCHMARKS.md: `train` for gpt2 (as before), else
    `train-<arch>`; `train-small` for the small-step shape."""
    if shape == "small":
        return "train-small"
    return "train" if arch == "gpt2" else f"train-{arch}"


def model_sizes(arch: str, shape: str, tiny: bool) -> list[str]:
    """The model and batch overrides of a run (none at --tiny: the preset's 2 layers; the
    small shape is small enough to be its own tiny size)."""
    if shape == "small":
        return SMALL_MODEL
    return [] if tiny else FULL_MODEL[arch] + FULL_BATCH


def build_config(
    arch: str, dataset: Path, tiny: bool, steps: int, storage: Path, stage: int, precision: str,
    shape: str = "full",
):  # fmt: skip
    from lmforge.config import load_config

    sizes = model_sizes(arch, shape, tiny)
    return load_config(
        REPO / "jobs" / "configs" / PRESETS[arch],
        [
            *sizes,
            f"data.path={dataset}",
            f"zero.stage={stage}",
            f"train.precision={precision}",
            f"train.max_steps={steps}",
            f"train.warmup_steps={min(5, steps)}",
            f"train.eval_every={steps}",  # one evaluation and one checkpoint, at the end
            f"train.checkpoint_every={steps}",
            f"train.log_every={steps}",
            "train.eval_steps=2",
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=1",
            "tracking.enabled=false",  # benchmarks do not fill the registry
            f"run.storage_path={storage}",
            f"run.name=bench-{arch}-z{stage}-{precision}-{uuid.uuid4().hex[:8]}",
        ],
    )


def model_flops_per_token(cfg, vocab_size: int) -> tuple[float, int]:
    """(training FLOPs per token, parameters): the architecture's counts, as the trainer's."""
    from lmforge import models

    model_cfg = cfg.model.model_copy(update={"vocab_size": vocab_size})
    arch = models.get(model_cfg.arch)
    return arch.flops_per_token(model_cfg), arch.n_params(model_cfg)


class Runs:
    """The run functions `alternate` calls; each returns tokens/s and keeps its details."""

    def __init__(
        self, arch: str, dataset: Path, tiny: bool, storage: Path, total: int, shape: str
    ) -> None:
        self.arch, self.dataset, self.tiny, self.storage = arch, dataset, tiny, storage
        self.shape = shape
        self.details: dict[str, list[dict[str, float]]] = {}
        self.failed: dict[str, str] = {}  # peer -> why its run failed
        self.done, self.total, self.started = 0, total, time.perf_counter()

    def _progress(self, name: str, tokens_per_s: float, extra: str, began: float) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        print(
            f"[{self.done}/{self.total}] {name}: {tokens_per_s:,.0f} tokens/s{extra} "
            f"({time.perf_counter() - began:.0f} s; {elapsed / 60:.1f} min so far)",
            flush=True,
        )

    def lmforge(self, stage: int, precision: str, steps: int, local: bool = False):
        name = peer_labels("local", stage)[1] if local else f"lmforge ZeRO {stage} {precision}"

        def run() -> float:
            from lmforge.training.launch import run_training

            began = time.perf_counter()
            cfg = build_config(
                self.arch,
                self.dataset,
                self.tiny,
                steps,
                self.storage,
                stage,
                precision,
                self.shape,
            )
            result = run_training(cfg, local=local)
            shutil.rmtree(result.run_dir, ignore_errors=True)  # checkpoints: ~0.2 GB a run
            m = result.metrics
            if "steady_tokens_per_s" not in m:
                raise RuntimeError(f"{name}: the run reported no steady_tokens_per_s ({m})")
            keep = ("steady_tokens_per_s", "steady_mfu", "data_wait_fraction")
            self.details.setdefault(name, []).append({k: float(m[k]) for k in keep})
            extra = f", data wait {m['data_wait_fraction']:.1%}"
            self._progress(name, m["steady_tokens_per_s"], extra, began)
            return float(m["steady_tokens_per_s"])

        return name, run

    def peer(self, peer: str, stage: int, steps: int):
        """A peer (`bench/peers.py`) at `stage`, fp32, same model, data and batch."""
        name = peer_runs.label(peer, stage)

        def run() -> float:
            began = time.perf_counter()
            sizes = model_sizes(self.arch, self.shape, self.tiny)
            steps_set = [f"train.max_steps={steps}", f"train.warmup_steps={min(5, steps)}"]
            try:
                r = peer_runs.run(
                    peer, stage, self.dataset, [*sizes, *steps_set],
                    REPO / "jobs" / "configs" / PRESETS[self.arch],
                )  # fmt: skip
            except RuntimeError as e:  # a crash or a fallback (PeerMismatch): said, not hidden
                self.failed[name] = str(e).splitlines()[0]
                print(f"{name} FAILED: {e}", flush=True)
                return float("nan")
            self.details.setdefault(name, []).append({"engine": r.engine, "stage": r.stage})
            extra = f" ({r.engine}, ZeRO {r.stage}, {r.backend}), last loss {r.losses[-1]:.3f}"
            self._progress(name, r.tokens_per_s, extra, began)
            return r.tokens_per_s

        return name, run

    def plain(self, precision: str, steps: int):
        name = f"plain {precision}"

        def run() -> float:
            from bench import plain_loop

            began = time.perf_counter()
            cfg = build_config(
                self.arch, self.dataset, self.tiny, steps, self.storage, 1, precision, self.shape
            )
            r = plain_loop.train(cfg, THREADS)
            self._progress(name, r.steady_tokens_per_s, f", last loss {r.losses[-1]:.3f}", began)
            return r.steady_tokens_per_s

        return name, run


def measure_peaks(precisions: list[str]) -> dict[str, float]:
    """FLOP/s of a large matmul per dtype, with this benchmark's 2 threads, on an idle
    machine (before Ray starts): the MFU denominator."""
    import torch

    from lmforge.perf import measure_peak_flops

    torch.set_num_threads(THREADS)
    peaks = {}
    for p in precisions:
        peaks[p] = measure_peak_flops(torch.device("cpu"), p, seconds=1.0)
        print(f"matmul peak {p}, {THREADS} threads: {peaks[p] / 1e9:,.1f} GFLOP/s", flush=True)
    return peaks


def mfu_figure(name: str, pct: list[float], plain_pct: list[float], peak: float, target: bool):
    note = f"plain loop {statistics.median(plain_pct):.0f}%; peak {peak / 1e9:,.1f} GFLOP/s"
    if max(pct) > 100:
        note += (
            "; above 100%: this CPU's matmul kernel for the dtype is slower than the ones "
            "nn.Linear uses, so the peak understates it"
        )
    med = statistics.median(pct)
    return Figure(
        name=name, unit="% of matmul peak", value=spread(pct),
        target=f">= {MFU_TARGET:g}%" if target else "",
        met=(med >= MFU_TARGET) if target else None, note=note,
    )  # fmt: skip


def plan(args, fast_bf16: bool) -> tuple[list[tuple[int, str, int]], dict[str, int]]:
    """(stage, precision, steps) of the lmforge runs, and each precision's repeats."""
    stages = [int(s) for s in args.stages.split(",")] if args.stages else None
    precisions = args.precisions.split(",") if args.precisions else None
    if args.tiny:
        stages, precisions = stages or [1], precisions or ["fp32"]
    defaults = DEFAULT_RUNS.get((args.arch, args.shape), TARGETED_RUNS)
    precisions = precisions or list(defaults)
    default_steps = 60 if args.shape == "small" else 20  # small steps: ~0.1 s each
    steps = args.steps or (8 if args.tiny else default_steps)
    runs, repeats = [], {}
    for p in precisions:
        mine = stages or defaults.get(p) or defaults["fp32"]
        if p == "bf16" and not fast_bf16 and not args.tiny and not args.stages:
            # Without avx512_bf16 a full-size bf16 step takes ~25 s: one short run.
            runs += [(mine[0], p, min(steps, SLOW_BF16_STEPS))]
            repeats[p] = 1
        else:
            runs += [(s, p, steps) for s in mine]
            repeats[p] = 1 if args.tiny else args.repeats
    return runs, repeats


def plan_peers(args, runs) -> list[tuple[str, int]]:
    """(peer, stage) pairs to run beside lmforge's fp32 runs: gpt2's full shape by default
    (`--peers none` drops them; at --tiny only when named)."""
    if args.peers == "none" or (args.peers is None and (args.tiny or args.shape != "full")):
        return []
    wanted = list(DEFAULT_PEERS) if args.peers in (None, "all") else args.peers.split(",")
    fp32 = [s for s, p, _ in runs if p == "fp32"]
    return [(peer, s) for peer in wanted for s in PEER_STAGES[peer] if s in fp32]


def estimate_s(runs, repeats, step_flops: float, peaks: dict[str, float], fast_bf16: bool):
    """A rough duration: start-up per lmforge run plus steps at ~60% of the fp32 peak
    (~25x slower in bf16 without avx512_bf16), for lmforge and the plain loop alike."""
    total = 0.0
    for precision in repeats:
        mine = [(s, st) for s, p, st in runs if p == precision]
        if not mine:
            continue
        slow = 1 if fast_bf16 or precision == "fp32" else 25
        step_s = step_flops / (0.6 * peaks.get("fp32", peaks[precision])) * slow
        steps = mine[0][1]
        per_round = sum(STARTUP_S + st * step_s for _, st in mine) + steps * step_s + 5
        total += repeats[precision] * per_round
    return total


def main(argv: list[str] | None = None) -> None:
    p = bench_args(__doc__.splitlines()[0])
    p.set_defaults(repeats=2)  # a round of ZeRO 0-3 + plain takes ~5 min on 2 cores
    p.add_argument("--arch", choices=sorted(PRESETS), default="gpt2",
                   help="model.arch to benchmark (default gpt2)")  # fmt: skip
    p.add_argument("--stages", help="ZeRO stages to run, e.g. 1,2 (default gpt2 0,1,2,3, "
                   "llama/lstm 1,2; --tiny: 1)")  # fmt: skip
    p.add_argument("--precisions", help="fp32,bf16 (default gpt2 both, llama/lstm fp32; "
                   "--tiny: fp32)")  # fmt: skip
    p.add_argument(
        "--steps", type=int,
        help="steps a run, 3 of them warm-up (default 20, --shape small 60; --tiny 8)",
    )  # fmt: skip
    p.add_argument(
        "--peers",
        help="what a user would run instead, beside lmforge's fp32 runs: all (default for "
        "gpt2's full shape: ddp,deepspeed,hf), none, or some of ddp,deepspeed,hf "
        "(bench/peers.py) and local (lmforge's own trainer without Ray, --local)",
    )
    p.add_argument(
        "--shape", choices=["full", "small"], default="full",
        help="full: the arch's ~14M model, ctx 256; small (gpt2): 4 layers, d_model 128, "
        "ctx 64, micro-batch 6, its own section train-small",
    )  # fmt: skip
    args = p.parse_args(argv)
    unknown = set((args.peers or "all").split(",")) - {"all", "none", *PEER_STAGES}
    if unknown:
        p.error(f"--peers {args.peers}: unknown {', '.join(sorted(unknown))}")
    if args.shape == "small" and args.arch != "gpt2":
        p.error("--shape small is gpt2's (4 layers, d_model 128); drop --arch or --shape")
    started = time.perf_counter()
    machine = machine_info()
    fast_bf16 = machine["avx512_bf16"]
    runs, repeats = plan(args, fast_bf16)
    precisions = list(repeats)
    peaks = measure_peaks(precisions)  # first: nothing else runs yet

    from lmforge.cluster import connect
    from lmforge.data.dataset import Dataset
    from lmforge.training.loop import WARMUP_STEPS

    dataset_dir = prepared_dataset(args.tiny)
    dataset = Dataset(dataset_dir)
    where = connect()  # once; every run_training reuses it
    storage = Path(tempfile.mkdtemp(prefix="lmforge-bench-train-"))
    probe = build_config(args.arch, dataset_dir, args.tiny, 8, storage, 1, "fp32", args.shape)
    fpt, n_params = model_flops_per_token(probe, dataset.vocab_size)
    m, t = probe.model, probe.train
    tokens_per_step = t.micro_batch_size * 2 * t.grad_accum_steps * m.context_length
    peer_plan = plan_peers(args, runs)
    n_runs = sum(repeats[pr] * (1 + sum(1 for _, q, _ in runs if q == pr)) for pr in repeats)
    n_runs += repeats.get("fp32", 0) * len(peer_plan)
    shape = model_shape(m, dataset.vocab_size)
    print(
        f"model: {', '.join(f'{k} {v}' for k, v in shape.items())}: {n_params / 1e6:.2f}M params "
        f"({fpt / 1e6:.1f} MFLOP/token); {tokens_per_step:,} tokens/step; Ray: {where}",
        flush=True,
    )
    print(cpu_flags_line(machine), flush=True)
    if "bf16" in repeats and not fast_bf16:
        print("this CPU has no avx512_bf16: bf16 matmuls run on slow fallback kernels", flush=True)
    est = estimate_s(runs, repeats, tokens_per_step * fpt, peaks, fast_bf16)
    print(f"{n_runs} runs, expected to take about {est / 60:.0f} min", flush=True)

    bench = Runs(args.arch, dataset_dir, args.tiny, storage, n_runs, args.shape)
    fns = {}
    for stage, precision, steps in runs:
        name, fn = bench.lmforge(stage, precision, steps)
        fns[name] = (precision, fn)
    for precision in precisions:
        steps = next(st for _, q, st in runs if q == precision)
        name, fn = bench.plain(precision, steps)
        fns[name] = (precision, fn)
    for peer, stage in peer_plan:
        steps = next(st for _, q, st in runs if q == "fp32")
        if peer == "local":
            name, fn = bench.lmforge(stage, "fp32", steps, local=True)
        else:
            name, fn = bench.peer(peer, stage, steps)
        fns[name] = ("fp32", fn)
    try:
        # Each precision's repeats alternate (A B .. B A ..); fewer bf16 repeats where slow.
        tps: dict[str, list[float]] = {}
        for i in range(max(repeats.values())):
            live = {n: fn for n, (pr, fn) in fns.items() if i < repeats[pr]}
            order = list(live) if i % 2 == 0 else list(reversed(live))
            for name, values in alternate({n: live[n] for n in order}, 1).items():
                tps.setdefault(name, []).extend(values)
    finally:
        shutil.rmtree(storage, ignore_errors=True)

    figures, mfu = [], {}
    for name, values in tps.items():
        precision = fns[name][0]
        mfu[name] = [v * fpt / peaks[precision] * 100 for v in values]
    for stage, precision, _ in runs:
        name, plain = f"lmforge ZeRO {stage} {precision}", f"plain {precision}"
        n = len(tps[name])
        target = THROUGHPUT_TARGETS.get((stage, precision))
        waits = [d["data_wait_fraction"] for d in bench.details[name]]
        baseline = "plain PyTorch loop" + (" (autocast bf16)" if precision == "bf16" else "")
        fig = Figure.ratio_of(
            f"ZeRO {stage} {precision}", "tokens/s", tps[name], tps[plain][:n], baseline=baseline,
            target=target,
            note=f"data wait {statistics.median(waits):.1%} of step time",
        )  # fmt: skip
        for peer, peer_stage in peer_plan:
            if peer_stage == stage and precision == "fp32":
                label, full = peer_labels(peer, stage)
                if full in bench.failed:
                    fig.note += f"; {full} failed: {bench.failed[full]}"
                    continue
                theirs = tps[full]
                fig.add_peer(label, tps[name][: len(theirs)], theirs, PEER_TARGETS[peer])
        figures.append(fig)
    for stage, precision, _ in runs:
        name, plain = f"lmforge ZeRO {stage} {precision}", f"plain {precision}"
        # The MFU target is gpt2's; for the others MFU is shown, not targeted.
        target = (
            precision == "fp32"
            and stage in TARGET_STAGES
            and section(args.arch, args.shape) == "train"
        )
        figures.append(mfu_figure(
            f"MFU ZeRO {stage} {precision}", mfu[name], mfu[plain], peaks[precision], target
        ))  # fmt: skip
    for stage, precision, _ in runs:
        fp32 = f"lmforge ZeRO {stage} fp32"
        if precision != "bf16" or fp32 not in tps:
            continue
        bf16 = tps[f"lmforge ZeRO {stage} bf16"]
        note = cpu_flags_line(machine) if fast_bf16 else (
            "this CPU has no avx512_bf16: bf16 matmuls use slow fallback kernels; "
            f"{len(bf16)} run of {runs_steps(runs, stage, 'bf16')} steps"
        )  # fmt: skip
        figures.append(Figure.ratio_of(
            f"bf16 vs fp32, ZeRO {stage}", "tokens/s", bf16, tps[fp32][: len(bf16)],
            baseline="lmforge fp32", target=BF16_TARGET if fast_bf16 else SLOW_BF16_TARGET,
            note=note,
        ))  # fmt: skip

    report(
        section(args.arch, args.shape),
        figures,
        config={
            "model": shape,
            "n_params": n_params,
            "flops_per_token": fpt,
            "tokens_per_step": tokens_per_step,
            "workers": 2,
            "threads": THREADS,
            "runs": [{"stage": s, "precision": pr, "steps": st} for s, pr, st in runs],
            "warmup_steps": WARMUP_STEPS,
            "repeats": repeats,
            "peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
            "lmforge_reported_mfu": {
                n: statistics.median(d["steady_mfu"] for d in v)
                for n, v in bench.details.items()
                if n.startswith("lmforge")
            },
            "dataset": str(dataset_dir),
            "cpu_flags": machine.get("cpu_flags", []),
            "peers": {
                n: v
                for n, v in bench.details.items()
                if n.startswith(tuple(peer_labels(p, s)[0] for p, s in peer_plan))
            },
            "seconds": round(time.perf_counter() - started),
            "machine": machine,
        },
    )


def peer_labels(peer: str, stage: int) -> tuple[str, str]:
    """A peer's column label and its run's name at `stage`."""
    if peer == "local":
        return LOCAL_LABEL, f"{LOCAL_LABEL} ZeRO {stage}"
    return peer_runs.PEERS[peer][0], peer_runs.label(peer, stage)


def model_shape(m, vocab_size: int) -> dict:
    """The model's settings as the report shows them: arch, sizes, and the arch's own
    settings that differ from its defaults."""
    from lmforge import models

    keep = ("n_layer", "d_model", "n_head", "context_length")
    shape = {"arch": m.arch} | {k: getattr(m, k) for k in keep if k not in m.unused}
    own = {k: getattr(m, k) for k in models.own_keys(m.arch)}
    shape |= {k: v for k, v in own.items() if v != type(m).model_fields[k].default}
    return shape | {"vocab_size": vocab_size}


def runs_steps(runs, stage: int, precision: str) -> int:
    return next(st for s, p, st in runs if s == stage and p == precision)


if __name__ == "__main__":
    main()
