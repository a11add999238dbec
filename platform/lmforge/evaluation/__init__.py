"""Evaluation tasks (lm-evaluation-harness), probes and `best` by what matters (issue 26).

    lmforge evaluate --model models:/tiny@best --tasks tasks/copy.yaml,tasks/copy_mc.yaml
    lmforge evaluate --model models:/gpt2/1 --model models:/tiny/3 --tasks tasks/copy.yaml

    from lmforge import evaluation
    sources = evaluation.check_tasks("tasks/copy.yaml")          # before any work starts
    result = evaluation.evaluate(ckpt, sources, limit=50)        # EvalResult: scores, raw
    evaluation.record.log_scores(version, result.scores, result.raw)

- `tasks`: task files in the harness's own YAML format, checked in one line each;
- `lm`: `LmforgeLM`, the harness's `LM` over our model, tokenizer and template;
- `harness`: the harness's evaluator over those, its results as `Score`s, the CLI's table;
- `probes`: fixed prompts answered by every checkpoint (greedy and n seeded samples);
- `record`: scores, results JSON, probes and warnings on the version and its run;
- `checkpoints`: the evaluation of every checkpoint a run persists, beside training.

The existing `lmforge evaluate --data` (loss, perplexity, SFT exact match) is
`lmforge.evaluate`; this package is the `--tasks` side.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.evaluation.tasks import TaskError, TaskSource, check_tasks, split_specs

__all__ = ["TaskError", "TaskSource", "check_tasks", "evaluate", "split_specs"]


def evaluate(
    checkpoint: Path,
    sources: list[TaskSource],
    limit: int | None = None,
    num_fewshot: int | None = None,
    template: str = "own",
    batch_size: int = 16,
):
    """The tasks' scores on a local checkpoint dir (an `harness.EvalResult`)."""
    from lmforge.evaluation.harness import run_tasks
    from lmforge.evaluation.lm import LmforgeLM

    lm = LmforgeLM.from_checkpoint(Path(checkpoint), template, batch_size)
    return run_tasks(lm, sources, limit, num_fewshot)
