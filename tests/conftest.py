"""Shared test setup.

Every test session gets its own LMFORGE_HOME under the temp dir, set before anything is
imported, so tests never touch ~/.lmforge and a session's cluster, datasets and runs are
its own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "shakespeare"

os.environ["LMFORGE_HOME"] = tempfile.mkdtemp(prefix="lmforge-test-home-")


def pytest_sessionfinish(session, exitstatus):
    """Remove this session's LMFORGE_HOME (datasets, runs, cluster logs)."""
    shutil.rmtree(os.environ["LMFORGE_HOME"], ignore_errors=True)
