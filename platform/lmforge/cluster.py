"""A local Ray cluster (one node, or a head and worker nodes on loopback addresses), and how
every lmforge entry point connects to Ray.

    lmforge cluster up                # one node on 127.0.0.1, token auth on
    lmforge cluster up --nodes 3      # head on 127.0.0.2 (0 CPUs), workers on .3, .4 (1 CPU)
    lmforge cluster status            # the nodes: id, address, state, resources
    lmforge cluster down              # every node `up` started

Each node runs as `ray start --block` in its own session, so `down` stops exactly this
cluster (never `ray stop`, which kills every Ray process on the machine). Pids and addresses
are kept in `$LMFORGE_HOME/cluster.json` and `cluster-node-<i>.json` (`services.ManagedProcess`).

One node: Ray's single-host mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) keeps GCS, raylet and
workers on 127.0.0.1. Several nodes: that mode refuses a second `ray start --address`, and
without it Ray rewrites 127.0.0.1 to the host's own address, but not 127.0.0.2 and up; so each
node takes its own loopback address and Ray sees distinct node IPs, as on a real cluster.
Nodes start one at a time (two `ray start` at once fight over ports). The dashboard/Jobs API
is bound to 127.0.0.1 either way.

Every cluster has its own Ray temp dir: Ray keeps its "current cluster" file there, and a job
driver finds its cluster through it (`RAY_ADDRESS=auto` in the job supervisor), so two
clusters on one machine sharing /tmp/ray would send one's jobs to the other. Each worker node
has its own temp dir inside it (`node_temp_dir`), so that its log monitor forwards only its
own workers' output: every worker line reaches a job's log once.

Token auth stays on for every node (RAY_AUTH_MODE=token: `ray start` turns it on by itself
only on a head that finds a token file); clients send the token only with that variable in
their environment, so this module sets it for every client it starts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lmforge import paths, raycompat
from lmforge.errors import LmforgeError
from lmforge.services import ManagedProcess, ServiceRecord, free_port, http_ok

log = logging.getLogger(__name__)

# The environment of every process that talks to the local cluster (one node; a cluster of
# several nodes sets the single-host switch to 1, see `client_env`).
LOCAL_ENV = {"RAY_AUTH_MODE": "token", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
MAX_NODES = 32  # 127.0.0.2 .. 127.0.0.33
# Each extra node's object store (Ray's default, 30% of RAM per node, is far too much when
# every node shares one machine).
NODE_OBJECT_STORE_BYTES = 256 * 1024**2


class ClusterError(LmforgeError):
    pass


@dataclass(frozen=True)
class ClusterInfo(ServiceRecord):
    address: str  # GCS address, for ray.init
    dashboard_url: str  # Jobs API, for ray job submit / JobSubmissionClient
    temp_dir: str = ""  # this cluster's own Ray temp dir ("": Ray's shared /tmp/ray)
    nodes: int = 1  # nodes `up` started, the head included


@dataclass(frozen=True)
class NodeInfo(ServiceRecord):
    """A worker node `up` started: its own raylet on its own loopback address."""

    ip: str
    num_cpus: float


HEAD = ManagedProcess("cluster", "the Ray head", ClusterInfo)


def worker_node(i: int) -> ManagedProcess[NodeInfo]:
    """Worker node i (1, 2, ...) of the cluster `up` started."""
    return ManagedProcess(f"cluster-node-{i}", f"Ray worker node {i}", NodeInfo)


def node_ip(i: int, nodes: int) -> str:
    """Node i's address (0 is the head): 127.0.0.1 alone, else 127.0.0.2, .3, ..."""
    return "127.0.0.1" if nodes == 1 else f"127.0.0.{i + 2}"


def client_env(nodes: int) -> dict[str, str]:
    """RAY_* of every process of (or talking to) a local cluster of `nodes` nodes."""
    return {**LOCAL_ENV, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if nodes == 1 else "1"}


def temp_dir_for(port: int) -> str:
    """This cluster's Ray temp dir: short (Ray puts Unix sockets under it) and per GCS port."""
    return str(Path(tempfile.gettempdir()) / f"lmforge-ray-{os.getuid()}-{port}")


def node_temp_dir(temp_dir: str, i: int) -> str:
    """Worker node i's own Ray temp dir, inside the cluster's (the head's).

    Each node's log monitor forwards every worker log file under its node's session dir to
    the drivers. Nodes sharing one dir (Ray's default for a node joining a head on the same
    host) would each forward every worker's lines, once per node and each under its own node
    address, so Ray's log deduplication folds them into "[repeated Nx across cluster]", step
    lines included. With a dir of its own a node forwards its own workers' lines, once, under
    its address, as on a real cluster; its logs are `<temp_dir>/node-<i>/session_latest/logs`.
    """
    return str(Path(temp_dir) / f"node-{i}")


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))


def ensure_token() -> Path:
    """Create Ray's auth token if there is none yet (owner-only permissions)."""
    path = token_path()
    if not path.is_file() and "RAY_AUTH_TOKEN" not in os.environ:
        raycompat.generate_auth_token()
    if path.is_file():
        path.chmod(0o600)
    return path


def auth_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN") or token_path().read_text().strip()
    return {"Authorization": f"Bearer {token}"}


def running() -> ClusterInfo | None:
    """The cluster `up` started, if its head process is still alive."""
    return HEAD.running()


def _ray_bin() -> str:
    """The `ray` CLI of this environment (the one lmforge runs in)."""
    return shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"


def up(
    port: int = 6379,
    dashboard_port: int = 8265,
    num_cpus: float | None = None,
    timeout_s: float = 180,
    nodes: int = 1,
    node_cpus: float = 1,
) -> ClusterInfo:
    """Start the local cluster (or return the one already running): a head and `nodes - 1`
    worker nodes of `node_cpus` CPUs each; the head offers `num_cpus` (default: all CPUs
    alone, 0 beside worker nodes, so the training workers land on the worker nodes)."""
    if not 1 <= nodes <= MAX_NODES:
        raise ClusterError(f"--nodes {nodes}: must be 1 to {MAX_NODES}")
    if node_cpus <= 0:
        raise ClusterError(f"--node-cpus {node_cpus}: must be > 0")
    info = running()
    if info is not None:
        log.info("a local Ray cluster is already running (pid %d)", info.pid)
        return info
    _stop_workers()  # of an earlier cluster whose head died
    ensure_token()
    if num_cpus is None and nodes > 1:
        num_cpus = 0
    temp_dir = temp_dir_for(port)
    head_ip = node_ip(0, nodes)
    cmd = [
        _ray_bin(), "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={head_ip}", f"--port={port}", f"--temp-dir={temp_dir}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        # Ray's fixed default (52365) would clash with a second cluster on this machine,
        # whose job submissions then fail with "No available agent to submit job".
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",  # likewise for Ray Client's 10001
    ]  # fmt: skip
    if num_cpus is not None:
        cmd.append(f"--num-cpus={_cpus(num_cpus)}")
    if nodes > 1:
        cmd.append(f"--object-store-memory={NODE_OBJECT_STORE_BYTES}")
    env = _node_env(nodes)
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    info = HEAD.start(
        cmd,
        env=env,
        log_file=paths.home() / "cluster" / "ray-head.log",
        ready=lambda: http_ok(f"{dashboard_url}/api/version", headers=auth_headers()),
        timeout_s=timeout_s,
        error=ClusterError,
        poll_s=1,
        address=f"{head_ip}:{port}",
        dashboard_url=dashboard_url,
        temp_dir=temp_dir,
        nodes=nodes,
    )
    try:
        for i in range(1, nodes):  # one at a time: two `ray start` at once collide on ports
            _start_worker(info, i, node_cpus, env, timeout_s)
    except BaseException:
        down()
        raise
    return info


def _cpus(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else str(n)


def _node_env(nodes: int) -> dict[str, str]:
    # Job entrypoints say `python ...`: make that this environment's Python, with lmforge.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **client_env(nodes)}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)  # a node joins the head it is given, nothing else
    # `down` stops the whole cluster: Ray's default 30 s SIGTERM drain (for a node leaving
    # a cluster that lives on) would only make it wait.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "2")
    return env


def _start_worker(
    head: ClusterInfo, i: int, cpus: float, env: dict[str, str], timeout_s: float
) -> NodeInfo:
    ip = node_ip(i, head.nodes)
    cmd = [
        _ray_bin(), "start", "--block", "--disable-usage-stats",
        f"--address={head.address}", f"--node-ip-address={ip}",
        f"--temp-dir={node_temp_dir(head.temp_dir, i)}",  # its own logs: each line once
        f"--num-cpus={_cpus(cpus)}", f"--object-store-memory={NODE_OBJECT_STORE_BYTES}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]  # fmt: skip
    return worker_node(i).start(
        cmd,
        env=env,
        log_file=paths.home() / "cluster" / f"ray-node-{i}.log",
        ready=lambda: any(
            n["node_ip"] == ip and n["state"] == "ALIVE" for n in _list_nodes(head, quiet=True)
        ),
        timeout_s=timeout_s,
        error=ClusterError,
        poll_s=1,
        ip=ip,
        num_cpus=cpus,
    )


def _stop_workers() -> int:
    stopped = 0
    for i in range(MAX_NODES - 1, 0, -1):
        stopped += worker_node(i).stop()
    return stopped


def add_node(node_cpus: float = 1, timeout_s: float = 180) -> NodeInfo:
    """Start one more worker node on the running cluster of several nodes (a replacement for
    a lost one, or more capacity), on the next address no node of this cluster has had: Ray
    keeps a dead node's entry, so a new node never takes over a lost one's address."""
    if node_cpus <= 0:
        raise ClusterError(f"--node-cpus {node_cpus}: must be > 0")
    info = running()
    if info is None:
        raise ClusterError("no local Ray cluster running (start one with `lmforge cluster up`)")
    if info.nodes == 1:
        raise ClusterError(
            "the local cluster has one node (single-host mode, which refuses more nodes): "
            "start it with `lmforge cluster up --nodes 2` or more to add nodes"
        )
    used = [i for i in range(1, MAX_NODES) if worker_node(i).state_file.exists()]
    i = max(used, default=0) + 1
    if i >= MAX_NODES:
        raise ClusterError(f"no address left for another node (at most {MAX_NODES} nodes)")
    return _start_worker(info, i, node_cpus, _node_env(info.nodes), timeout_s)


def down() -> bool:
    """Stop every node `up` started, worker nodes first; False when none was running."""
    workers = _stop_workers()
    return HEAD.stop() or workers > 0


def set_client_env(env: dict[str, str], override: bool) -> None:
    """Set Ray client env vars (e.g. RAY_AUTH_MODE=token, so the token is sent); re-read by
    Ray's C++ config if Ray is already imported."""
    for k, v in env.items():
        if override:
            os.environ[k] = v
        else:
            os.environ.setdefault(k, v)
    if "ray" in sys.modules:
        # Ray reads these once, at import: its C++ config (RAY_AUTH_MODE), which Ray itself
        # refreshes this way when it turns token auth on (authentication_token_setup.py), and
        # the single-host switch, which decides whether 127.0.0.1 is replaced by the host IP.
        cluster_switch = None
        if "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" in env:
            cluster_switch = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
        raycompat.reload_client_config(cluster_switch)


def connect() -> str:
    """Connect this process to Ray; returns a description of where.

    Inside a Ray job (RAY_ADDRESS set) or with an explicit RAY_ADDRESS, use that cluster;
    else the one `lmforge cluster up` started; else start a private local Ray for the
    lifetime of this process.
    """
    # Ray Train prints each worker line twice unless its print patch is off.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    where = _init()
    drop_known_noise()
    return where


# Ray Train 2.60's controller starts a PreemptionWatcher actor with max_restarts=-1 and the
# workers' actor handles as constructor arguments
# (ray/train/v2/_internal/callbacks/preemption_callback.py), so Ray core logs an ERROR line
# "Actor with class name: 'PreemptionWatcher' ... has constructor arguments in the object
# store and max_restarts > 0" for every run (C++ in ray/_raylet.so: core_worker.cc,
# CoreWorker::CreateActor; ray-project/ray#53727). Nothing is wrong: those handles are the
# workers', alive as long as the watcher. C++ logs reach no Python logger, so the line is
# dropped where the driver prints its workers' output: a handler placed before Ray's own
# "ray_print_logs" on ray/_private/ray_logging's global_worker_stdstream_dispatcher (added
# by ray.init, ray/_private/worker.py). It stays in Ray's log files; nothing else is dropped.
KNOWN_NOISE = re.compile(
    r"Actor with class name: 'PreemptionWatcher' .*has constructor arguments in the object store"
)


def drop_known_noise() -> None:
    """Leave KNOWN_NOISE out of the worker output this driver prints (idempotent)."""
    dispatcher = raycompat.worker_output_dispatcher()

    def drop(data: dict) -> None:
        data["lines"] = [ln for ln in data.get("lines", []) if not KNOWN_NOISE.search(ln)]

    with dispatcher._lock:
        if not any(name == "lmforge_known_noise" for name, _ in dispatcher.handlers):
            dispatcher.handlers = [("lmforge_known_noise", drop), *dispatcher.handlers]


def _init() -> str:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            return "the Ray instance this process already uses"
    # Always an explicit address: `ray.init()` without one would read Ray's shared "current
    # cluster" file, which names whichever cluster on this machine started last.
    if address := os.environ.get("RAY_ADDRESS"):
        set_client_env({"RAY_AUTH_MODE": "token"}, override=False)
        check_reachable(address, "RAY_ADDRESS")
        import ray

        ray.init(address=address, log_to_driver=True, runtime_env=job_runtime_env())
        return f"Ray cluster at {address}"
    info = running()
    set_client_env(client_env(info.nodes if info else 1), override=True)
    import ray

    if info is not None:
        check_reachable(info.address, f"the cluster of `lmforge cluster up` ({HEAD.state_file})")
        ray.init(address=info.address, log_to_driver=True, runtime_env=job_runtime_env())
        return f"local Ray cluster at {info.address}"
    ensure_token()
    ray.init(address="local", log_to_driver=True, runtime_env=job_runtime_env())
    return "a private local Ray (no `lmforge cluster up` running)"


def job_runtime_env() -> dict | None:
    """The runtime env of a job this process starts by `ray.init`: its AWS_* variables, so
    that Ray Train's controller (an actor, not a worker: `worker_runtime_env` misses it)
    reaches S3 storage. None inside a submitted job, whose runtime env `lmforge submit` gave
    them (Ray refuses the same variable from both)."""
    from lmforge import storage

    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by Ray's job supervisor
        return None
    env_vars = storage.runtime_env_vars()
    return {"env_vars": env_vars} if env_vars else None


def check_reachable(address: str, source: str, timeout_s: float = 5) -> None:
    """Fail in seconds, naming the address, when nothing listens there (`ray.init` would
    retry for a minute or more); "auto", "local" and ray:// are left to Ray."""
    if address in ("auto", "local") or "://" in address:
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} (from {source}) is not HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterError(
            f"no Ray cluster at {address} (from {source}): {err.strerror or err}; start it "
            "(`lmforge cluster up`) or point RAY_ADDRESS at a running one"
        ) from None


def list_nodes(info: ClusterInfo | None = None) -> list[dict]:
    """The cluster's nodes from Ray's state API (the Jobs API server): id, address, state,
    resources; the dead ones too."""
    info = info or running()
    if info is None:
        raise ClusterError("no local Ray cluster running (start one with `lmforge cluster up`)")
    return _list_nodes(info)


def _list_nodes(info: ClusterInfo, quiet: bool = False) -> list[dict]:
    try:
        return state_list(info.dashboard_url, "nodes")
    except ClusterError:
        if quiet:
            return []
        raise


def state_list(dashboard_url: str, resource: str) -> list[dict]:
    """Ray's state API on the dashboard server (the Jobs API address): "nodes", "actors", ...
    with their details, dead ones included."""
    url = f"{dashboard_url.rstrip('/')}/api/v0/{resource}?limit=10000&detail=1"
    req = urllib.request.Request(url, headers=auth_headers())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            body = json.load(r)
        return body["data"]["result"]["result"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ClusterError(f"Ray state API at {url}: {err}") from None


TRAIN_WORKER = "RayTrainWorker"  # Ray Train's worker actor (train/v2/.../worker_group)


def placement(
    nodes: list[dict], actors: list[dict], job_names: dict[str, str]
) -> list[dict[str, object]]:
    """A row per node: id, address, state, role, resources, and the alive Ray Train workers
    on it by job (`job_names`: Ray job id -> the name to show, e.g. the submission id)."""
    workers: dict[str, dict[str, int]] = {}
    for a in actors:
        if TRAIN_WORKER in (a.get("class_name") or "") and a.get("state") == "ALIVE":
            job = job_names.get(a.get("job_id") or "", a.get("job_id") or "?")
            on = workers.setdefault(a.get("node_id") or "", {})
            on[job] = on.get(job, 0) + 1
    rows = []
    for n in sorted(nodes, key=lambda n: (not n.get("is_head_node"), n.get("node_ip", ""))):
        res = {
            k: v for k, v in (n.get("resources_total") or {}).items() if not k.startswith("node:")
        }
        on = workers.get(n["node_id"], {})
        rows.append(
            {
                "node": n["node_id"][:12],
                "address": n.get("node_ip", "?"),
                "state": n.get("state", "?"),
                "role": "head" if n.get("is_head_node") else "worker",
                "resources": ", ".join(
                    f"{k} {_fmt_resource(k, v)}" for k, v in sorted(res.items())
                ),
                "training workers": ", ".join(f"{j}: {c}" for j, c in sorted(on.items())),
            }
        )
    return rows


def nodes_table(nodes: list[dict]) -> str:
    """One line per node: id, address, state, head or worker, resources."""
    return "\n".join(
        f"  {r['node']}  {r['address']:<11}  {r['state']:<5}  {r['role']:<6}  {r['resources']}"
        for r in placement(nodes, [], {})
    )


def _fmt_resource(key: str, value: float) -> str:
    if "memory" in key:
        return f"{value / 1024**3:.2f} GiB"
    return _cpus(value)


def status() -> str:
    """The running cluster and its nodes; a ClusterError when none runs (`lmforge cluster
    status` exits non-zero then, as `ray status` does, so a script can tell)."""
    info = running()
    if info is None:
        raise ClusterError("no local Ray cluster running (start one with `lmforge cluster up`)")
    nodes = list_nodes(info)
    alive = sum(n.get("state") == "ALIVE" for n in nodes)
    return (
        f"{describe(info)}\nnodes ({alive} alive of {len(nodes)}):\n"
        "  node id       address      state  role    resources\n" + nodes_table(nodes)
    )


def describe(info: ClusterInfo) -> str:
    return (
        f"Ray head pid {info.pid}, {info.nodes} node(s)\n"
        f"  address (ray.init):       {info.address}\n"
        f"  Jobs API (ray job submit): {info.dashboard_url}\n"
        "  submit with: lmforge submit --config FILE (the arguments of lmforge train)\n"
        f"          or: RAY_AUTH_MODE=token ray job submit --address {info.dashboard_url} "
        "--runtime-env cluster/runtime_env.yaml -- python jobs/train.py --config FILE\n"
        f"  log: {info.log_file}" + (MULTI_NODE_NOTE if info.nodes > 1 else "")
    )


# Measured (tests/integration/test_multinode.py): out of single-host mode Ray 2.60 binds
# its raylets', GCS's and workers' gRPC ports on every interface, whatever the node address.
MULTI_NODE_NOTE = (
    " (and ray-node-*.log beside it)\n"
    "  note: with several nodes Ray listens on all interfaces (token auth still required); "
    "on a shared host keep it behind a firewall"
)
