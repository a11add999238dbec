"""`lmforge cluster up`: reused when running, token auth on, listening on loopback only."""

import ipaddress

import psutil
import pytest
import requests

from lmforge import cluster


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4 loopback
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_up_again_reuses_the_running_cluster(ray_cluster):
    again = cluster.up(port=1, dashboard_port=2)  # ports are ignored: nothing new starts
    assert again == ray_cluster
    assert "Jobs API" in cluster.status()


def test_jobs_api_needs_the_token(ray_cluster):
    url = f"{ray_cluster.dashboard_url}/api/jobs/"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers=cluster.auth_headers(), timeout=10).status_code == 200


def test_every_listening_socket_is_on_loopback(ray_cluster):
    pids = {p.pid for p in _tree(ray_cluster.pid)}
    listening = [
        c
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    assert listening, "the head listens on nothing?"
    exposed = [(c.laddr.ip, c.laddr.port) for c in listening if not _loopback(c.laddr.ip)]
    if exposed:
        pytest.fail(f"listening beyond loopback: {exposed}")
