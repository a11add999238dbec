"""A generated fine-tuning task shared by the unit and integration tests of SFT (issue 15):
copy the prompt's last item. The unit test trains on token ids directly (`copy_task`), the
integration test on the same draws as words in JSONL rows (`copy_rows`), through prepare."""

from __future__ import annotations

import numpy as np

from lmforge.data import sft

# 34 short words, each a single BPE token once the tokenizer has seen the rows.
WORDS = ["red", "blue", "green", "gold", "pink", "grey", "cyan", "teal", "lime", "navy", "plum",
         "rose", "sand", "mint", "jade", "ruby", "oak", "elm", "ash", "fir", "yew", "bay", "fig",
         "kiwi", "pear", "date", "sky", "sea", "sun", "moon", "star", "rain", "snow", "wind"]  # fmt: skip


def copy_draws(n: int, seed: int, low: int, high: int) -> list[np.ndarray]:
    """n prompts of 3-8 items drawn from [low, high); the answer is each prompt's last item."""
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, int(rng.integers(3, 9))) for _ in range(n)]


def copy_task(n: int, seed: int, vocab: int = 40) -> list[sft.Example]:
    """Prompt: 3-8 random tokens (>= 4), then 1; answer: the prompt's last token, then 0."""
    out = []
    for p in copy_draws(n, seed, 4, vocab):
        ids = np.concatenate([p, [1, p[-1], 0]]).astype(np.int64)
        out.append(sft.Example(ids, np.arange(len(ids)) >= len(ids) - 2))
    return out


def copy_rows(n: int, seed: int) -> list[dict[str, str]]:
    """{"prompt": "w1 w2 ... wk =", "completion": " wk"} rows over `WORDS`."""
    rows = []
    for p in copy_draws(n, seed, 0, len(WORDS)):
        words = [WORDS[i] for i in p]
        rows.append({"prompt": " ".join(words) + " =", "completion": " " + words[-1]})
    return rows
