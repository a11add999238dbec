"""`lmforge serve up | status | down`: the application on the lmforge cluster, its API key
and the record of what is served (`$LMFORGE_HOME/serve.json`).

The API key: LMFORGE_SERVE_API_KEY, else `$LMFORGE_HOME/serve_api_key` (owner-only, 0600,
written by the first `serve up` on a loopback address, as Ray's token is kept). Ray sees
only its sha256: the key itself is in no deployment argument, log or Serve config. A
non-loopback --host needs a key that exists already (the variable, or the file of an
earlier `serve up`), so a public endpoint never starts with a key nobody has seen.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import os
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge import paths
from lmforge.serving.versions import Group, ServeError, resolve

log = logging.getLogger(__name__)
KEY_ENV = "LMFORGE_SERVE_API_KEY"
APP = "lmforge"


@dataclass(frozen=True)
class ServeInfo:
    url: str  # http://HOST:PORT (the OpenAI base URL is url + "/v1")
    host: str
    port: int
    app: str
    models: dict[str, str]  # served name -> the version it resolved to (models:/NAME/N)
    replicas: int
    max_batch: int
    groups: list[dict] = field(default_factory=list)  # versions.Group.to_dict() of each base
    dtype: str = "fp32"  # as asked: fp32, bf16, fp16 or auto (each replica resolves auto)


def state_file() -> Path:
    return paths.home() / "serve.json"


def key_file() -> Path:
    return paths.home() / "serve_api_key"


def api_key(create: bool = False) -> str | None:
    """The endpoint's API key: LMFORGE_SERVE_API_KEY, the key file, or (create) a new one."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    f = key_file()
    if f.is_file():
        f.chmod(0o600)
        return f.read_text().strip()
    if not create:
        return None
    f.parent.mkdir(parents=True, exist_ok=True)
    key = "lmf-" + secrets.token_urlsafe(32)
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    log.info("generated the serve API key in %s (mode 600)", f)
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_options(
    replicas: int, port: int, max_batch: int, cpus: float | None, gpus: float | None,
    dtype: str = "fp32",
) -> None:  # fmt: skip
    from lmforge.perf import INFERENCE_DTYPES

    if dtype not in INFERENCE_DTYPES:
        raise ServeError(f"--dtype {dtype}: use one of {', '.join(INFERENCE_DTYPES)}")
    if replicas < 1:
        raise ServeError(f"--replicas {replicas}: at least 1")
    if not 0 < port < 65536:
        raise ServeError(f"--port {port}: not a TCP port")
    if max_batch < 1:
        raise ServeError(f"--max-batch {max_batch}: at least 1")
    if cpus is not None and gpus is not None:
        raise ServeError("--cpus-per-replica and --gpus-per-replica: give one of them")
    if (cpus is not None and cpus <= 0) or (gpus is not None and gpus <= 0):
        raise ServeError("--cpus-per-replica / --gpus-per-replica must be > 0")


def up(
    uris: list[str],
    replicas: int = 1,
    port: int = 8000,
    host: str = "127.0.0.1",
    max_batch: int = 8,
    cpus: float | None = None,
    gpus: float | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    timeout_s: float = 300,
    dtype: str = "auto",
) -> ServeInfo:
    """Deploy (or roll) the application; returns once the endpoint answers. `dtype`: the
    replicas' weights and KV cache (`lmforge.perf.inference_dtype`; auto: bf16 where fast)."""
    from lmforge.tracking import store

    check_options(replicas, port, max_batch, cpus, gpus, dtype)
    key = api_key(create=is_loopback(host))
    if key is None:
        raise ServeError(
            f"--host {host} is not a loopback address: set {KEY_ENV} (or run `lmforge serve "
            "up` on 127.0.0.1 once to generate a key) before exposing the endpoint"
        )
    tracking_uri = store.resolve_uri(tracking_uri)
    groups = resolve(uris, tracking_uri)  # every URI checked before Ray is touched
    _connect(address)
    from ray import serve

    previous = running_record() if APP in _applications() else None
    if previous is not None and (previous.host, previous.port) != (host, port):
        raise ServeError(
            f"Serve already listens on {previous.url}: `lmforge serve down` first to move it to "
            f"{host}:{port}"
        )

    from lmforge.serving.app import build

    serve.start(http_options={"host": host, "port": port})
    digest = hashlib.sha256(key.encode()).hexdigest()
    models = {v.name: v.uri for g in groups for v in g.versions}
    verb = "rolling" if previous is not None else "deploying"
    log.info("%s %s", verb, ", ".join(f"{n} -> {u}" for n, u in models.items()))
    # A roll that moves versions to other deployments deploys twice. Each deployment is
    # named for what it holds (Group.deployment), so a replica never lacks a version it is
    # asked for; an old ingress replica still answers the requests it took, routed to the
    # old layout. So the first deploy keeps the deployments being replaced (`draining`)
    # beside the new ones, the new ingress routing to the new ones only; once the old
    # ingress has stopped, the second drops them.
    now = {g.deployment for g in groups}
    old = [Group.from_dict(d) for d in (previous.groups if previous is not None else [])]
    draining = tuple(g for g in old if g.deployment not in now)
    for keep in [draining, ()] if draining else [()]:
        app = build(groups, tracking_uri, digest, max_batch, replicas, cpus, gpus, keep, dtype)
        try:
            serve.run(app, name=APP, route_prefix="/")
        except RuntimeError as err:  # a replica failed to start: its own error, one line
            raise ServeError(
                f"deploying failed: {_replica_error() or str(err).splitlines()[0]}"
            ) from None
        if keep:
            _wait_stopped("OpenAIServer")  # the old ingress has answered what it took
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    info = ServeInfo(
        url, host, port, APP, models, replicas, max_batch, [g.to_dict() for g in groups], dtype
    )
    _wait_answering(info, key, timeout_s)
    state_file().write_text(json.dumps(asdict(info), indent=1))
    return info


def _wait_stopped(deployment: str, timeout_s: float = 120) -> None:
    """Until no replica of `deployment` is stopping (an old one finishing its requests)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = _applications().get(APP)
        d = app.deployments.get(deployment) if app is not None else None
        states = d.replica_states if d is not None else {}
        if not any(str(k).endswith("STOPPING") and n for k, n in states.items()):
            return
        time.sleep(0.5)


def _replica_error() -> str | None:
    """The last line of the error a failed deployment reports (its replica's exception)."""
    app = _applications().get(APP)
    for d in app.deployments.values() if app is not None else []:
        lines = [ln.strip() for ln in (d.message or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "Error:" in ln or "Exception:" in ln]
        if errors:
            return errors[-1][:500]
    return None


def _applications() -> dict:
    """Ray Serve's applications on the connected cluster ({} when Serve is not running)."""
    from ray import serve

    try:
        return serve.status().applications
    except Exception:  # RayServeException: no Serve controller on this cluster
        return {}


def _connect(address: str | None) -> None:
    from lmforge import cluster

    if address:
        os.environ["RAY_ADDRESS"] = address
    cluster.connect()


def _wait_answering(info: ServeInfo, key: str, timeout_s: float) -> None:
    """Until GET /v1/models lists exactly the models just deployed."""
    deadline = time.monotonic() + timeout_s
    want = sorted(info.models)
    last = ""
    while time.monotonic() < deadline:
        try:
            got = sorted(m["id"] for m in get_json(info.url + "/v1/models", key)["data"])
            if got == want:
                return
            last = f"it lists {got}"
        except urllib.error.HTTPError as err:
            if err.code in (401, 403, 422):  # it answers, and refuses: waiting will not help
                raise ServeError(
                    f"the endpoint {info.url} answers {err.code}: {err.read()[:300]!r}"
                ) from None
            last = str(err)
        except (OSError, ValueError, KeyError) as err:
            last = str(err)
        time.sleep(0.5)
    raise ServeError(f"the endpoint {info.url} did not answer within {timeout_s:.0f} s ({last})")


def get_json(url: str, key: str, timeout_s: float = 5) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def running_record() -> ServeInfo | None:
    """What `serve up` last deployed from this LMFORGE_HOME (None: nothing, or taken down)."""
    try:
        return ServeInfo(**json.loads(state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def stats(info: ServeInfo | None = None) -> dict | None:
    """The endpoint's request figures per model (GET /lmforge/stats), None if it is down."""
    info = info or running_record()
    key = api_key()
    if info is None or key is None:
        return None
    try:
        return get_json(info.url + "/lmforge/stats", key)
    except (OSError, ValueError):
        return None


def status(address: str | None = None) -> str:
    """The deployments (status, replicas), the versions and their request figures."""
    info = running_record()
    if info is None:
        return "nothing is served from this LMFORGE_HOME (lmforge serve up --model URI)"
    lines = [
        f"OpenAI API: {info.url}/v1  (key: {KEY_ENV} or {key_file()})",
        f"  {info.replicas} replica(s) a base, max batch {info.max_batch}, dtype {info.dtype}",
    ]
    try:
        _connect(address)
        from ray import serve

        app = serve.status().applications.get(info.app)
    except Exception as err:  # Ray unreachable: say so, show what the endpoint says
        lines.append(f"  Ray Serve: not reachable ({str(err).splitlines()[0][:200]})")
        app = None
    if app is not None:
        lines.append(f"application {info.app}: {app.status}")
        for name, d in app.deployments.items():
            states = ", ".join(f"{n} {s}" for s, n in d.replica_states.items()) or "no replicas"
            lines.append(f"  deployment {name}: {d.status} ({states})")
    elif not any("not reachable" in ln for ln in lines):
        lines.append(f"application {info.app}: not running (lmforge serve up)")
    figures = stats(info) or {}
    lines.append(f"{'model':<28} {'version':<22} {'requests':>8} {'errors':>6} {'tokens':>8} "
                 f"{'tok/s 1m':>8} {'TTFT p50':>9} {'lat p50':>8} {'lat p95':>8}")  # fmt: skip
    for name, uri in info.models.items():
        f = figures.get(name, {})
        lines.append(
            f"{name:<28} {uri.removeprefix('models:/'):<22} {f.get('requests', '-'):>8} "
            f"{f.get('errors', '-'):>6} {f.get('tokens', '-'):>8} "
            f"{_num(f.get('tokens_per_s_1m')):>8} {_secs(f.get('ttft_p50_s')):>9} "
            f"{_secs(f.get('latency_p50_s')):>8} {_secs(f.get('latency_p95_s')):>8}"
        )
    return "\n".join(lines)


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _secs(v) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def down(address: str | None = None) -> bool:
    """Delete the application (and stop Serve if nothing else is served); False if none."""
    info = running_record()
    _connect(address)
    from ray import serve

    apps = _applications()
    name = info.app if info is not None else APP
    found = name in apps
    if found:
        serve.delete(name)
    if not set(apps) - {name}:
        serve.shutdown()
    state_file().unlink(missing_ok=True)
    return found


def serve_job(uris: list[str], tracking_uri: str | None = None, port: int = 8000):
    """A `jobs/serve.py up` job (the dashboard's Serve button): every argument a checked,
    shell-inert token; the models already served from this LMFORGE_HOME stay served."""
    from lmforge import jobspec
    from lmforge.tracking.registry import is_model_uri

    current = running_record()
    keep = [f"models:/{n}" for n in current.models] if current is not None else []
    args = ["python", "jobs/serve.py", "up"]
    for uri in dict.fromkeys([*keep, *uris]):
        if not is_model_uri(uri):
            raise ServeError(f"{uri!r}: not a model URI")
        args += ["--model", jobspec.safe_token("model", uri).split("=", 1)[1]]
    if current is not None:  # as it is served: a different port or dtype would move it
        port = current.port
        args += ["--dtype", jobspec.safe_token("dtype", current.dtype).split("=", 1)[1]]
    args += ["--port", str(int(port))]
    if tracking_uri:
        args += [
            "--tracking-uri",
            jobspec.safe_token("tracking_uri", tracking_uri).split("=", 1)[1],
        ]
    meta = {"lmforge.kind": "serve", "lmforge.models": ",".join(uris)[:200]}
    return jobspec.JobSpec(jobspec.entrypoint(args), jobspec.runtime_env(), meta)
