"""The launch plan: a config resolved once, before Ray starts, into all a run needs.

    plan = build_plan(cfg, resume=False, init_from=None)   # every check; no side effect
    plan.run_dir, plan.dataset, plan.resume_from, plan.init, plan.config

Everything a user can get wrong is found here and named in one line (`LmforgeError`):
the run to start or resume, the dataset (opened once: manifest, tokenizer hash, every
shard's footer, enough tokens for the workers and the context), the checkpoint a resumed
run continues from (Ray's record of the run; the model, ZeRO stage and tokenizer must fit
it), the weights a fine-tune starts from (their tokenizer must be the dataset's; the model
shape comes from them). The plan is immutable; the launcher, the tracking setup and the
workers read it and never recompute any of it.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from lmforge import checkpoint as ckpt_io
from lmforge import storage
from lmforge.config import Config, ConfigError
from lmforge.data.dataset import Dataset
from lmforge.data.mixture import Mixture, datasets_of, open_data
from lmforge.tokenizer import TOKENIZER_EXTRAS
from lmforge.training import speed

log = logging.getLogger(__name__)

INIT_DIR = "init_from"  # under the run dir: the weights a fine-tune starts from


@dataclass(frozen=True)
class InitSource:
    """`--init-from`: the source as given, and its checkpoint dir on this machine."""

    uri: str
    checkpoint: Path


@dataclass(frozen=True)
class LaunchPlan:
    config: Config  # run name and storage, data path, vocab, model shape and MLflow URI settled
    dataset: Dataset | Mixture  # data.path's, or data.sources' (one stream of several)
    run_dir: Path | storage.S3Path
    resume_from: Path | storage.S3Path | None = None  # the checkpoint a resumed run continues from
    resume_state: ckpt_io.TrainerState | None = None
    init: InitSource | None = None
    tags: dict[str, str] | None = None  # MLflow tags known before Ray starts (None: no tracking)

    @property
    def init_dir(self) -> Path | None:
        """Where `stage_init` puts the init weights, which every worker reads."""
        return self.run_dir / INIT_DIR if self.init else None


def build_plan(cfg: Config, resume: bool | str = False, init_from: str | None = None) -> LaunchPlan:
    """Check everything that can be checked before Ray starts; the plan, or one line why not."""
    from lmforge.tracking import run_setup

    if resume and init_from:
        raise ConfigError("--resume and --init-from exclude each other")
    storage.configure(cfg.storage)  # s3:// paths: endpoint, region, addressing
    run_dir = find_run_dir(cfg, resume_target(resume, cfg.tracking.tracking_uri))
    dataset = open_data(cfg.data)  # a mixture: every source, checked together
    dataset.check_shards()  # footers only: a truncated or foreign shard is named before Ray
    speed.check(cfg)  # activation checkpointing / compile on this architecture
    check_lora(cfg, resume, init_from)
    check_objective(cfg, resume, init_from, dataset, cfg.model)
    init = init_source(init_from, cfg.tracking.tracking_uri) if init_from else None
    model = cfg.model
    if init is not None and ckpt_io.is_adapter(init.checkpoint):
        raise ConfigError(
            f"--init-from {init.uri}: a LoRA adapter, not a whole model; start from its base "
            "or from its merged export (export-hf --merge, then import-hf)"
        )
    if init is not None:
        dataset.require_tokenizer(init.checkpoint / ckpt_io.TOKENIZER, f"--init-from {init.uri}")
        model = init_model(cfg, init)
    check_fits_dataset(cfg.model_copy(update={"model": model}), dataset)
    check_objective(cfg, resume, init_from, dataset, model)
    cfg = cfg.model_copy(
        update={
            # A set vocab_size (a padded embedding, an imported model's) stays; else the data's.
            "model": model.model_copy(
                update={"vocab_size": model.vocab_size or dataset.vocab_size}
            ),
            # Absolute: every worker reads what the driver checked, whatever its LMFORGE_HOME.
            "data": absolute_data(cfg, dataset),
            "run": cfg.run.model_copy(
                update={"name": run_dir.name, "storage_path": str(run_dir.parent)}
            ),
        }
    )
    check_lora_targets(cfg)  # the base's architecture is known now (--init-from)
    resume_from = state = None
    if resume:
        resume_from = ckpt_io.latest_in_run(run_dir)
        if resume_from is None:
            raise ConfigError(f"--resume: {run_dir} has no recorded checkpoint")
        state = ckpt_io.read_state(resume_from)
        check_resume(cfg, resume_from, state, dataset)
    cfg = run_setup.pin_uri(cfg)
    tags = run_setup.source_tags(dataset, run_dir, init_from) if cfg.tracking.enabled else None
    return LaunchPlan(cfg, dataset, run_dir, resume_from, state, init, tags)


LORA_ZERO_STAGES = (0, 1, 2, 3)  # ZeRO stages a LoRA run (frozen base) trains and resumes under


def check_lora(cfg: Config, resume: bool | str, init_from: str | None) -> None:
    """train.lora trains adapters on a base: one to start from, and a ZeRO stage that works."""
    if cfg.train.lora is None:
        return
    if not (init_from or resume):
        raise ConfigError(
            "train.lora: LoRA adapts a base model; name it with --init-from (a version URI, "
            "a checkpoint or run dir, or an `lmforge import-hf` folder)"
        )
    if cfg.zero.stage not in LORA_ZERO_STAGES:
        raise ConfigError(
            f"train.lora: zero.stage={cfg.zero.stage} does not train a frozen base; use "
            f"zero.stage in {list(LORA_ZERO_STAGES)}"
        )


def check_objective(cfg: Config, resume: bool | str, init_from: str | None, data, model) -> None:
    """train.objective dpo: a preference dataset and a reference to start from (--init-from;
    its tokenizer is checked against the data's with every --init-from)."""
    if cfg.train.objective != "dpo":
        return
    if not (init_from or resume):
        raise ConfigError(
            "train.objective=dpo: preference tuning starts from a model and compares with it "
            "(the reference); name it with --init-from (a version URI or a checkpoint)"
        )
    fmt = getattr(data, "data_format", "a mixture")
    if fmt != "preference":
        raise ConfigError(
            f"train.objective=dpo: data.path is {fmt} data, not preference pairs; prepare "
            "them with lmforge prepare --format preference"
        )
    if data.manifest["seq_tokens"] > model.context_length:
        raise ConfigError(
            f"train.objective=dpo: {data.path} holds answers of up to "
            f"{data.manifest['seq_tokens']} tokens with their prompt, more than "
            f"model.context_length={model.context_length}; prepare with --seq-tokens "
            f"{model.context_length}"
        )


def check_lora_targets(cfg: Config) -> None:
    """train.lora's target modules exist in the model (lstm has none to adapt by default):
    checked on a meta-device copy of the model (no memory, no weights) before Ray starts,
    with the words the worker would otherwise fail with."""
    if cfg.train.lora is None:
        return
    import torch

    from lmforge import lora, models

    with torch.device("meta"):
        model = models.build(cfg.model)
    lora.targets(model, lora.settings_of(cfg.train.lora))


def resume_target(resume: bool | str, tracking_uri: str | None) -> bool | str:
    """`--resume models:/NAME/VERSION` -> the run dir of the run that registered it."""
    from lmforge.tracking import registry

    if not (isinstance(resume, str) and registry.is_model_uri(resume)):
        return resume
    version = registry.get_version(resume, tracking_uri)
    run_dir = version.tags.get("run_dir")
    if not run_dir:
        raise ConfigError(f"--resume {resume}: the version has no run_dir tag to resume from")
    log.info("resuming %s: the run that made it, %s", resume, run_dir)
    return run_dir


def storage_dir(cfg: Config) -> Path | storage.S3Path:
    """The run storage: a local dir, or an `S3Path` for s3://bucket/prefix."""
    return storage.resolve(cfg.run.storage_path)


def find_run_dir(cfg: Config, resume: bool | str) -> Path | storage.S3Path:
    """The run dir to start (a new name when unset) or to resume (a run name or run dir,
    `run.name`, else the newest run in storage); refuses to start over a run with
    checkpoints or to resume one without."""
    root, name = storage_dir(cfg), cfg.run.name
    if isinstance(resume, str):  # a run name or a run dir
        p = storage.resolve(resume) if storage.is_s3(resume) else Path(resume).expanduser()
        if p.is_dir() and ckpt_io.has_checkpoints(p):
            root, name = p.resolve().parent, p.resolve().name
        else:
            name = resume
    elif resume and name is None:
        runs = sorted(
            (d for d in root.glob("*") if ckpt_io.has_checkpoints(d)),
            key=lambda d: ckpt_io.record_file(d).stat().st_mtime,
        )
        if not runs:
            raise ConfigError(f"--resume: no run with a checkpoint under {root}")
        name = runs[-1].name
    run_dir = root / (name or time.strftime("run-%Y%m%d-%H%M%S"))
    has_ckpt = ckpt_io.has_checkpoints(run_dir)
    if resume and not has_ckpt:
        raise ConfigError(f"--resume: {run_dir} has no checkpoint to resume from")
    if not resume and has_ckpt:
        raise ConfigError(
            f"run.name={run_dir.name}: {run_dir} already has checkpoints; pass --resume to "
            "continue it, or choose another run.name"
        )
    return run_dir


def absolute_data(cfg: Config, dataset: Dataset | Mixture):
    """The data section with the dirs the driver opened, absolute."""
    if not isinstance(dataset, Mixture):
        return cfg.data.model_copy(update={"path": str(dataset.path.resolve())})
    sources = [
        s.model_copy(update={"path": str(src.dataset.path.resolve()), "name": src.name})
        for s, src in zip(cfg.data.sources, dataset.sources, strict=True)
    ]
    return cfg.data.model_copy(update={"sources": sources})


def check_fits_dataset(cfg: Config, data: Dataset | Mixture) -> None:
    """`check_fits_one` for the dataset, or for each source of a mixture."""
    for name, ds in datasets_of(data):
        try:
            check_fits_one(cfg, ds)
        except ConfigError as err:
            raise ConfigError(f"data.sources ({name}): {err}" if name else str(err)) from None


def check_fits_one(cfg: Config, ds: Dataset) -> None:
    """The model has a row of embedding for every token id of the dataset (a larger, padded
    vocab is fine: Qwen2 and GPT-NeoX round theirs up), a row group per worker, and a window
    of tokens per worker in train and in val."""
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < ds.vocab_size:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} but the dataset's tokenizer has "
            f"{ds.vocab_size} tokens (ids up to {ds.vocab_size - 1}); remove model.vocab_size "
            "or use a dataset prepared with the model's tokenizer"
        )
    # Elastic: it must feed the most workers the run may grow to.
    world, need = cfg.scaling.max_workers, cfg.model.context_length + 1
    train_units = ds.units("train")
    if len(train_units) < world:
        raise ConfigError(
            f"scaling.num_workers={list_or_int(cfg.scaling.num_workers)}: {ds.path} has only {len(train_units)} train row "
            "groups to share; prepare it with a smaller --rows-per-group or use fewer workers"
        )
    if sum(u.tokens for u in train_units) // world < need:
        raise ConfigError(f"model.context_length={need - 1}: too long for {ds.path}'s train split")
    if sum(u.tokens for u in ds.units("val")) < need:
        raise ConfigError(
            f"data.path={ds.path}: its val split has fewer than model.context_length+1={need} "
            "tokens; prepare it with a larger --val-fraction"
        )


def check_resume(
    cfg: Config, latest: Path, state: ckpt_io.TrainerState, dataset: Dataset | Mixture
) -> None:
    """A resumed run keeps the model, ZeRO stage, tokenizer and kind of data (one dataset or
    a mixture of the same sources) of its checkpoint; another number of workers is allowed
    (the state is re-sharded) and said."""
    old = ckpt_io.read_config(latest)
    saved = sorted(state.data[0].get("sources", {})) if state.data else []
    now = [name for name, _ in datasets_of(dataset) if name]
    if saved != sorted(now):
        raise ConfigError(
            f"{latest}: trained on {'the mixture of ' + ', '.join(saved) if saved else 'one dataset'}"
            f", the config reads {'the mixture of ' + ', '.join(now) if now else 'one dataset'}; "
            "resume with the data it was trained on"
        )
    if old.model != cfg.model:
        diff = [
            f"model.{k}={getattr(cfg.model, k)} (checkpoint: {getattr(old.model, k)})"
            for k in type(cfg.model).model_fields
            if getattr(cfg.model, k) != getattr(old.model, k)
        ]
        raise ConfigError(
            f"{latest}: the config's model does not fit the checkpoint: {', '.join(diff)}"
        )
    if cfg.train.lora != old.train.lora:
        raise ConfigError(
            f"{latest}: saved with train.lora={old.train.lora and old.train.lora.model_dump()}; "
            "resume with the same value"
        )
    if cfg.zero.stage != old.zero.stage:
        raise ConfigError(
            f"{latest}: saved with zero.stage={old.zero.stage}; resume with the same value"
        )
    tokenizer = storage.local_file(latest / ckpt_io.TOKENIZER, TOKENIZER_EXTRAS)  # S3: a copy
    dataset.require_tokenizer(tokenizer, f"checkpoint {latest}")
    if not cfg.scaling.elastic and cfg.scaling.num_workers != state.world_size:
        # (elastic: the worker count is known only when Ray Train starts them; the loop says)
        t = cfg.train
        log.warning(
            "resuming %s, saved by %d workers, on scaling.num_workers=%d: the optimizer state "
            "is re-partitioned, the rest of the epoch re-dealt, and a step is now %d "
            "sequences (was %d)",
            latest, state.world_size, cfg.scaling.num_workers,
            t.micro_batch_size * t.grad_accum_steps * cfg.scaling.num_workers,
            t.micro_batch_size * t.grad_accum_steps * state.world_size,
        )  # fmt: skip


def list_or_int(n: int | tuple[int, int]) -> int | list[int]:
    """num_workers as the config spells it: 2, or [1, 2]."""
    return list(n) if isinstance(n, tuple) else n


def init_source(init_from: str, tracking_uri: str | None) -> InitSource:
    """A registered version (fetched into the local cache) or a checkpoint / run dir."""
    from lmforge.tracking import registry

    if registry.is_model_uri(init_from):
        return InitSource(init_from, registry.fetch_checkpoint(init_from, tracking_uri))
    return InitSource(init_from, ckpt_io.resolve_checkpoint(init_from))


def init_model(cfg: Config, init: InitSource):
    """A fine-tune keeps the architecture of its weights: the model section comes from the
    checkpoint, but for the dropout of this run."""
    old = ckpt_io.read_config(init.checkpoint).model
    if old.model_dump(exclude={"dropout"}) != cfg.model.model_dump(exclude={"dropout"}):
        log.info("--init-from: the model shape comes from the checkpoint (%s)", old)
    return old.model_copy(update={"dropout": cfg.model.dropout})


def stage_init(plan: LaunchPlan) -> Path | None:
    """Copy the init weights' servable files under the run dir, where every worker reads
    them (the registry cache is this machine's only). The one side effect of a plan."""
    if plan.init is None:
        return None
    dst = plan.init_dir
    if storage.is_remote(dst):  # a run in S3: the workers fetch them from there
        dst.remove()
        for name in ckpt_io.servable_files(plan.init.checkpoint):
            storage.upload(plan.init.checkpoint / name, dst / name)
        (dst / "SOURCE").write_text(f"{plan.init.uri}\n")
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ckpt_io.servable_files(plan.init.checkpoint):
        shutil.copyfile(plan.init.checkpoint / name, dst / name)
    (dst / "SOURCE").write_text(f"{plan.init.uri}\n")
    ckpt_io.seal(dst)  # a complete checkpoint: what a LoRA run's checkpoints load as base
    return dst
