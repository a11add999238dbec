"""Loss and perplexity of a model on a prepared dataset's val split (one process, no Ray).

    lmforge evaluate --model models:/tiny@best --data ~/.lmforge/datasets/shakespeare

The model's tokenizer must be the dataset's: a loss over different token ids means nothing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from lmforge.data.dataset import Dataset
from lmforge.data.stream import TokenStream
from lmforge.errors import LmforgeError


class EvaluationError(LmforgeError, ValueError):
    pass


@torch.no_grad()
def evaluate_checkpoint(
    checkpoint: Path, data: str | Path, batch_size: int = 8, max_batches: int | None = None
) -> dict[str, float]:
    """{"val_loss", "val_perplexity", "tokens", "seconds"} over the val split."""
    from lmforge.checkpoint import TOKENIZER, load_model
    from lmforge.paths import resolve

    ds = Dataset(resolve(data))
    ds.require_tokenizer(checkpoint / TOKENIZER, str(checkpoint))
    model, _, cfg = load_model(checkpoint)
    T = cfg.model.context_length
    if ds.tokens("val") < T + 1:
        raise EvaluationError(f"{ds.path}: its val split is shorter than one window ({T + 1})")
    stream = TokenStream(ds, "val", T, batch_size, rank=0, world=1, seed=0, shuffle=False)
    total, tokens, t0 = 0.0, 0, time.perf_counter()
    for i, (x, y) in enumerate(stream.one_pass()):
        if max_batches is not None and i >= max_batches:
            break
        _, loss = model(x, y)
        total += loss.item() * y.numel()
        tokens += y.numel()
    val_loss = total / tokens
    return {
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 50.0)),
        "tokens": tokens,
        "seconds": time.perf_counter() - t0,
    }
