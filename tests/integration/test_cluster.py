"""`lmforge cluster up`: reused when running (what it exposes: test_secure_defaults.py)."""

from lmforge import cluster


def test_up_again_reuses_the_running_cluster(ray_cluster):
    again = cluster.up(port=1, dashboard_port=2)  # ports are ignored: nothing new starts
    assert again == ray_cluster
    assert "Jobs API" in cluster.status()
