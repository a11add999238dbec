"""Shared fixtures. Integration fixtures (a real local Ray cluster) live in integration/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "shakespeare"


@pytest.fixture(autouse=True)
def _lmforge_home(tmp_path_factory, monkeypatch):
    """Keep every test's LMFORGE_HOME out of the user's home."""
    if "LMFORGE_HOME" not in os.environ or not os.environ["LMFORGE_HOME"].startswith("/tmp"):
        monkeypatch.setenv("LMFORGE_HOME", str(tmp_path_factory.getbasetemp() / "lmforge-home"))
