"""The pyfunc model's `predict` has type hints MLflow accepts: no "Add type hints" warning,
and the explicit signature, sampling params included, is what MLflow saves."""

from __future__ import annotations

import json
import subprocess
import sys

from lmforge.tracking.pyfunc_model import PARAMS
from tests.conftest import REPO

SAVE = """
import json, sys, warnings
warnings.simplefilter("always")
import mlflow.pyfunc
from mlflow.models import Model
from lmforge.tracking import pyfunc_entry
from lmforge.tracking.pyfunc_model import signature
out, ckpt = sys.argv[1], sys.argv[2]
mlflow.pyfunc.save_model(out, python_model=pyfunc_entry.__file__,
                         artifacts={"checkpoint": ckpt}, signature=signature(),
                         pip_requirements=[])
sig = Model.load(out).signature
print(json.dumps({"inputs": sig.inputs.to_dict(), "params": [p.name for p in sig.params]}))
"""


def test_predict_type_hints_keep_the_signature_and_its_params(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.yaml").write_text("model: {}\n")
    out = subprocess.run(
        [sys.executable, "-c", SAVE, str(tmp_path / "model"), str(tmp_path / "ckpt")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Add type hints" not in out.stderr
    assert "does not match the signature inferred" not in out.stderr
    sig = json.loads(out.stdout.strip().splitlines()[-1])
    assert sig["params"] == list(PARAMS)
    assert sig["inputs"] == [{"type": "string", "required": True}]
