"""ROUGE for lm-evaluation-harness tasks: `rouge1`, `rouge2`, `rougeL` (rouge-score's
F-measure of each answer against its reference, with Porter stemming as its authors
report it; the mean over the examples). The harness ships BLEU, chrF and TER (sacrebleu)
but no ROUGE metric of its own (its tasks that report one define it in a `utils.py`), so a
task file names these as it names `bleu`:

    metric_list:
      - metric: rougeL

Registered once, on import of `lmforge.evaluation` (before any task is built).
"""

from __future__ import annotations

import lm_eval.api.metrics  # noqa: F401 - the harness's metrics and aggregations, registered
from lm_eval.api.registry import metric_registry, register_metric

ROUGE = ("rouge1", "rouge2", "rougeL")


def _scorer(kind: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=True)


def _rouge(kind: str):
    def score(references, predictions, **kwargs) -> float:
        ref = references[0]
        ref = ref[0] if isinstance(ref, list) else ref  # the first of several references
        return _scorer(kind).score(str(ref), str(predictions[0]))[kind].fmeasure

    score.__name__ = kind
    return score


def register() -> None:
    for kind in ROUGE:
        if kind not in metric_registry:
            register_metric(
                metric=kind, higher_is_better=True, output_type="generate_until",
                aggregation="mean",
            )(_rouge(kind))  # fmt: skip


register()
