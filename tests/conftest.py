"""Shared test setup.

Every test session gets its own LMFORGE_HOME under the temp dir, set before anything is
imported, so tests never touch ~/.lmforge and a session's cluster, datasets and runs are
its own.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "shakespeare"

os.environ["LMFORGE_HOME"] = tempfile.mkdtemp(prefix="lmforge-test-home-")
