"""What `lmforge cluster up` and `lmforge tracking up` expose: their HTTP services (the Ray
dashboard with the Jobs API, Ray's GCS, the MLflow server) listen on 127.0.0.1 only, and
the Jobs API refuses a request without the cluster's token."""

from __future__ import annotations

import ipaddress
import urllib.error
import urllib.request
from urllib.parse import urlparse

import psutil
import pytest

from tests.integration.conftest import GCS_PORT


def listening(port: int) -> set[str]:
    """The addresses a TCP socket on `port` listens on, on this machine (IPv4-mapped IPv6
    addresses, as Ray's gRPC servers report them, as their IPv4 address)."""
    out = set()
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port:
            ip = ipaddress.ip_address(c.laddr.ip)
            out.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return out


@pytest.mark.parametrize("service", ["ray dashboard and Jobs API", "ray GCS", "mlflow server"])
def test_services_listen_on_loopback_only(service, ray_cluster, tracking_server):
    port = {
        "ray dashboard and Jobs API": urlparse(ray_cluster.dashboard_url).port,
        "ray GCS": GCS_PORT,
        "mlflow server": urlparse(tracking_server.url).port,
    }[service]
    addresses = listening(port)
    assert addresses, f"nothing listens on {port} ({service})"
    assert addresses == {"127.0.0.1"}, f"{service} on port {port} listens on {addresses}"


def test_jobs_api_refuses_a_request_without_the_token(ray_cluster):
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{ray_cluster.dashboard_url}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)
