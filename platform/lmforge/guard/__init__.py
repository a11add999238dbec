"""Guardrails against a diverging run (`train.guard`): watch, roll back, skip, or stop.

    guard = Guard(cfg.train.guard, run_dir, info, tracker, say)
    event = guard.observe(synced_steps)        # the loop's synced numbers: a trigger or None
    guard.act(event, trainer)                  # roll the trainer back (or raise GuardStop)
    guard.on_resume(trainer, state)            # a resume skips what a rollback skipped

The guard sees the steps' losses and grad norms where the loop syncs them anyway (its log
steps: the loss is all-reduced there, the grad norm is global already), so every rank sees
the same numbers and comes to the same decision without a collective of its own. See
`lmforge.guard.watch`.
"""

from lmforge.guard.watch import Event, Guard, GuardStop, Rewindable, raise_if_stopped

__all__ = ["Event", "Guard", "GuardStop", "Rewindable", "raise_if_stopped"]
