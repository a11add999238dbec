"""Per-sequence log-probabilities of a packed batch.

A `PairBatch` (`lmforge.preference.stream`) packs whole sequences into windows; `seq[b, t]`
names the sequence whose answer token position t of row b predicts (2i: pair i's chosen
answer, 2i + 1: its rejected one; -1 where nothing is predicted). The model keeps
attention and positions inside a sequence (`segments`), so each sum equals the one of
that sequence run alone.
"""

from __future__ import annotations

import torch


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, seq: torch.Tensor, n_seqs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each sequence's answer tokens (n_seqs,), their count (n_seqs,)).

    `logits` (B, T, V); `labels` (B, T), -100 where no target; `seq` (B, T) as above. The
    log-softmax is taken in fp32 over the target positions only (not all B*T*V)."""
    flat_seq = seq.reshape(-1)
    where = torch.nonzero(flat_seq >= 0).squeeze(1)
    picked = logits.reshape(-1, logits.shape[-1]).index_select(0, where).float()
    targets = labels.reshape(-1).index_select(0, where)
    token_logps = torch.log_softmax(picked, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    ids = flat_seq.index_select(0, where)
    sums = torch.zeros(n_seqs, dtype=torch.float32, device=logits.device)
    sums = sums.index_add(0, ids, token_logps)
    counts = torch.zeros(n_seqs, dtype=torch.float32, device=logits.device)
    counts = counts.index_add(0, ids, torch.ones_like(token_logps))
    return sums, counts
