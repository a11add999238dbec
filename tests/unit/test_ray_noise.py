"""The driver leaves out exactly Ray's PreemptionWatcher constructor-arguments line from the
worker output it prints (cluster.drop_known_noise), and nothing else."""

from __future__ import annotations

import pytest

from lmforge import cluster

NOISE = (
    "[2026-12-02 09:34:47,473 E 1226 1435] core_worker.cc:2465: Actor with class name: "
    "'PreemptionWatcher' and ID: 'd543' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the "
    "actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more details."
)


@pytest.fixture
def dispatcher():
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as d

    before = list(d.handlers)
    yield d
    d.handlers = before


def test_only_the_preemption_watcher_line_is_dropped(dispatcher):
    printed: list[list[str]] = []
    dispatcher.add_handler("ray_print_logs", lambda data: printed.append(list(data["lines"])))
    cluster.drop_known_noise()
    cluster.drop_known_noise()  # once is enough: connect() runs it on every call
    assert [n for n, _ in dispatcher.handlers].count("lmforge_known_noise") == 1
    other_actor = NOISE.replace("PreemptionWatcher", "MapWorker(MapBatches(f))")
    lines = ["step      1/30 | loss 6.2", NOISE, other_actor, "checkpoint step 10 -> /x"]
    dispatcher.emit({"lines": lines, "is_err": True, "pid": 1226})
    assert printed == [["step      1/30 | loss 6.2", other_actor, "checkpoint step 10 -> /x"]]
