"""Fixtures shared by the unit tests."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from lmforge import dist


def pytest_collection_modifyitems(items):
    """Every test here is `unit` (no Ray): `bash scripts/test.sh -m unit` runs them."""
    for item in items:
        if "/unit/" in str(item.fspath):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _fresh_streamlit_resources():
    """Streamlit's resource cache lives as long as the process: a dashboard test's job
    client (one with a faked `__init__`, say) must not be the next test's (the dashboard
    caches one per address, `ui.job_client`)."""
    yield
    import sys

    if "streamlit" in sys.modules:
        sys.modules["streamlit"].cache_resource.clear()


@pytest.fixture(scope="module")
def gloo_group():
    """torch.distributed of world size 1 over gloo, as deepspeed.init_distributed makes it
    from the launcher's environment variables; removed again after the module.

    DeepSpeed keeps a clone of the world group from the first engine of the process: one an
    earlier module's group (destroyed with it) left would be used for ZeRO 2/3's
    broadcasts, so it is forgotten before and after.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in [*env, "DS_ACCELERATOR", "PATH"]}
    os.environ.update(env)
    dist.setup(use_gpu=False)  # DS_ACCELERATOR=cpu before deepspeed is imported
    import deepspeed
    from deepspeed.utils import groups

    deepspeed.init_distributed(dist_backend="gloo")
    groups._WORLD_GROUP = None
    yield
    torch.distributed.destroy_process_group()
    groups._WORLD_GROUP = None
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch):
    """A fresh embedded MLflow store (SQLite, artifacts in a folder beside it) in a tmp
    LMFORGE_HOME. A bare `sqlite:///tmp/x.db` would not do: MLflow gives the experiments of
    a SQLite store its default artifact root, `./mlruns` of the working dir (the repo)."""
    from lmforge.tracking import store

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path / "home"))
    return store.sqlite_uri()
