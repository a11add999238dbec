"""The Models page's Serve button and its "Served" table (AppTest, a SQLite MLflow, no Ray):
the button submits a `jobs/serve.py up` job (the models already served kept, every token
shell-inert), and the table shows what `lmforge serve` serves with its request figures."""

from __future__ import annotations

import json
import shlex

import pytest
from streamlit.testing.v1 import AppTest

from lmforge.serving import deploy
from tests.conftest import REPO
from tests.unit.test_dashboard_launch import by_label

pytest.importorskip("transformers")
from tests.unit.test_import_hf import hf_folder, train_tokenizer  # noqa: E402

APP = str(REPO / "dashboard" / "app.py")


def test_serve_button_submits_a_serve_job_and_the_page_shows_what_is_served(
    tmp_path, monkeypatch, tracking_uri
):
    from lmforge.import_hf import import_hf
    from lmforge.jobclient import JobClient

    tok = tmp_path / "tokenizer.json"
    train_tokenizer(["to be or not to be, that is the question"] * 30, 300).save(str(tok))
    hf_folder(tmp_path / "hf", tok)
    import_hf(tmp_path / "hf", "dash", tracking_uri)
    deploy.state_file().parent.mkdir(parents=True, exist_ok=True)
    record = deploy.ServeInfo("http://127.0.0.1:8123", "127.0.0.1", 8123, "lmforge",
                              {"other@best": "models:/other/4"}, 1, 8, dtype="bf16")  # fmt: skip
    deploy.state_file().write_text(json.dumps(record.__dict__))
    figures = {"other@best": {"requests": 12, "errors": 0, "tokens": 340, "tokens_per_s_1m": 55.5,
                              "ttft_p50_s": 0.02, "latency_p50_s": 0.3, "latency_p95_s": 0.9}}  # fmt: skip
    monkeypatch.setattr(deploy, "stats", lambda info=None: figures)
    submitted = []
    monkeypatch.setattr(JobClient, "__init__", lambda self, address=None: None)
    monkeypatch.setattr(JobClient, "submit", lambda self, spec: submitted.append(spec) or "serve-1")

    monkeypatch.syspath_prepend(str(REPO / "dashboard"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    monkeypatch.setenv("RAY_JOBS_ADDRESS", "http://127.0.0.1:9")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("pages/models.py")
    at.run()
    assert not at.exception, at.exception
    assert any("dtype bf16" in m.value for m in at.markdown)
    served = at.dataframe[-1].value
    row = served.iloc[0]
    assert (row["model"], row["version"], row["requests"], row["latency_p95_s"]) == (
        "other@best", "models:/other/4", 12, 0.9,
    )  # fmt: skip

    by_label(at.button, "Serve").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("serve-1" in s.value for s in at.success)
    (spec,) = submitted
    args = shlex.split(spec.entrypoint)
    assert args[:4] == ["exec", "python", "jobs/serve.py", "up"]
    models = [args[i + 1] for i, a in enumerate(args) if a == "--model"]
    assert models == ["models:/other@best", "models:/dash/1"]  # the served one kept
    assert args[args.index("--port") + 1] == "8123"
    assert args[args.index("--dtype") + 1] == "bf16"  # as it is served: no roll to another
    assert spec.metadata["lmforge.kind"] == "serve"


def test_a_serve_job_refuses_what_is_not_a_model_uri_or_not_shell_inert(tracking_uri):
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError, match="not a model URI"):
        deploy.serve_job(["runs:/abc"])
    with pytest.raises(LmforgeError, match="not allowed in a job"):
        deploy.serve_job(["models:/x/1; rm -rf ~"])
