"""Preference tuning (DPO, IPO, SimPO) on `prepare --format preference` pairs.

    train.objective: dpo            # lmforge.training.objective picks `objective.DPO`
    train.dpo: {beta: 0.1, loss: sigmoid|ipo|simpo, gamma: 0.5}

`loss` holds the three losses and their TRL-named metrics, `logps` the per-sequence
log-probabilities of a packed batch, `stream` the pairs packed into windows (a pair never
split across micro-batches or workers), `reference` the reference model's log-probs
computed once before the first step and cached beside the dataset, and `objective` the
trainer's seam (`lmforge.training.objective.Objective`). Nothing here imports Ray or
lmforge.training: the trainer hands itself in.
"""
