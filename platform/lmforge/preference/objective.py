"""`train.objective: dpo`: the trainer's preference objective (`training.objective` seam).

The policy starts from --init-from; for `sigmoid` (DPO) and `ipo` that checkpoint is also the
reference, whose log-probs `reference.reference_table` computes once before the first step
(LoRA: the base with its adapters off, per batch, no table); `simpo` needs none. Each
micro-batch is a `PairBatch` of whole pairs; its loss is `loss.preference_loss` and its
TRL-named metrics are logged each step (evaluation: the same under `val_`).
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from lmforge import checkpoint as ckpt_io
from lmforge import dist, storage
from lmforge.config import Config
from lmforge.preference import reference
from lmforge.preference.logps import sequence_logps
from lmforge.preference.loss import METRICS, metric_sums, pair_losses
from lmforge.preference.stream import PairStream

NAMES = {"sigmoid": "dpo", "ipo": "ipo", "simpo": "simpo"}  # the `objective` tag
INIT_DIR = "init_from"  # the run dir's copy of the --init-from weights (training.plan)
RUN_FILE = "preference.json"  # in the run dir: objective, parent, reference (version tags)


class Preference:
    def __init__(self, cfg: Config) -> None:
        d = cfg.train.dpo
        self.kind, self.beta, self.gamma = d.loss, d.beta, d.gamma
        self.name = NAMES[self.kind]
        self.table: dict[str, torch.Tensor] | None = None  # the reference's, per split
        self.uses_reference = self.kind != "simpo"
        self.precompute_s: float | None = None

    def _stream(self, trainer, split: str) -> PairStream:
        t, info = trainer.cfg.train, trainer.info
        return PairStream(trainer.dataset, split, trainer.cfg.model.context_length,
                          t.micro_batch_size, info.rank, info.world, t.seed)  # fmt: skip

    def train_stream(self, trainer) -> PairStream:
        return self._stream(trainer, "train")

    # -- before the first step ----------------------------------------------------------
    def start(self, trainer) -> None:
        info = trainer.info
        init = storage.resolve(trainer.init_from) if trainer.init_from else None
        if init is None:  # resumed: the run's own copy of what --init-from named
            staged = storage.resolve(trainer.run_dir) / INIT_DIR
            init = staged if (staged / ckpt_io.WEIGHTS).is_file() else None
        weights = source = None
        if init is not None:
            local = storage.local_file(init / ckpt_io.WEIGHTS).parent
            weights = ckpt_io.weights_sha256(local) if info.is_main else None
            weights = dist.all_gather_object(weights, info)[0]
            src = init / "SOURCE"
            source = src.read_text().strip() if src.is_file() else str(init)
        if self.uses_reference and not trainer.lora:
            if weights is None:
                raise reference.ReferenceError(
                    f"train.objective dpo (loss {self.kind}): needs --init-from, the reference"
                )
            streams = {s: self._stream(trainer, s) for s in ("train", "val")}
            self.table, took = reference.reference_table(trainer, weights, streams)
            self.precompute_s = took  # reported with the first evaluation (0: reused)
        tags = {"objective": self.name}
        if source is not None:
            tags["parent"] = source
            if self.uses_reference:
                tags["reference"] = f"{source}@{weights[:12]}"
        trainer.tracker.set_tags(tags)
        if info.is_main:
            run = storage.resolve(trainer.run_dir) / RUN_FILE
            run.write_text(json.dumps({**tags, "reference_weights_sha256": weights}) + "\n")

    # -- a micro-batch ----------------------------------------------------------------
    def _pairs(self, trainer, b, split: str):
        """(loss per pair, rewards, policy log-probs), all (P, ...)."""
        logits = trainer.engine(b.x, segments=b.segments)[0]
        sums, counts = sequence_logps(logits, b.labels, b.seq, 2 * b.n_pairs)
        logps, n = sums.view(-1, 2), counts.view(-1, 2)
        ref = None
        if self.uses_reference:
            if self.table is not None:
                ref = self.table[split][b.pair_ids]
            else:  # LoRA: the base, adapters off, no graph
                with torch.no_grad(), reference.adapters_off(trainer.engine.module):
                    ref_logits = trainer.engine(b.x, segments=b.segments)[0]
                    ref = sequence_logps(ref_logits, b.labels, b.seq, 2 * b.n_pairs)[0].view(-1, 2)
        per_pair, rewards = pair_losses(self.kind, self.beta, self.gamma, logps, ref, n)
        return per_pair, rewards, logps, logits

    def loss(self, trainer, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        b = batch.to(trainer.info.device)
        per_pair, rewards, logps, _ = self._pairs(trainer, b, "train")
        sums = metric_sums(rewards, logps)
        return per_pair.mean(), {k: v / b.n_pairs for k, v in sums.items()}

    # -- evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer) -> dict[str, float]:
        """The loss and metrics over (up to eval_steps micro-batches of) each worker's share
        of the val pairs, averaged per pair over all workers."""
        info = trainer.info
        stream = self._stream(trainer, "val")
        totals = torch.zeros(len(METRICS) + 2, device=info.device)  # loss, pairs, metrics
        trainer.engine.eval()
        for batch in reference.lockstep(stream, info, info.device, trainer.cfg.train.eval_steps):
            b = batch.to(info.device)
            if b.n_pairs == 0:
                trainer.engine(b.x, segments=b.segments)  # in step with the others
                continue
            per_pair, rewards, logps, _ = self._pairs(trainer, b, "val")
            sums = metric_sums(rewards, logps)
            totals += torch.stack([per_pair.sum(), torch.tensor(float(b.n_pairs),
                                   device=info.device), *(sums[k] for k in METRICS)])  # fmt: skip
        trainer.engine.train()
        reference._sum_(totals, info)
        pairs = max(totals[1].item(), 1.0)
        out: dict[str, Any] = {"val_loss": totals[0].item() / pairs}
        for k, v in zip(METRICS, totals[2:].tolist(), strict=True):
            out[f"val_{k}"] = v / pairs
        out["val_pairs"] = totals[1].item()
        if self.precompute_s is not None:  # once: the reference pass before step 1
            out["reference_precompute_s"], self.precompute_s = self.precompute_s, None
        trainer.evals.append({"step": trainer.step, "val_loss": out["val_loss"]})
        if not math.isfinite(out["val_loss"]):
            dist.print0(info, "eval: the val loss is not finite")
        return out
