"""What `lmforge cluster up`, `lmforge tracking up` and `lmforge dashboard` expose: their
services (the Ray dashboard with the Jobs API, Ray's GCS and every other socket of the head,
the MLflow server, the Streamlit dashboard) listen on 127.0.0.1 only, and the Jobs API
refuses a request without the cluster's token."""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request
from urllib.parse import urlparse

import psutil
import pytest

from lmforge import cluster

pytestmark = pytest.mark.ray  # every test looks at the session's cluster (getfixturevalue)


def listening(port: int) -> set[str]:
    """The addresses a TCP socket on `port` listens on, on this machine (IPv4-mapped IPv6
    addresses, as Ray's gRPC servers report them, as their IPv4 address)."""
    out = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
            ip = ipaddress.ip_address(c.laddr.ip)
            out.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return out


SERVICES = ["ray dashboard and Jobs API", "ray GCS", "mlflow server", "lmforge dashboard"]


@pytest.mark.parametrize("service", SERVICES)
def test_services_listen_on_loopback_only(service, request):
    url = {
        "ray dashboard and Jobs API": lambda: request.getfixturevalue("ray_cluster").dashboard_url,
        "ray GCS": lambda: f"tcp://{request.getfixturevalue('ray_cluster').address}",
        "mlflow server": lambda: request.getfixturevalue("tracking_server").url,
        "lmforge dashboard": lambda: request.getfixturevalue("dashboard_server"),
    }[service]()
    request.getfixturevalue("ray_cluster")
    port = urlparse(url).port
    addresses = listening(port)
    assert addresses, f"nothing listens on {port} ({service})"
    assert addresses == {"127.0.0.1"}, f"{service} on port {port} listens on {addresses}"


def test_every_socket_of_the_ray_head_is_on_loopback(ray_cluster):
    head = psutil.Process(ray_cluster.pid)
    pids = {p.pid for p in [head, *head.children(recursive=True)]}
    sockets = [
        c
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    assert sockets, "the head listens on nothing?"
    exposed = [(c.laddr.ip, c.laddr.port) for c in sockets if not _loopback(c.laddr.ip)]
    assert not exposed, f"listening beyond loopback: {exposed}"


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def test_jobs_api_refuses_a_request_without_the_token(ray_cluster):
    url = f"{ray_cluster.dashboard_url}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code in (401, 403)
    with urllib.request.urlopen(urllib.request.Request(url, headers=cluster.auth_headers())) as r:
        assert r.status == 200
