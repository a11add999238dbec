"""The preference losses on per-sequence log-probabilities, as TRL defines them.

    loss, metrics = preference_loss("sigmoid", beta, gamma, logps, ref_logps, n_tokens)

`logps`, `ref_logps`, `n_tokens`: (P, 2) tensors, column 0 the chosen answer, 1 the rejected
(summed log-probs of the answer tokens, and how many there are). Per pair:

- `sigmoid` (DPO, Rafailov et al. 2023): -log sigmoid(beta * (r_c - r_r)), r = logp - ref
  (TRL `DPOTrainer`, loss_type "sigmoid");
- `ipo` (Azar et al. 2023): ((r_c / n_c - r_r / n_r) - 1 / (2 beta))^2, the log-ratios
  averaged per answer token as TRL's DPOTrainer does (loss_type "ipo");
- `simpo` (Meng et al. 2024): -log sigmoid(beta * (logp_c / n_c - logp_r / n_r) - gamma),
  no reference (TRL's CPOTrainer, loss_type "simpo", simpo_gamma = gamma).

The loss is the mean over the pairs. The metrics are TRL's: `rewards/chosen`, `/rejected`
(beta times the log-ratio; SimPO: beta times the mean answer log-prob), `/accuracies`
(chosen reward above rejected), `/margins`, and `logps/chosen`, `logps/rejected`, each a
mean over the pairs (`metric_sums` gives sums, to average over workers by pair count).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "simpo")
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def preference_loss(
    kind: str,
    beta: float,
    gamma: float,
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    n_tokens: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss over the pairs, {metric: mean over the pairs}); see the module doc."""
    per_pair, rewards = pair_losses(kind, beta, gamma, logps, ref_logps, n_tokens)
    sums = metric_sums(rewards, logps)
    n = max(len(per_pair), 1)
    return per_pair.mean(), {k: v / n for k, v in sums.items()}


def pair_losses(
    kind: str,
    beta: float,
    gamma: float,
    logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    n_tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of each pair (P,), rewards (P, 2), detached)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown preference loss {kind!r} (one of {LOSSES})")
    n = n_tokens.to(logps.dtype).clamp(min=1.0)
    if kind == "simpo":
        avg = logps / n
        logits = avg[:, 0] - avg[:, 1] - gamma / beta
        return -F.logsigmoid(beta * logits), beta * avg.detach()
    if ref_logps is None:
        raise ValueError(f"the {kind} loss needs the reference's log-probs")
    ratios = logps - ref_logps
    if kind == "sigmoid":
        per_pair = -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1]))
    else:  # ipo
        avg = ratios / n
        per_pair = (avg[:, 0] - avg[:, 1] - 1 / (2 * beta)) ** 2
    return per_pair, beta * ratios.detach()


def metric_sums(rewards: torch.Tensor, logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each metric summed over the pairs (0-d tensors, on the device)."""
    logps = logps.detach()
    return {
        "rewards/chosen": rewards[:, 0].sum(),
        "rewards/rejected": rewards[:, 1].sum(),
        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).to(rewards.dtype).sum(),
        "rewards/margins": (rewards[:, 0] - rewards[:, 1]).sum(),
        "logps/chosen": logps[:, 0].sum(),
        "logps/rejected": logps[:, 1].sum(),
    }
