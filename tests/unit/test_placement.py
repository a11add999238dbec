"""Whether a run's workers fit on the cluster before it starts (`training/placement.py`): a
worker's bundle on one node, counted over the alive nodes by placement strategy; refused in
one line without an autoscaler, waited for (one log line) with one. No Ray is started."""

from __future__ import annotations

import logging
import os
import sys
import types
from pathlib import Path

import pytest

from lmforge.config import ConfigError, load_config
from lmforge.training import placement
from lmforge.training.launch import check_cluster
from lmforge.training.placement import check_placement, placeable

TINY = Path(__file__).resolve().parents[2] / "jobs" / "configs" / "tiny.yaml"
HEAD = {"CPU": 0.0, "memory": 1e9}  # `cluster up --nodes N`'s head: no CPU
ONE_CPU = {"CPU": 1.0, "memory": 1e9}
TWO_CPU = {"CPU": 2.0}
GPU_NODE = {"CPU": 8.0, "GPU": 2.0}


def cfg(*overrides: str):
    return load_config(TINY, ["run.shared_filesystem=true", *overrides])


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(placement.OVERRIDE, raising=False)
    monkeypatch.delenv(placement.START_TIMEOUT, raising=False)


@pytest.mark.parametrize(
    "nodes, strategy, fit",
    [
        ([HEAD, ONE_CPU], "PACK", 1),
        ([HEAD, ONE_CPU], "SPREAD", 1),
        ([HEAD, ONE_CPU, ONE_CPU], "PACK", 2),  # PACK spills over to more nodes
        ([TWO_CPU], "STRICT_SPREAD", 1),  # one a node
        ([TWO_CPU, ONE_CPU], "STRICT_SPREAD", 2),
        ([TWO_CPU, ONE_CPU, ONE_CPU], "STRICT_PACK", 2),  # all on one node
        ([{"CPU": 1.9999}], "PACK", 1),
        ([{"CPU": 0.9999}], "PACK", 0),
        ([{"memory": 5.0}], "PACK", 0),
        ([], "PACK", 0),
    ],
)
def test_bundles_that_fit_by_strategy(nodes, strategy, fit):
    assert placeable({"CPU": 1.0}, nodes, strategy) == fit


def test_fractions_of_a_cpu():
    assert placeable({"CPU": 0.1}, [{"CPU": 0.3}], "PACK") == 3  # 0.3 / 0.1 = 2.9999...


def test_a_gpu_worker_needs_a_gpu_and_its_cpus_on_one_node():
    bundle = {"CPU": 4.0, "GPU": 1.0}
    assert placeable(bundle, [GPU_NODE], "PACK") == 2
    assert placeable(bundle, [{"CPU": 2.0, "GPU": 4.0}], "PACK") == 0
    assert placeable(bundle, [{"CPU": 64.0}, GPU_NODE], "PACK") == 2  # CPUs elsewhere: no


@pytest.mark.parametrize("strategy", ["PACK", "SPREAD"])
def test_two_workers_on_a_head_and_one_cpu_node_are_refused_in_one_line(strategy):
    """`lmforge cluster up --nodes 2` and a 2-worker run: Ray Train would wait forever."""
    with pytest.raises(ConfigError) as err:
        check_placement(cfg(f"scaling.placement_strategy={strategy}"), [HEAD, ONE_CPU], False)
    msg = str(err.value)
    assert "\n" not in msg
    assert "2 workers of CPU 1 each" in msg  # what it needs
    assert "its 2 nodes (1 with CPU 0; 1 with CPU 1) have room for 1" in msg  # what it has
    assert "no autoscaler" in msg
    assert "lmforge cluster add-node" in msg and "scaling.num_workers" in msg  # the fixes


def test_check_cluster_refuses_it_too():
    with pytest.raises(ConfigError, match="have room for 1"):
        check_cluster(cfg(), [HEAD, ONE_CPU])


@pytest.mark.parametrize(
    "overrides, nodes",
    [
        ([], [HEAD, ONE_CPU, ONE_CPU]),
        ([], [TWO_CPU]),
        (["scaling.placement_strategy=SPREAD"], [TWO_CPU]),  # SPREAD may share a node
        (["scaling.placement_strategy=STRICT_SPREAD"], [HEAD, ONE_CPU, ONE_CPU]),
        (["scaling.num_workers=[2,4]"], [HEAD, ONE_CPU, ONE_CPU]),  # elastic: the minimum
        (["scaling.use_gpu=true", "scaling.cpus_per_worker=4"], [HEAD, GPU_NODE]),
    ],
)
def test_runs_that_fit_pass_without_asking_for_an_autoscaler(overrides, nodes):
    def ask():
        raise AssertionError("asked for an autoscaler although the workers fit")

    check_placement(cfg(*overrides), nodes, ask)


def test_an_elastic_minimum_that_does_not_fit_is_refused():
    with pytest.raises(ConfigError) as err:
        check_placement(cfg("scaling.num_workers=[2,4]"), [HEAD, ONE_CPU], False)
    assert "at least 2 workers" in str(err.value)
    assert "the minimum of scaling.num_workers" in str(err.value)


def test_gpu_workers_on_cpu_nodes_are_refused():
    with pytest.raises(ConfigError) as err:
        check_placement(cfg("scaling.use_gpu=true"), [TWO_CPU, TWO_CPU], False)
    msg = str(err.value)
    assert "2 workers of CPU 1, GPU 1 each" in msg and "2 with CPU 2, GPU 0" in msg
    assert "cpus_per_worker" not in msg  # not the fix on GPUs


def test_strict_spread_says_so_and_offers_spread():
    with pytest.raises(ConfigError) as err:
        check_placement(
            cfg("scaling.placement_strategy=STRICT_SPREAD"), [HEAD, ONE_CPU, {"CPU": 0.5}], False
        )
    msg = str(err.value)
    assert "puts each of the 2 workers on its own node, but only 1 of the cluster's 3" in msg
    assert msg.endswith(", or use SPREAD")


def test_with_an_autoscaler_it_waits_and_says_so_once(caplog):
    caplog.set_level(logging.WARNING, logger=placement.__name__)
    check_placement(cfg(), [HEAD, ONE_CPU], lambda: True)  # no error
    (record,) = caplog.records
    line = record.getMessage()
    assert "\n" not in line and "waiting for the cluster's autoscaler" in line
    assert "2 workers of CPU 1 each" in line and "room for 1" in line
    # Ray Train's retry every 60 s (a traceback each time) becomes one every 15 minutes
    assert os.environ[placement.START_TIMEOUT] == str(placement.AUTOSCALER_START_TIMEOUT_S)


def test_a_start_timeout_the_user_set_is_kept(monkeypatch):
    monkeypatch.setenv(placement.START_TIMEOUT, "120")
    check_placement(cfg(), [HEAD, ONE_CPU], True)
    assert os.environ[placement.START_TIMEOUT] == "120"


# -- is there an autoscaler? ---------------------------------------------------------------
def test_node_types_of_hand_started_nodes_are_not_an_autoscalers():
    hand = "node_" + "ab12" * 14  # what Ray names a node with no type
    assert not placement.any_configured_type({hand, ""})
    assert placement.any_configured_type({hand, "ray.worker.gpu"})  # `ray up`, KubeRay
    assert placement.any_configured_type({"headgroup"})


def test_no_connection_no_autoscaler(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: False))
    assert placement.autoscaler_configured() is False


def test_the_override_wins(monkeypatch):
    monkeypatch.setenv(placement.OVERRIDE, "1")
    assert placement.autoscaler_configured() is True
    monkeypatch.setenv(placement.OVERRIDE, "0")
    assert placement.autoscaler_configured() is False


@pytest.fixture
def connected(monkeypatch):
    """A connected Ray whose probes answer nothing, each replaceable."""
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True))
    for probe in ("_autoscalable_cluster_config", "_node_types_from_gcs"):
        monkeypatch.setattr(placement, probe, lambda: set())
    monkeypatch.setattr(placement, "_node_types_from_v1_report", lambda: set())
    return monkeypatch


def test_each_probe_can_tell(connected):
    assert placement.autoscaler_configured() is False
    connected.setattr(placement, "_node_types_from_v1_report", lambda: {"ray.worker.default"})
    assert placement.autoscaler_configured() is True
    connected.setattr(placement, "_node_types_from_v1_report", lambda: set())
    connected.setattr(placement, "_autoscalable_cluster_config", lambda: True)
    assert placement.autoscaler_configured() is True


def test_a_probe_that_fails_says_nothing(connected):
    def broken():
        raise RuntimeError("GCS unreachable")

    connected.setattr(placement, "_node_types_from_gcs", broken)
    assert placement.autoscaler_configured() is False
    connected.setattr(placement, "_node_types_from_v1_report", lambda: {"small-group"})
    assert placement.autoscaler_configured() is True


def test_v1_report_node_types(monkeypatch):
    import json

    from ray.experimental import internal_kv

    report = {
        "autoscaler_report": {
            "active_nodes": {"ray.head.default": 1},
            "idle_nodes": {"gpu": 2},
            "pending_launches": {"cpu": 1},
        }
    }
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key: json.dumps(report))
    assert placement._node_types_from_v1_report() == {"ray.head.default", "gpu", "cpu"}
    monkeypatch.setattr(internal_kv, "_internal_kv_get", lambda key: None)
    assert placement._node_types_from_v1_report() == set()
