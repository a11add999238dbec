"""Registering a version prints nothing of MLflow's own chatter in the registering thread;
MLflow's output elsewhere (other threads, after the call, its loggers) is untouched."""

from __future__ import annotations

import logging
import threading

from mlflow.utils.logging_utils import eprint

from lmforge.tracking.registry import _quiet_prints


def test_only_this_threads_prints_are_muted_and_only_inside(capsys):
    with _quiet_prints():
        eprint("Registered model 'm' already exists. Creating a new version of this model...")
        other = threading.Thread(target=eprint, args=("from another thread",))
        other.start()
        other.join()
        logging.getLogger("mlflow.tracking").warning("a real problem")
    eprint("after the call")
    err = capsys.readouterr().err
    assert "already exists" not in err
    assert "from another thread" in err and "after the call" in err
    assert "a real problem" in err
