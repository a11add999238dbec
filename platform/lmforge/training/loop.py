"""What each worker runs: a DeepSpeed engine over its own share of the data.

`run_worker(plan, session)` is the worker's whole life: the `WorkerPlan` (built by the
launcher from its `LaunchPlan`) carries the resolved config; the `Session` is the
orchestrator (`training/session.py`): Ray Train in the product (`RaySession`), plain
processes in tests and `lmforge train --local` (`LocalSession`). The session has already
set up the process group (gloo on CPU, NCCL on GPU). Nothing here imports Ray.

What a step does besides training (a progress line, an evaluation, a checkpoint, a report
to Ray) is decided in one place, `due`. The loss and grad norm stay on the device until a
step is due for something: then every step since the last such one is synced and
all-reduced at once (one collective), and logged to MLflow step by step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lmforge import checkpoint as ckpt_io
from lmforge import dist, faults, guard, models, storage
from lmforge.config import Config, TrainConfig
from lmforge.data import mixture
from lmforge.perf import peak_flops
from lmforge.training import checkpoint_writer, cpu_collectives, engine_state, objective, speed
from lmforge.training.ds_config import deepspeed_config, lr_factor
from lmforge.training.session import ResumePoint, Session, WorkerPlan

if TYPE_CHECKING:
    from lmforge.tracking.tracker import TrackingSettings

WARMUP_STEPS = 3  # left out of the steady-state throughput at the end of a run


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices (linear weights, embeddings); none on biases and LayerNorms."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a LoRA run's frozen base stays out of the optimizer
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_engine(model: torch.nn.Module, cfg: Config, world: int, load_universal: bool = False):
    """`model` in a DeepSpeed engine as training runs it: our parameter groups, config and LR
    schedule, and ZeRO's gathers as broadcasts on gloo (`cpu_collectives`). The trainer's,
    and the tests' and benchmarks' that stand for it. Call after `dist.setup`."""
    import deepspeed

    cpu_collectives.install()
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg, world, load_universal=load_universal),
        # DeepSpeed steps it at each optimizer step and keeps its state in checkpoints.
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, functools.partial(lr_factor, cfg=cfg)
        ),
    )
    return engine


def _grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """The global 2-norm of the gradients before clipping, as DeepSpeed reports it for ZeRO
    1-3 (a device tensor: no host sync)."""
    norms = [torch.linalg.vector_norm(p.grad) for p in module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms))


def step_seed(seed: int, rank: int, step: int) -> int:
    """The RNG seed of one worker's optimizer step (distinct per rank and step)."""
    digest = hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # manual_seed takes < 2**63


def make_tracker(tracking: TrackingSettings | None, is_main: bool, n_params: int):
    """Rank 0 talks to MLflow; every other rank (and a run with tracking off) gets a
    tracker that does nothing, so the loop never asks which rank it is to log."""
    import dataclasses

    from lmforge.tracking.tracker import NullTracker, Tracker

    if not (tracking and is_main):
        return NullTracker()
    params = {**tracking.params, "model.n_params": str(n_params)}
    return Tracker(dataclasses.replace(tracking, params=params))


@dataclass(frozen=True)
class Due:
    """What one optimizer step is due for, besides training."""

    line: bool  # a progress line in the job log
    eval: bool  # an evaluation on the val split
    checkpoint: bool  # a checkpoint (with its report to the session)
    report: bool  # a report to the session without a checkpoint
    last: bool  # the run's last step: the throughput line too

    @property
    def anything(self) -> bool:
        return self.line or self.eval or self.checkpoint or self.report


def due(step: int, first_step: int, t: TrainConfig) -> Due:
    """The one schedule: `step` just finished; `first_step` is where this (re)start began.

    Every checkpoint carries a val loss (the registry's `best` is chosen by it), so a
    checkpoint step is an eval step. The session's report is a barrier across workers, so it
    goes out every `log_every` steps and with each evaluation, not every step.
    """
    last = step == t.max_steps
    checkpoint = step % t.checkpoint_every == 0 or last
    evaluate = step % t.eval_every == 0 or checkpoint
    return Due(
        line=step % t.log_every == 0 or step == first_step + 1 or last,
        eval=evaluate,
        checkpoint=checkpoint,
        report=not checkpoint and (step % t.log_every == 0 or evaluate),
        last=last,
    )


@dataclass
class _Pending:
    """One step's numbers, the loss and grad norm still on the device (no host sync)."""

    step: int
    loss: torch.Tensor  # this worker's mean over the micro-steps
    grad_norm: Any  # what DeepSpeed returns: a tensor, a float or None
    lr: float
    step_time_s: float
    data_wait_s: float
    data: dict[str, float]  # the stream's own numbers (a mixture's tokens per source)
    extra: dict[str, torch.Tensor]  # the objective's own numbers (on the device, mean)


class Trainer:
    """The state of one worker's training run; small methods, one per phase."""

    def __init__(
        self,
        cfg: Config,
        session: Session,
        run_dir: str,
        init_from: str | None = None,
        tracking: TrackingSettings | None = None,
        resume: ResumePoint | None = None,
    ) -> None:
        self.cfg, self.session, self.run_dir = cfg, session, run_dir
        self.info = info = session.info
        import deepspeed  # noqa: F401  after dist.setup chose the accelerator

        # DeepSpeed calls torch.distributed APIs that torch has deprecated; not ours to fix.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

        if not cfg.scaling.use_gpu:
            torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        torch.manual_seed(cfg.train.seed)  # identical init on every rank
        self.dataset = mixture.open_data(cfg.data)  # data.path's, or data.sources' mixture
        model = models.build(cfg.model)
        if cfg.train.lora is not None and not init_from and resume:
            init_from = ckpt_io.read_base(resume.local).path  # the base the adapters are on
        if init_from:  # fine-tuning: start from a checkpoint's weights, fresh optimizer
            init = storage.resolve(init_from)  # a run in S3: fetched from there
            ckpt_io.load_weights(model, storage.local_file(init / ckpt_io.WEIGHTS).parent)
            dist.print0(info, f"initialised the weights from {init_from}")
        self.init_from = init_from  # the weights it started from (a preference reference)
        self.lora, self.base = cfg.train.lora is not None, None
        if self.lora:  # the base (--init-from; on resume, the run's copy of it) frozen
            self.base = self._add_adapters(model, init_from, resume)
        if cfg.train.activation_checkpointing:  # before ZeRO 3 hooks the modules
            speed.checkpoint_blocks(model)
        arch = models.of(model)
        self.n_params = arch.n_params(cfg.model)
        self.flops_per_token = arch.flops_per_token(cfg.model)
        self.engine = build_engine(
            model, cfg, info.world, load_universal=bool(resume and resume.resharded(info.world))
        )
        if cfg.train.compile:
            speed.compile_engine(self.engine)
        t = cfg.train
        # The loss of a micro-batch and what evaluation reports (train.objective).
        self.objective = objective.build(cfg)
        self.stream = self.objective.train_stream(self)
        self.tokens_per_step = (
            t.micro_batch_size * t.grad_accum_steps * info.world * cfg.model.context_length
        )
        self.step, self.tokens_seen = 0, 0
        self.evals: list[dict[str, float]] = []  # (step, val_loss) history, kept in checkpoints
        self.pending: list[_Pending] = []  # steps not yet synced to the host
        # ZeRO 0 in fp32 steps a plain torch optimizer: DeepSpeed clips, but keeps no norm.
        self.own_grad_norm = cfg.zero.stage == 0 and t.precision == "fp32"
        self.peak = peak_flops(info.device, t.precision)  # str(self.peak) says which
        self.tracker = make_tracker(tracking, info.is_main, self.n_params)
        # Told about every checkpoint (stage, then persisted): MLflow's registration.
        self.subscribers: list[checkpoint_writer.CheckpointSubscriber] = [self.tracker]
        # Watches the synced steps (train.guard): rolls the trainer back (`rewind`) or stops.
        self.guard = guard.Guard(t.guard, run_dir, info, self.tracker, self.say)
        self.logged: dict[str, int] = {}  # each metric's last step sent to MLflow
        self.batches = None  # the stream's batches, from where it stands (`fit`, `rewind`)
        self.startup: dict[str, float] = {}  # wall-clock marks, set by train_loop

    def _add_adapters(self, model, init_from: str, resume: ResumePoint | None):
        """Freeze `model` (the base's weights), add LoRA adapters; the base's `BaseRef` on
        rank 0 (what its checkpoints record), else None."""
        from lmforge import lora

        lora.add_adapters(model, lora.settings_of(self.cfg.train.lora))
        trainable, total = lora.parameter_counts(model)
        dist.print0(
            self.info,
            f"LoRA r={self.cfg.train.lora.r}: training {trainable:,} of {total:,} parameters "
            f"({trainable / total:.2%}); the base stays frozen",
        )
        if not self.info.is_main:
            return None
        if resume is not None:
            return ckpt_io.read_base(resume.local)
        init = storage.resolve(init_from)
        source = init / "SOURCE"  # what --init-from named (training.plan.stage_init)
        uri = source.read_text().strip() if source.is_file() else init_from
        local = storage.local_file(init / ckpt_io.WEIGHTS).parent
        return ckpt_io.BaseRef(uri, init_from, ckpt_io.weights_sha256(local))

    # -- resume -----------------------------------------------------------------------
    def restore(self, resume: ResumePoint) -> None:
        d, state = resume.local, resume.state
        # The launcher checked the model, tokenizer and ZeRO stage before Ray started.
        if resume.resharded(self.info.world):
            engine_state.check_engine_state(d)  # converted by full unpickling: checked first
            self._load_resharded(d)
        else:  # each file through the restricted unpickler, once, memory-mapped
            engine_state.load_engine_state(
                self.engine, d / ckpt_io.ENGINE_DIR, ckpt_io.ENGINE_TAG,
                load_module_strict=not self.lora,  # a LoRA state holds no frozen base
            )  # fmt: skip
        self.step, self.tokens_seen = state.step, state.tokens_seen
        self.evals = list(state.evals)
        self.stream.resume(state.data)  # re-dealt when saved on another number of workers
        self.guard.on_resume(self, state.step, state.guard)  # skips what a rollback skipped
        # Rank 0 may have died before this checkpoint's registration finished.
        self.tracker.register_restored(resume.persisted, state, d)
        dist.print0(self.info, f"resumed from step {self.step} ({self.tokens_seen:,} tokens seen)")
        if state.world_size != self.info.world:
            dist.print0(
                self.info,
                f"re-sharded: the checkpoint was saved by {state.world_size} worker(s), this "
                f"run has {self.info.world}; the optimizer state is re-partitioned and the "
                f"unread rest of the epoch dealt to the {self.info.world} worker(s)",
            )

    def _load_resharded(self, d: Path) -> None:
        """Load a per-rank engine state saved by another number of workers, through
        DeepSpeed's universal checkpoint of it (rank 0 makes it once, in the run dir); the
        engine was built with `checkpoint.load_universal` for it (`deepspeed_config`)."""
        remote = storage.is_s3(self.run_dir)
        if remote:  # a run in S3: each rank converts its own local copy (no shared dir)
            out = Path(tempfile.mkdtemp(prefix="lmforge-resharded-")) / d.name
        else:
            out = Path(self.run_dir) / "resharded" / d.name
        if self.info.is_main or remote:
            engine_state.to_universal(d, out)
        dist.barrier(self.info)
        engine_state.check_engine_files(
            out / engine_state.UNIVERSAL_TAG
        )  # unpickled too: same check
        self.engine.load_checkpoint(
            str(out), tag=engine_state.UNIVERSAL_TAG, load_module_strict=not self.lora
        )

    # -- one optimizer step -----------------------------------------------------------
    def train_step(self, batches) -> None:
        """One optimizer step; its numbers wait in `pending` (no host sync, no collective)."""
        t0 = time.perf_counter()
        # Dropout's randomness is a function of (seed, rank, step), not of the history of
        # the process: a run resumed at any step draws the masks an uninterrupted run does.
        torch.manual_seed(step_seed(self.cfg.train.seed, self.info.rank, self.step))
        lr = self.engine.get_lr()[0]  # the rate this step uses; the scheduler moves on after it
        accum = self.cfg.train.grad_accum_steps
        total, wait, grad_norm = torch.zeros((), device=self.info.device), 0.0, None
        extra: dict[str, torch.Tensor] = {}
        for _ in range(accum):
            t_data = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t_data
            loss, more = self.objective.loss(self, batch)
            for k, v in more.items():
                extra[k] = extra.get(k, 0) + v.detach().float()
            loss = faults.corrupt_loss(loss, self.step + 1, self.info.rank)
            self.engine.backward(loss)  # at the boundary: gradients all-reduced, not clipped
            if self.own_grad_norm and self.engine.is_gradient_accumulation_boundary():
                grad_norm = _grad_norm(self.engine.module)
            self.engine.step()
            total += loss.detach().float()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.pending.append(
            _Pending(
                self.step,
                total / accum,
                grad_norm,
                lr,
                time.perf_counter() - t0,
                wait,
                self.stream.step_metrics(),
                {k: v / accum for k, v in extra.items()},
            )  # fmt: skip
        )

    def sync(self) -> list[dict[str, float]]:
        """Every pending step's numbers, averaged over the workers in one collective, and
        logged to MLflow (rank 0). Collective: every rank calls it at the same steps."""
        pending, self.pending = self.pending, []
        if not pending:
            return []
        names = list(pending[0].extra)
        if names:  # the objective's numbers ride in the same collective as the loss
            rows = [torch.stack([p.loss, *(p.extra[k] for k in names)]) for p in pending]
            table = dist.all_reduce_mean_(torch.stack(rows), self.info).tolist()
            losses, extras = (
                [r[0] for r in table],
                [dict(zip(names, r[1:], strict=True)) for r in table],
            )
        else:
            losses = dist.all_reduce_mean_(torch.stack([p.loss for p in pending]), self.info)
            losses, extras = losses.tolist(), [{} for _ in pending]
        out = []
        for p, loss, more in zip(pending, losses, extras, strict=True):
            tokens_per_s = self.tokens_per_step / p.step_time_s
            m = {
                "step": p.step,
                "loss": loss,
                "lr": p.lr,
                "grad_norm": float(p.grad_norm) if p.grad_norm is not None else float("nan"),
                "tokens_per_s": tokens_per_s,
                "mfu": self.mfu(tokens_per_s),
                "step_time_s": p.step_time_s,
                "data_wait_s": p.data_wait_s,  # this worker's time waiting for its next batch
                "workers": self.info.world,  # elastic runs: how many trained this step
                **p.data,
                **more,
            }
            self.log(p.step, m)  # queued; never blocks on MLflow
            out.append(m)
        return out

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """To MLflow, each metric once a step: the steps a rollback trains again are not
        sent twice."""
        fresh = {k: v for k, v in metrics.items() if step > self.logged.get(k, -1)}
        self.logged.update(dict.fromkeys(fresh, step))
        if fresh:
            self.tracker.log_metrics(step, fresh)

    def say(self, line: str) -> None:
        dist.print0(self.info, line)

    # -- the guard's port (`guard.Rewindable`) ----------------------------------------
    def data_positions(self) -> list[dict[str, Any]]:
        return dist.all_gather_object(self.stream.state_dict(), self.info)

    def rewind(
        self, checkpoint: Path | None, positions: list[dict[str, Any]] | None, lr_scale: float
    ) -> None:
        if checkpoint is not None:
            state = ckpt_io.read_state(checkpoint)
            if state.world_size != self.info.world:  # saved before an elastic resize
                engine_state.check_engine_state(checkpoint)
                with engine_state.loading_universal(self.engine):
                    self._load_resharded(checkpoint)
            else:
                engine_state.load_engine_state(
                    self.engine, checkpoint / ckpt_io.ENGINE_DIR, ckpt_io.ENGINE_TAG,
                    load_module_strict=not self.lora,
                )  # fmt: skip
            self.step, self.tokens_seen = state.step, state.tokens_seen
            self.evals, self.pending = list(state.evals), []
            positions = state.data if positions is None else positions
        if positions is not None:
            self.stream.resume(positions)
        if lr_scale != 1:
            scheduler = self.engine.lr_scheduler
            scheduler.base_lrs = [lr * lr_scale for lr in scheduler.base_lrs]
            for group in self.engine.optimizer.param_groups:
                group["lr"] *= lr_scale
        self.batches = self.stream.batches()

    def forward_loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The loss of one micro-batch from the stream: `(x, y)`, or `(x, y, segments)` for
        SFT data and `data.document_mask` (y is -100 where no loss is taken; attention and
        positions stay inside a segment)."""
        dev = self.info.device
        if len(batch) == 2:
            return self.engine(batch[0].to(dev), batch[1].to(dev))[1]
        x, y, segments = batch
        return self.engine(x.to(dev), y.to(dev), segments=segments.to(dev))[1]

    def mfu(self, tokens_per_s: float) -> float:
        return tokens_per_s / self.info.world * self.flops_per_token / self.peak.flops

    def evaluate(self) -> dict[str, float]:
        """The objective's evaluation on the val split (a collective): `val_loss` and its
        own metrics; the val loss joins `evals` (kept in checkpoints)."""
        return self.objective.evaluate(self)

    # -- checkpoint -------------------------------------------------------------------
    def save(self, metrics: dict[str, float]) -> None:
        """Write a checkpoint (`checkpoint_writer.write`), hand it to the session with
        `metrics`, then tell the subscribers it is persisted (rank 0's tracker registers it).

        Subscribers hear of it only once every rank's `report` returned, i.e. the whole
        checkpoint is in the run dir (the tracker checks it is complete there,
        `checkpoint.incomplete`). A rank that dies persisting never gets that far; neither
        does rank 0.
        """
        with tempfile.TemporaryDirectory(prefix="lmforge-ckpt-") as tmp:
            out = Path(tmp) / ckpt_io.dir_name(self.step)
            content = checkpoint_writer.Content(
                self.cfg, self.dataset, self.step, self.tokens_seen, self.stream.state_dict(),
                metrics, self.evals, self.base, self.guard.state(),
            )  # fmt: skip
            state = checkpoint_writer.write(out, self.engine, self.info, content)
            staged = [s.stage(out, self.step) for s in self.subscribers]
            self.session.report(metrics, out)
            dist.barrier(self.info)  # every rank's files are in the run dir now
            persisted = ckpt_io.in_run(self.run_dir, out.name)
            dist.print0(self.info, f"checkpoint step {self.step} -> {persisted}")
            for subscriber, token in zip(self.subscribers, staged, strict=True):
                subscriber.register(token, persisted, state)

    # -- the loop ---------------------------------------------------------------------
    def fit(self) -> None:
        t, p = self.cfg.train, self.info
        dist.print0(
            p,
            f"training {self.n_params / 1e6:.2f}M params on {p.world} worker(s), ZeRO "
            f"{self.cfg.zero.stage}, {t.precision}, {self.tokens_per_step:,} tokens/step, "
            f"steps {self.step + 1}..{t.max_steps}; MFU against {self.peak}",
        )
        if self.step >= t.max_steps:
            dist.print0(p, f"nothing to do: already at step {self.step} of {t.max_steps}")
            return
        self.objective.start(self)  # e.g. the reference's log-probs, before any step
        if self.step == 0:
            metrics = {"step": 0, **self.evaluate()}
            dist.print0(p, _eval_line(metrics))
            self.log(0, metrics)
            self.session.report(metrics)
        self.batches = self.stream.batches()
        started, first_step = time.perf_counter(), self.step
        steps: list[dict[str, float]] = []  # of this (re)start, for the steady throughput
        while self.step < t.max_steps:
            self.train_step(self.batches)
            s = self.step
            faults.maybe_kill("step", s, p.rank)
            d = due(s, first_step, t)
            if not d.anything:
                continue
            synced = self.sync()
            if (event := self.guard.observe(synced)) is not None:
                self.guard.act(event, self)  # rolled back (or GuardStop raised)
                first_step = min(first_step, self.step)
                continue
            steps += synced
            metrics = dict(synced[-1])  # this step's
            if s == first_step + 1:
                dist.print0(p, _startup_line(self.startup, time.time()))
            if d.line:
                eta = (time.perf_counter() - started) / (s - first_step) * (t.max_steps - s)
                dist.print0(p, _step_line(metrics, t.max_steps, eta))
            if d.last:
                metrics.update(self.throughput(steps))
                dist.print0(p, _throughput_line(metrics))
            if d.eval:
                evaluation = self.evaluate()
                metrics.update(evaluation)
                dist.print0(p, _eval_line(metrics))
                self.log(s, evaluation)
            if d.checkpoint:
                self.save(metrics)
            elif d.report:
                self.session.report(metrics)

    def throughput(self, steps: list[dict[str, float]]) -> dict[str, float]:
        """Steady-state figures of this (re)start: the median step after a short warm-up
        (the first steps include kernel warm-up and allocator growth)."""
        warm = steps[WARMUP_STEPS:] or steps
        tokens_per_s = self.tokens_per_step / statistics.median(m["step_time_s"] for m in warm)
        return {
            "steady_tokens_per_s": tokens_per_s,
            "steady_mfu": self.mfu(tokens_per_s),
            "data_wait_fraction": sum(m["data_wait_s"] for m in warm)
            / sum(m["step_time_s"] for m in warm),
        }


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
        f"startup | workers up {began - launched:.2f} s after the launcher | worker "
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
    line = f"eval step {m['step']:>6} | val_loss {m['val_loss']:.4f}"
    if "val_perplexity" in m:
        line += f" | val_ppl {m['val_perplexity']:.2f}"
    if "val_rewards/accuracies" in m:  # a preference objective's
        line += f" | val_rewards/accuracies {m['val_rewards/accuracies']:.3f}"
    return line


RANK_NODES_TAG = "lmforge.rank_nodes"


def record_placement(session: Session, tracker) -> list[dict[str, str]]:
    """Which node each rank runs on (a collective): rank 0 prints a line per rank to the job
    log and tags the MLflow run with `rank_nodes_tag`."""
    info = session.info
    ranks = dist.all_gather_object(session.node(), info)
    for rank, r in enumerate(ranks):
        dist.print0(info, f"rank {rank} on node {r['node_id'][:12]} ({r['address']})")
    tracker.set_tags({RANK_NODES_TAG: rank_nodes_tag(ranks)})
    return ranks


def rank_nodes_tag(ranks: list[dict[str, str]], limit: int = 5000) -> str:
    """JSON list, index = rank: [address, node id]; ids cut to 12 characters if the full
    ones would not fit an MLflow tag."""
    for n in (None, 12):
        text = json.dumps([[r["address"], r["node_id"][:n]] for r in ranks], separators=(",", ":"))
        if len(text) <= limit:
            return text
    return json.dumps(f"{len(ranks)} ranks on {len({r['node_id'] for r in ranks})} nodes")


def run_worker(plan: WorkerPlan, session: Session) -> None:
    """One worker's run, under any session: build the trainer (resumed when the session
    has a checkpoint), train, and end the MLflow run with its status on every path."""
    began = time.time()
    storage.configure(plan.config.storage)  # s3:// data or run dir (credentials: the env)
    trainer, status = None, "FAILED"
    try:
        with session.restore_point() as resume:
            trainer = Trainer(
                plan.config, session, plan.run_dir, plan.init_from, plan.tracking, resume
            )
            trainer.startup = {
                "launched": plan.launched_at,
                "worker_began": began,
                "engine_ready": time.time(),
            }
            if resume is not None:
                trainer.restore(resume)
        record_placement(session, trainer.tracker)
        try:
            trainer.fit()
            status = "FINISHED"
        except guard.GuardStop:  # said and recorded; the launcher raises it (not Ray: no retry)
            pass
    finally:
        if trainer is not None:
            trainer.tracker.close(status)
