"""The trainer's objective seam: what a micro-batch's loss is, and what evaluation reports.

    objective = build(cfg)                    # train.objective: lm (default) | dpo
    stream = objective.train_stream(trainer)  # the batches train_step draws
    objective.start(trainer)                  # before the first step (and on resume)
    loss, extra = objective.loss(trainer, batch)   # extra: {metric: 0-d tensor}, logged
    metrics = objective.evaluate(trainer)     # val_loss + the objective's own, one collective

`LanguageModeling` is the next-token loss the trainer always had (byte for byte: the golden
losses of tests/trainer hold). Other objectives live in their own packages and are found
here by name, lazily (`lmforge.preference.objective.Preference` for dpo); they get the
`Trainer` (its engine, dataset, config, dist info) and import nothing of lmforge.training.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from lmforge import dist
from lmforge.config import Config
from lmforge.data import mixture
from lmforge.data.stream import TokenStream

Trainer = Any  # lmforge.training.loop.Trainer (not imported: the loop imports this module)


class Objective(Protocol):
    name: str

    def train_stream(self, trainer: Trainer) -> Any: ...

    def start(self, trainer: Trainer) -> None: ...

    def loss(
        self, trainer: Trainer, batch: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def evaluate(self, trainer: Trainer) -> dict[str, float]: ...


def build(cfg: Config) -> Objective:
    """The objective `train.objective` names."""
    if cfg.train.objective == "dpo":
        from lmforge.preference.objective import Preference

        return Preference(cfg)
    return LanguageModeling()


class LanguageModeling:
    """Next-token cross-entropy on the data's targets (text, SFT, a mixture)."""

    name = "lm"

    def train_stream(self, trainer: Trainer):
        cfg, info, t = trainer.cfg, trainer.info, trainer.cfg.train
        return mixture.train_stream(
            trainer.dataset, cfg.model.context_length, t.micro_batch_size, info.rank, info.world,
            t.seed, cfg.data.document_mask, windows_per_step=t.micro_batch_size * t.grad_accum_steps,
            say=trainer.say,
        )  # fmt: skip

    def start(self, trainer: Trainer) -> None:
        pass

    def loss(self, trainer: Trainer, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return trainer.forward_loss(batch), {}

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> dict[str, float]:
        """The val loss (one collective); a mixture's per source too (`val_loss/<name>`),
        and its `val_loss` the sources' weighted by the mixture's (final) weights."""
        t, m, info = trainer.cfg.train, trainer.cfg.model, trainer.info
        sets = mixture.val_sets(trainer.dataset)
        totals = torch.zeros(len(sets), device=info.device)
        trainer.engine.eval()
        for i, (_, ds) in enumerate(sets):
            val = TokenStream(
                ds, "val", m.context_length, t.micro_batch_size, info.rank,
                info.world, seed=t.seed, shuffle=False,
                document_mask=trainer.cfg.data.document_mask,
            )  # fmt: skip
            batches = val.batches()
            for _ in range(t.eval_steps):
                totals[i] += trainer.forward_loss(next(batches)).float()
        trainer.engine.train()
        losses = dist.all_reduce_mean_(totals / t.eval_steps, info).tolist()
        out: dict[str, float] = {}
        for (name, _), loss in zip(sets, losses, strict=True):
            if name is not None:
                out[f"val_loss/{name}"] = loss
                out[f"val_perplexity/{name}"] = math.exp(min(loss, 50.0))
        weights = mixture.val_weights(trainer.dataset)
        val_loss = sum(w * loss for w, loss in zip(weights, losses, strict=True))
        trainer.evals.append({"step": trainer.step, "val_loss": val_loss})
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)), **out}
