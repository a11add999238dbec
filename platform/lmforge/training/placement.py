"""Whether a run's workers can be placed on the cluster, checked before any of them starts.

Ray Train asks for one placement group with a bundle per worker, {CPU: cpus_per_worker} plus
{GPU: 1} on GPUs, and a bundle lives on one node. A group that cannot be placed is not refused
by Ray: Ray Train waits `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (60 s), logs a
WorkerGroupStartupTimeoutError with its traceback and tries again, with no end (Ray 2.60's
controller retries that error without limit). So a run that cannot fit is refused here, in one
line, unless an autoscaler may still add the nodes it needs: then it waits, and says so once.

How many bundles fit, from each alive node's total resources (what runs there now does not
count: it ends), by placement strategy: PACK and SPREAD place them anywhere (a node takes as
many as fit), STRICT_PACK all on one node, STRICT_SPREAD one a node. An elastic run needs its
minimum to fit; it grows when more nodes join.

An autoscaler is "configured" when Ray reports one that works from a cluster config
(`autoscaler_configured`); `LMFORGE_AUTOSCALER=1` (or 0) says so for a cluster where Ray does
not tell.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
from collections import Counter
from collections.abc import Callable

from lmforge import raycompat
from lmforge.config import Config, ConfigError

log = logging.getLogger(__name__)

# Ray Train's worker-group start timeout (ray/train/v2/_internal/constants.py), which Ray
# Train hands from this driver's environment to its controller.
START_TIMEOUT = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
AUTOSCALER_START_TIMEOUT_S = 900  # a new cloud node takes minutes: one retry per 15
OVERRIDE = "LMFORGE_AUTOSCALER"
EPS = 1e-6  # float noise (0.3 CPU / 0.1 = 2.9999...); Ray counts in steps of 1e-4


def worker_bundle(cfg: Config) -> dict[str, float]:
    """The resources of one worker's bundle (launch.scaling_config asks Ray Train for these)."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if s.use_gpu else {})}


def per_node(bundle: dict[str, float], node: dict[str, float]) -> int:
    """How many bundles fit in a node's resources."""
    need = [(k, v) for k, v in bundle.items() if v > 0]
    if not need:
        return 0
    return max(0, min(math.floor(node.get(k, 0) / v + EPS) for k, v in need))


def placeable(bundle: dict[str, float], nodes: list[dict[str, float]], strategy: str) -> int:
    """How many bundles the nodes take at once under a placement strategy."""
    counts = [per_node(bundle, n) for n in nodes]
    if strategy == "STRICT_PACK":
        return max(counts, default=0)
    if strategy == "STRICT_SPREAD":
        return sum(c > 0 for c in counts)
    return sum(counts)  # PACK, SPREAD: best effort, any node


def check_placement(
    cfg: Config, nodes: list[dict[str, float]], autoscaling: bool | Callable[[], bool]
) -> None:
    """Refuse a run whose workers (its minimum, elastic) cannot all be placed on `nodes` (each
    alive node's total resources); with an autoscaler (`autoscaling`, or a callable asked only
    when they do not fit) log one line and let Ray Train wait for the nodes instead."""
    s = cfg.scaling
    bundle = worker_bundle(cfg)
    fit = placeable(bundle, nodes, s.placement_strategy)
    if fit >= s.min_workers:
        return
    what = shortfall(cfg, nodes, bundle, fit)
    if autoscaling() if callable(autoscaling) else autoscaling:
        timeout = os.environ.setdefault(START_TIMEOUT, str(AUTOSCALER_START_TIMEOUT_S))
        log.warning(
            "%s: waiting for the cluster's autoscaler to add nodes (Ray Train retries every "
            "%s s, %s)",
            what,
            timeout,
            START_TIMEOUT,
        )
        return
    fixes = "add nodes (`lmforge cluster add-node` on a local cluster), lower " + (
        "the minimum of scaling.num_workers" if s.elastic else "scaling.num_workers"
    )
    fixes += " or scaling.cpus_per_worker" if not s.use_gpu else ""
    if s.placement_strategy.startswith("STRICT_"):
        fixes += f", or use {s.placement_strategy.removeprefix('STRICT_')}"
    raise ConfigError(f"{what}, and no autoscaler is configured to add nodes: {fixes}")


def shortfall(
    cfg: Config, nodes: list[dict[str, float]], bundle: dict[str, float], fit: int
) -> str:
    """What the run needs and what the cluster has, in one line."""
    s = cfg.scaling
    least = f"at least {s.min_workers}" if s.elastic else str(s.num_workers)
    each = resources(bundle)
    kinds = node_kinds(nodes, bundle)
    if s.placement_strategy == "STRICT_SPREAD":
        return (
            f"scaling.placement_strategy=STRICT_SPREAD puts each of the {least} workers on its "
            f"own node, but only {fit} of the cluster's {len(nodes)} nodes have {each} ({kinds})"
        )
    if s.placement_strategy == "STRICT_PACK":
        return (
            f"scaling.placement_strategy=STRICT_PACK puts all {least} workers ({each} each) on "
            f"one node, but none of the cluster's {len(nodes)} nodes ({kinds}) has room for "
            f"more than {fit}"
        )
    return (
        f"scaling.num_workers: {least} workers of {each} each (on one node each) do not fit "
        f"on the Ray cluster: its {len(nodes)} nodes ({kinds}) have room for {fit}"
    )


def resources(res: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in res.items())


def node_kinds(nodes: list[dict[str, float]], bundle: dict[str, float]) -> str:
    """The nodes by the resources a worker needs: "1 with CPU 0; 2 with CPU 1"."""
    kinds = Counter(resources({k: n.get(k, 0) for k in bundle}) for n in nodes)
    return "; ".join(f"{c} with {r}" for r, c in sorted(kinds.items())) or "none"


# -- is there an autoscaler? ---------------------------------------------------------------
# A node started by hand (`ray start`, `lmforge cluster up`) gets no node type: Ray shows it
# as "node_<its id>" (ray/autoscaler/_private/util.py format_readonly_node_type; the GCS's
# cluster status likewise). Nodes an autoscaler manages carry the type of the cluster config
# they come from: `ray up` starts its head with RAY_NODE_TYPE_NAME, autoscaler v2 every node,
# and autoscaler v1 (KubeRay's included) reports its nodes by type in its status.
UNTYPED = re.compile(r"node_[0-9a-f]*")


def autoscaler_configured() -> bool:
    """Whether the connected Ray cluster has an autoscaler working from a cluster config
    (`ray up`, KubeRay's autoscaler, a managed cluster), which may add the nodes a run waits
    for; False without a connection or when Ray does not tell. `LMFORGE_AUTOSCALER=1/0`
    overrides it."""
    if (forced := os.environ.get(OVERRIDE)) in ("0", "1"):
        return forced == "1"
    ray = sys.modules.get("ray")  # not imported: not connected
    if ray is None or not ray.is_initialized():
        return False
    probes = (_autoscalable_cluster_config, _node_types_from_gcs, _node_types_from_v1_report)
    for probe in probes:
        try:
            found = probe()
        except Exception as err:  # a probe Ray cannot answer says nothing
            log.debug("autoscaler probe %s: %s", probe.__name__, err)
            continue
        if found is True or (isinstance(found, set) and any_configured_type(found)):
            return True
    return False


def any_configured_type(node_types: set[str]) -> bool:
    return any(t and not UNTYPED.fullmatch(t) for t in node_types)


def _autoscalable_cluster_config() -> bool:
    """The cluster config an autoscaler reported to the GCS has a node group that can grow
    (the test of Ray Data's is_autoscaling_enabled, ray/data/_internal/cluster_autoscaler)."""
    return any(
        g.max_count == -1 or g.max_count > g.min_count
        for g in raycompat.autoscaler_node_groups()
        if g.resources and g.max_count != 0
    )


def _node_types_from_gcs() -> set[str]:
    return raycompat.gcs_node_types()


def _node_types_from_v1_report() -> set[str]:
    """Node types in autoscaler v1's last status report."""
    report = raycompat.v1_autoscaler_report()
    return (
        set(report.get("active_nodes") or {})
        | set(report.get("idle_nodes") or {})
        | set(report.get("pending_launches") or {})
    )
