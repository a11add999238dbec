"""What each Ray Train worker runs: a DeepSpeed engine over its own share of the data.

`train_loop(loop_config)` is handed to `TorchTrainer`; `loop_config` carries the resolved
config as a plain dict (nothing is read from globals). Ray has already set up the process
group (gloo on CPU, NCCL on GPU) when this starts.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from lmforge import checkpoint as ckpt_io
from lmforge import dist, faults, models, paths
from lmforge.config import Config, config_from_dict
from lmforge.data.dataset import Dataset
from lmforge.data.stream import TokenStream
from lmforge.perf import peak_flops
from lmforge.training.ds_config import deepspeed_config, lr_factor

WARMUP_STEPS = 3  # left out of the steady-state throughput at the end of a run


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear weights, embeddings); none on biases and LayerNorms."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def consolidated_weights(engine, info: dist.DistInfo) -> dict[str, torch.Tensor]:
    """Full fp32 weights on rank 0 (empty elsewhere). Collective: every rank calls it.

    Under ZeRO 1-3 the fp32 master copy is the truth (in bf16 the module holds rounded
    weights); `safe_get_full_fp32_param` gathers it. Stage 0 has no partitioned master:
    the module's own weights are the full ones.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():  # tied weights are listed once
        full = safe_get_full_fp32_param(p)
        if info.is_main:
            out[name] = (p if full is None else full).detach().float().cpu().clone()
    return out


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one worker's optimizer step (distinct per rank and step)."""
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes < 2**63


def make_tracker(tracking: dict[str, Any] | None, is_main: bool, n_params: int):
    """Rank 0 talks to MLflow; every other rank (and a run with tracking off) gets a
    tracker that does nothing, so the loop never asks which rank it is to log."""
    from lmforge.tracking.tracker import NullTracker, Tracker, TrackingSettings

    if not (tracking and is_main):
        return NullTracker()
    settings = TrackingSettings(**tracking)
    settings.params["model.n_params"] = str(n_params)
    return Tracker(settings)


class Trainer:
    """The state of one worker's training run; small methods, one per phase."""

    def __init__(
        self,
        cfg: Config,
        run_dir: str,
        init_from: str | None = None,
        tracking: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.info = dist.setup(cfg.scaling.use_gpu)
        import deepspeed  # after dist.setup chose the accelerator

        # DeepSpeed calls torch.distributed APIs that torch has deprecated; not ours to fix.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

        if not cfg.scaling.use_gpu:
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        torch.manual_seed(cfg.train.seed)  # identical init on every rank
        self.dataset = Dataset(paths.resolve(cfg.data.path))
        model = models.build(cfg.model)
        if init_from:  # fine-tuning: start from a checkpoint's weights, fresh optimizer
            ckpt_io.load_weights(model, Path(init_from))
            dist.print0(self.info, f"initialised the weights from {init_from}")
        self.n_params = models.of(model).n_params(cfg.model)
        self.flops_per_token = models.of(model).flops_per_token(cfg.model)
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=param_groups(model, cfg.train.weight_decay),
            config=deepspeed_config(cfg, self.info.world),
            # DeepSpeed steps it at each optimizer step and keeps its state in checkpoints.
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, functools.partial(lr_factor, cfg=cfg)
            ),
        )
        t = cfg.train
        self.stream = TokenStream(
            self.dataset, "train", cfg.model.context_length, t.micro_batch_size,
            self.info.rank, self.info.world, seed=t.seed,
        )  # fmt: skip
        self.tokens_per_step = (
            t.micro_batch_size * t.grad_accum_steps * self.info.world * cfg.model.context_length
        )
        self.step, self.tokens_seen = 0, 0
        self.evals: list[dict[str, float]] = []  # (step, val_loss) history, kept in checkpoints
        self.peak = peak_flops(self.info.device, t.precision)  # str(self.peak) says which
        self.tracker = make_tracker(tracking, self.info.is_main, self.n_params)
        self.startup: dict[str, float] = {}  # wall-clock marks, set by train_loop

    # -- resume -----------------------------------------------------------------------
    def restore(self, checkpoint) -> None:
        with checkpoint.as_directory() as d:
            d = Path(d)
            if why := ckpt_io.incomplete(d):  # Ray records a checkpoint once all ranks copied it
                raise ckpt_io.CheckpointError(f"{d}: an incomplete checkpoint ({why})")
            state = ckpt_io.read_state(d)
            # The launcher checked the model, tokenizer and ZeRO stage before Ray started.
            ckpt_io.check_engine_state(d)  # DeepSpeed unpickles it: nothing but state, first
            saved_on = len(state["data"])
            if saved_on != self.info.world and ckpt_io.is_partitioned(d):
                self._load_resharded(d)
            else:
                self.engine.load_checkpoint(str(d / ckpt_io.ENGINE_DIR), tag=ckpt_io.ENGINE_TAG)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.evals = state.get("evals", [])
            self.stream.resume(state["data"])  # re-dealt when saved_on != world
            # Rank 0 may have died before this checkpoint's registration finished.
            self.tracker.register_restored(Path(checkpoint.path), state)
        dist.print0(self.info, f"resumed from step {self.step} ({self.tokens_seen:,} tokens seen)")
        if saved_on != self.info.world:
            dist.print0(
                self.info,
                f"re-sharded: the checkpoint was saved by {saved_on} worker(s), this run has "
                f"{self.info.world}; the optimizer state is re-partitioned and the unread "
                f"rest of the epoch dealt to the {self.info.world} worker(s)",
            )

    def _load_resharded(self, d: Path) -> None:
        """Load a per-rank engine state saved by another number of workers, through
        DeepSpeed's universal checkpoint of it (rank 0 makes it once, in the run dir)."""
        out = Path(self.run_dir) / "resharded" / d.name
        if self.info.is_main:
            ckpt_io.to_universal(d, out)
        dist.barrier(self.info)
        ckpt_io.check_engine_files(out / ckpt_io.UNIVERSAL_TAG)  # unpickled too: same check
        # DeepSpeed reads `checkpoint.load_universal` from its config when it loads.
        self.engine._config.load_universal_checkpoint = True
        try:
            self.engine.load_checkpoint(str(out), tag=ckpt_io.UNIVERSAL_TAG)
        finally:
            self.engine._config.load_universal_checkpoint = False

    # -- one optimizer step -----------------------------------------------------------
    def train_step(self, batches) -> dict[str, float]:
        t0 = time.perf_counter()
        # Dropout's randomness is a function of (seed, rank, step), not of the history of
        # the process: a run resumed at any step draws the masks an uninterrupted run does.
        torch.manual_seed(step_seed(self.cfg.train.seed, self.info.rank, self.step))
        lr = self.engine.get_lr()[0]  # the rate this step uses; the scheduler moves on after it
        total, wait = 0.0, 0.0
        for _ in range(self.cfg.train.grad_accum_steps):
            t_data = time.perf_counter()
            x, y = next(batches)
            wait += time.perf_counter() - t_data
            _, loss = self.engine(x.to(self.info.device), y.to(self.info.device))
            self.engine.backward(loss)
            self.engine.step()
            total += loss.item()
        loss = dist.all_reduce_mean(total / self.cfg.train.grad_accum_steps, self.info)
        dt = time.perf_counter() - t0
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        tokens_per_s = self.tokens_per_step / dt
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s / self.info.world * self.flops_per_token / self.peak.flops,
            "step_time_s": dt,
            "data_wait_s": wait,  # this worker's time waiting for its next batch
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        t, m = self.cfg.train, self.cfg.model
        val = TokenStream(
            self.dataset, "val", m.context_length, t.micro_batch_size,
            self.info.rank, self.info.world, seed=t.seed, shuffle=False,
        )  # fmt: skip
        self.engine.eval()
        batches, total = val.batches(), 0.0
        for _ in range(t.eval_steps):
            x, y = next(batches)
            _, loss = self.engine(x.to(self.info.device), y.to(self.info.device))
            total += loss.item()
        self.engine.train()
        val_loss = dist.all_reduce_mean(total / t.eval_steps, self.info)
        self.evals.append({"step": self.step, "val_loss": val_loss})
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}

    # -- checkpoint -------------------------------------------------------------------
    def save(self, metrics: dict[str, float]) -> None:
        """Write a checkpoint, hand it to Ray, then queue its registration (rank 0).

        Every checkpoint carries a val loss (evaluated now if this step had none), which
        the registry's `best` alias is chosen by. Registration starts only once every rank's
        `ray.train.report` returned, i.e. the whole checkpoint is persisted in the run dir,
        and checks that it is complete there (`checkpoint.incomplete`).
        """
        import ray.train

        if "val_loss" not in metrics:
            evaluation = self.evaluate()
            metrics.update(evaluation)
            dist.print0(self.info, _eval_line(metrics))
            self._log({"step": self.step, **evaluation})
        tmp = Path(tempfile.mkdtemp(prefix="lmforge-ckpt-"))
        try:
            self.engine.save_checkpoint(str(tmp / ckpt_io.ENGINE_DIR), tag=ckpt_io.ENGINE_TAG)
            faults.maybe_kill("checkpoint", self.step, self.info.rank)
            weights = consolidated_weights(self.engine, self.info)
            # Each rank's data position, and the engine files it adds to the checkpoint dir.
            ranks = dist.all_gather_object(
                (self.stream.state_dict(), ckpt_io.file_sizes(tmp)), self.info
            )
            state, staged = None, None  # written by rank 0 only
            if self.info.is_main:
                state = {
                    "step": self.step,
                    "tokens_seen": self.tokens_seen,
                    "world_size": self.info.world,
                    "data": [position for position, _ in ranks],
                    "dataset": {
                        "path": str(self.dataset.path),
                        "manifest_sha256": self.dataset.manifest_sha256,
                        "tokenizer_sha256": self.dataset.tokenizer_sha256,
                    },
                    "metrics": metrics,
                    "evals": self.evals,
                    "files": ckpt_io.FILES,
                }
                ckpt_io.save_servable(tmp, weights, self.cfg, self.dataset.tokenizer_path, state)
                ckpt_io.seal(tmp, [files for _, files in ranks[1:]])
                staged = self.tracker.stage(tmp, self.step)
            name = f"checkpoint_{self.step:08d}"
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)),
                checkpoint_dir_name=name,
            )  # fmt: skip
            # `report` returns once this rank's files are copied; after the barrier every
            # rank's are. A rank that dies copying never gets here: neither does rank 0.
            dist.barrier(self.info)
            dist.print0(self.info, f"checkpoint step {self.step} -> {self.run_dir}/{name}")
            self.tracker.register(staged, Path(self.run_dir) / name, state)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- the loop ---------------------------------------------------------------------
    def fit(self) -> None:
        import ray.train

        t = self.cfg.train
        p = self.info
        dist.print0(
            p,
            f"training {self.n_params / 1e6:.2f}M params on {p.world} worker(s), ZeRO "
            f"{self.cfg.zero.stage}, {t.precision}, {self.tokens_per_step:,} tokens/step, "
            f"steps {self.step + 1}..{t.max_steps}",
        )
        if self.step >= t.max_steps:
            dist.print0(p, f"nothing to do: already at step {self.step} of {t.max_steps}")
            return
        if self.step == 0:
            metrics = {"step": 0, **self.evaluate()}
            dist.print0(p, _eval_line(metrics))
            self._log(metrics)
            ray.train.report(metrics)
        batches = self.stream.batches()
        started, first_step = time.perf_counter(), self.step
        steps: list[dict[str, float]] = []
        while self.step < t.max_steps:
            metrics = {"step": self.step + 1, **self.train_step(batches)}
            self._log(metrics)
            steps.append(metrics)
            s = self.step
            faults.maybe_kill("step", s, p.rank)
            last = s == t.max_steps
            if s == first_step + 1:
                dist.print0(p, _startup_line(self.startup, time.time()))
            if s % t.log_every == 0 or s == first_step + 1 or last:
                eta = (time.perf_counter() - started) / (s - first_step) * (t.max_steps - s)
                dist.print0(p, _step_line(metrics, t.max_steps, eta))
            if last:
                metrics.update(self.throughput(steps))
                dist.print0(p, _throughput_line(metrics))
            if s % t.eval_every == 0 or last:
                evaluation = self.evaluate()
                metrics.update(evaluation)
                dist.print0(p, _eval_line(metrics))
                self._log({"step": s, **evaluation})
            if s % t.checkpoint_every == 0 or last:
                self.save(metrics)
            elif s % t.log_every == 0 or "val_loss" in metrics:
                ray.train.report(metrics)

    def throughput(self, steps: list[dict[str, float]]) -> dict[str, float]:
        """Steady-state figures of this (re)start: the median step after a short warm-up
        (the first steps include kernel warm-up and allocator growth)."""
        warm = steps[WARMUP_STEPS:] or steps
        step_time = statistics.median(m["step_time_s"] for m in warm)
        tokens_per_s = self.tokens_per_step / step_time
        return {
            "steady_tokens_per_s": tokens_per_s,
            "steady_mfu": tokens_per_s / self.info.world * self.flops_per_token / self.peak.flops,
            "data_wait_fraction": sum(m["data_wait_s"] for m in warm)
            / sum(m["step_time_s"] for m in warm),
        }

    def _log(self, metrics: dict[str, float]) -> None:
        """Every step's numbers to MLflow (rank 0; queued, never blocks on the server)."""
        self.tracker.log_metrics(int(metrics["step"]), metrics)


def _step_line(m: dict[str, float], max_steps: int, eta_s: float) -> str:
    return (
        f"step {m['step']:>6}/{max_steps} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | "
        f"grad {m['grad_norm']:.3f} | {m['tokens_per_s']:,.0f} tok/s | mfu {m['mfu']:.1%} | "
        f"{m['step_time_s'] * 1000:.0f} ms/step | eta {time.strftime('%H:%M:%S', time.gmtime(eta_s))}"
    )


def _startup_line(startup: dict[str, float], first_step_done: float) -> str:
    """Where the time to the first step went, with the worker's wall-clock start (for the
    job-start benchmark, which compares it with the submit time)."""
    began = startup.get("worker_began", first_step_done)
    launched = startup.get("launched", began)
    ready = startup.get("engine_ready", began)
    return (
        f"startup | Ray Train workers up {began - launched:.2f} s after the launcher | worker "
        f"began at unix {began:.3f} | engine ready +{ready - began:.2f} s (data, model, "
        f"DeepSpeed init) | first step done +{first_step_done - began:.2f} s"
    )


def _throughput_line(m: dict[str, float]) -> str:
    return (
        f"throughput {m['steady_tokens_per_s']:,.0f} tok/s (median step after {WARMUP_STEPS} "
        f"warm-up steps) | mfu {m['steady_mfu']:.1%} | data wait "
        f"{m['data_wait_fraction']:.2%} of step time"
    )


def _eval_line(m: dict[str, float]) -> str:
    return f"eval step {m['step']:>6} | val_loss {m['val_loss']:.4f} | val_ppl {m['val_perplexity']:.2f}"


def _quiet_ray_train_reports() -> None:
    """Drop Ray Train's INFO line per `report()`, which would drown our progress lines.

    Ray 2.60 names that logger by file path (`logging.getLogger(__file__)` in its
    execution/context.py), so RunConfig's LoggingConfig, which filters `ray.train.*`
    records, does not reach it.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker entry point."""
    import ray.train

    began = time.time()
    _quiet_ray_train_reports()
    cfg = config_from_dict(loop_config["config"])
    trainer = Trainer(
        cfg, loop_config["run_dir"], loop_config.get("init_from"), loop_config.get("tracking")
    )
    trainer.startup = {
        "launched": loop_config.get("launched_at", began),
        "worker_began": began,
        "engine_ready": time.time(),
    }
    status = "FAILED"
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            trainer.restore(checkpoint)
        trainer.fit()
        status = "FINISHED"
    finally:
        trainer.tracker.close(status)
