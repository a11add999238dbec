"""The MLflow tags a sweep writes (imported by the trial, the driver and the readers)."""

SWEEP_TAG = "lmforge.sweep"  # on the parent and every child MLflow run: the sweep's name
TRIAL_TAG = "lmforge.sweep.trial"  # on a child run: its Tune trial id
VALUES_TAG = "lmforge.sweep.values"  # on a child run: its sampled values (JSON)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: nests the child under the parent
ROLE_TAG = "lmforge.sweep.role"  # "parent" on the sweep's own run
DIR_TAG = "lmforge.sweep.dir"  # the parent: where Tune's state is (<run storage>/sweeps/<name>)
STATE_TAG = "lmforge.sweep.state"  # a child: TERMINATED, STOPPED (early, by the scheduler), ERROR
STOPPED_TAG = "lmforge.sweep.stopped_early"  # a child: "true" / "false"
LAST_STEP_TAG = "lmforge.sweep.last_step"  # a child: the last step it reported
ALIAS_PREFIX = "sweep-"  # the best version's alias: sweep-<name>
