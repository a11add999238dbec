"""Shared test setup.

Every test session gets its own LMFORGE_HOME under the temp dir, set before anything is
imported, so tests never touch ~/.lmforge and a session's cluster, datasets and runs are
its own.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "shakespeare"

os.environ["LMFORGE_HOME"] = tempfile.mkdtemp(prefix="lmforge-test-home-")
# DeepSpeed's JIT builds of this session (the trainer builds none on CPU: tests/trainer's
# test_train checks), not reused from an earlier one; one dir for the session's processes
# (pytest-xdist's workers and the processes tests spawn inherit it).
if "LMFORGE_TEST_TORCH_EXTENSIONS" not in os.environ:  # the session's first process
    os.environ["TORCH_EXTENSIONS_DIR"] = os.environ["LMFORGE_TEST_TORCH_EXTENSIONS"] = os.path.join(
        os.environ["LMFORGE_HOME"], "torch_extensions"
    )

# AppTest runs the dashboard's pages with the options `lmforge dashboard` gives them.
import streamlit.config  # noqa: E402

from lmforge.cli import DASHBOARD_OPTIONS  # noqa: E402

for _key, _value in DASHBOARD_OPTIONS.items():
    streamlit.config.set_option(_key, _value)

# Under pytest-xdist each worker's own torch ops get an equal share of the cores. With
# torch's default (a thread per core) in each of 2 workers, 4 OpenMP threads contend for 2
# cores: tests/unit took 176 s with -n 2, 157 s with a thread each. Processes the tests
# start (ranks, Ray workers, the CLI) do not inherit this.
if _workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))


def pytest_xdist_make_scheduler(config, log):
    """How `pytest -n 2` (scripts/test.sh) deals tests to its workers: the single-node Ray
    tests (tests/integration, the session's cluster) to one worker, the multi-node modules
    (their cluster) to one worker, each unit or trainer module to one worker; a group
    runs in collection order, the two Ray groups first. A session fixture (a cluster, a
    trained run) is then set up by one worker, a module fixture once, and one worker
    computes while the other waits on Ray. (pytest-xdist's own `--dist loadgroup` marks
    node ids in a way pytest 9 no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    from tests.integration.conftest import MULTINODE_MODULES

    class TierScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path.startswith("tests/integration/"):
                return "multinode" if Path(path).name in MULTINODE_MODULES else "ray"
            return path

    config.option.loadscopereorder = False  # collection order: the two Ray groups first
    return TierScheduling(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With LMFORGE_TEST_TIMELINE=FILE: one JSON line per test (its xdist worker, start and
    end, setup and teardown included) appended to FILE, to see which worker's chain of
    tests sets the suite's wall time."""
    start = time.time()
    yield
    if path := os.environ.get("LMFORGE_TEST_TIMELINE"):
        line = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "test": item.nodeid,
                "start": start, "end": time.time()}  # fmt: skip
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def pytest_sessionfinish(session, exitstatus):
    """Remove this session's LMFORGE_HOME (datasets, runs, cluster logs)."""
    shutil.rmtree(os.environ["LMFORGE_HOME"], ignore_errors=True)


@pytest.fixture(scope="module")
def plain_main():
    """A bare `__main__` while a module's tests spawn processes: multiprocessing's spawn
    re-runs the parent's main file in each child, and after the dashboard's AppTest tests
    that is dashboard/app.py, whose imports fail outside Streamlit's script runner. Module
    scope, so module-scoped fixtures that spawn can use it too."""
    import sys
    import types

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
        yield
