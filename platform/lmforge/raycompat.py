"""Every use of Ray's private modules and file names, in one place.

Written against Ray 2.60 (`WRITTEN_FOR`): a Ray of another minor version may have moved
any of them, so `check_version` refuses it in one line instead of failing somewhere deep
inside a worker. Nothing else in lmforge imports `ray._private` or `ray.*._internal`, or
names a file Ray Train writes.
"""

from __future__ import annotations

import logging

from lmforge.errors import LmforgeError

WRITTEN_FOR = "2.60"  # major.minor of the Ray these internals were read from

# Ray Train's record of a run's checkpoints, in its run dir (its CheckpointManager's
# snapshot): Ray writes it once every rank's copy of a checkpoint finished.
TRAIN_RECORD = "checkpoint_manager_snapshot.json"


class RayVersionError(LmforgeError):
    """The installed Ray is not the one lmforge's use of its internals was written for."""


def check_version(version: str | None = None) -> None:
    """Refuse a Ray whose major.minor is not `WRITTEN_FOR` (`version`: Ray's, by default)."""
    if version is None:
        import ray

        version = ray.__version__
    if ".".join(version.split(".")[:2]) != WRITTEN_FOR:
        raise RayVersionError(
            f"ray=={version} is installed, but lmforge is written for Ray {WRITTEN_FOR}.x "
            f"(it uses Ray internals, lmforge/raycompat.py): install ray=={WRITTEN_FOR}.0 "
            "(constraints.txt)"
        )


def quiet_train_reports() -> None:
    """Drop Ray Train's INFO line per `report()`, which would drown our progress lines.

    Ray 2.60 names that logger by file path (`logging.getLogger(__file__)` in its
    execution/context.py), so RunConfig's LoggingConfig, which filters `ray.train.*`
    records, does not reach it.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def generate_auth_token() -> None:
    """Create Ray's token-auth token file (~/.ray/auth_token), as `ray start` would."""
    from ray._private.authentication.authentication_token_setup import generate_and_save_token

    generate_and_save_token()


def reload_client_config(cluster_switch: bool | None) -> None:
    """Make an already imported Ray re-read what it reads once, at import: its C++ config
    (RAY_AUTH_MODE: Ray itself refreshes it this way when it turns token auth on, in
    authentication_token_setup.py) and, when `cluster_switch` is given, the single-host
    switch (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER), which decides whether 127.0.0.1 is replaced
    by the host IP."""
    from ray._private import ray_constants
    from ray._raylet import Config

    Config.initialize("")
    if cluster_switch is not None:
        ray_constants.ENABLE_RAY_CLUSTER = cluster_switch


def autoscaler_node_groups() -> list:
    """The node groups of the cluster config an autoscaler reported to the GCS (empty:
    none reported); each has `resources`, `min_count`, `max_count` (-1: unbounded)."""
    from ray.core.generated.autoscaler_pb2 import ClusterConfig
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get("__autoscaler_cluster_config", namespace="__autoscaler")
    return list(ClusterConfig.FromString(raw).node_group_configs) if raw else []


def gcs_node_types() -> set[str]:
    """Node types of the nodes and pending launches in the GCS's cluster status."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    st = get_cluster_status(ray.get_runtime_context().gcs_address, timeout=5)
    nodes = [*st.active_nodes, *st.idle_nodes, *st.pending_nodes, *st.pending_launches]
    return {n.ray_node_type_name for n in nodes}


def v1_autoscaler_report() -> dict:
    """Autoscaler v1's last status report (the monitor on the head), {} when none."""
    import json

    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get("__autoscaling_status")  # ray_constants.DEBUG_AUTOSCALING_STATUS
    return (json.loads(raw) if raw else {}).get("autoscaler_report") or {}


def worker_output_dispatcher():
    """Ray's dispatcher of the worker output a driver prints (`ray_print_logs` is its
    handler, added by `ray.init`): `.handlers` [(name, fn)], guarded by `._lock`."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    return global_worker_stdstream_dispatcher


def pin_serve_version(deployment, version: str):
    """Give a Ray Serve deployment a fixed version, so that deploying it again unchanged
    keeps its replicas running. Ray Serve 2.60 gives a deployment deployed from Python a
    random version on every `serve.run` (ray/serve/_private/client.py:
    `deployment._version or get_random_string()`), which restarts every replica of the
    application on every deploy; its public `version` option was removed
    (`Deployment.options`). `Deployment.options` carries `_version` over."""
    deployment._version = version
    return deployment


def torch_trainer_class(outlived: bool = False):
    """Ray Train's `TorchTrainer`, less two helper actors a run of lmforge's does not need,
    each one more Python process importing Ray Train (and pandas, Ray Data: 2-2.5 s of CPU)
    while the controller starts the workers; on a 2-core machine they take CPU from the
    workers' start (bench_jobstart).

    - The `DatasetManager` of `DatasetsCallback`, where a run passes no Ray datasets
      (lmforge's never do: each worker reads its parquet shards itself). Without datasets
      the callback has nothing to do: the workers' `dataset_shard_provider` is optional and
      only read by `ray.train.get_dataset_shard`.
    - The `PlacementGroupCleaner` of `PlacementGroupCleanerCallback`, a detached actor that
      removes the worker group's placement group if the controller dies while its driver
      lives on. When `fit()` is its driver's whole job (`lmforge train`, jobs/train.py), a
      dead controller fails `fit()`, the driver exits, and Ray removes the job's placement
      groups with it. `outlived=True` keeps it: a driver that outlives the run (a sweep's
      trial runner, whose trials ASHA kills) would otherwise hold the group's CPUs.
    """
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            drop = () if self.datasets else (DatasetsCallback,)
            if not outlived:
                drop += (PlacementGroupCleanerCallback,)
            return [c for c in callbacks if not isinstance(c, drop)]

    return LeanTorchTrainer
