"""The dashboard's Models page in Streamlit's AppTest (a SQLite MLflow, no Ray): it imports a
Hugging Face folder inside the data roots through `import_hf` (a folder outside them is
refused in one line), lists each version's architecture and source, and fine-tunes an
imported version from the Launch page."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from lmforge.tracking import browse
from tests.conftest import REPO
from tests.unit.test_dashboard_launch import by_label

pytest.importorskip("transformers")
from tests.unit.test_import_hf import hf_folder, train_tokenizer  # noqa: E402

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture
def app(monkeypatch, tracking_uri):
    monkeypatch.syspath_prepend(str(REPO / "dashboard"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # LMFORGE_HOME is tmp_path/home
    monkeypatch.setenv("RAY_JOBS_ADDRESS", "http://127.0.0.1:9")  # nothing listens there
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.switch_page("pages/models.py")
    at.run()
    assert not at.exception, at.exception
    return at


def import_from_page(at, folder, name):
    by_label(at.text_input, "Folder").set_value(str(folder))
    by_label(at.text_input, "Register as").set_value(name)
    at.run()
    by_label(at.button, "Import").click()
    at.run()
    assert not at.exception, at.exception


def dataset_for(tok, out):
    """A small dataset dir prepared with the model's tokenizer (no Ray: the packing step)."""
    import numpy as np

    from lmforge.data.prepare import PrepareOptions, split_and_write
    from lmforge.tokenizer import copy_tokenizer, load_tokenizer

    out.mkdir(parents=True)
    copy_tokenizer(tok, out)
    docs = [np.arange(1, 200, dtype=np.int32) % 250 for _ in range(20)]
    split_and_write(iter(docs), out, load_tokenizer(tok), PrepareOptions(seq_tokens=64), [])


def test_import_a_folder_in_the_roots_and_fine_tune_it(app, tmp_path, monkeypatch):
    from lmforge.jobclient import JobClient

    submitted = []  # the job spec the Launch page hands the Jobs API (no Ray here)
    monkeypatch.setattr(JobClient, "__init__", lambda self, address=None: None)
    monkeypatch.setattr(JobClient, "submit", lambda self, spec: submitted.append(spec) or "j1")
    tok = tmp_path / "tok" / "tokenizer.json"
    tok.parent.mkdir()
    train_tokenizer(["to be or not to be, that is the question"] * 30, 300).save(str(tok))
    dataset_for(tok, tmp_path / "home" / "datasets" / "mini")
    assert any("No registered models" in i.value for i in app.info)

    outside = tmp_path / "elsewhere" / "gpt2"
    hf_folder(outside, tok)
    import_from_page(app, outside, "dash")
    (err,) = [e.value for e in app.error]
    assert err.startswith(f"Not imported: folder={outside}: outside the allowed data roots")
    assert "\n" not in err
    assert browse.models() == []  # nothing was imported

    inside = tmp_path / "home" / "datasets" / "gpt2-hf"
    hf_folder(inside, tok)
    import_from_page(app, inside, "dash")
    assert not app.error, [e.value for e in app.error]
    assert any("as `models:/dash/1`" in s.value for s in app.success)
    table = app.dataframe[0].value
    row = table[table["version"] == 1].iloc[0]
    assert row["arch"] == "gpt2" and row["source"] == f"imported from {inside.resolve()}"

    # Fine-tune it: the Launch page starts from its config, the shape from the checkpoint.
    by_label(app.button, "Fine-tune from it").click()
    app.run()
    app.switch_page("pages/launch.py")  # AppTest stays on the page it was told
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert any("Fine-tuning from `models:/dash/1`" in i.value for i in app.info)
    assert by_label(app.selectbox, "Architecture").value == "gpt2"
    assert by_label(app.number_input, "Width (d_model)").value == 32
    by_label(app.button, "Submit job").click()
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    (spec,) = submitted
    assert spec.entrypoint.endswith("--init-from models:/dash/1")
    assert "model.d_model=32" in spec.entrypoint  # the imported shape, not the preset's
    assert f"data.path={tmp_path / 'home' / 'datasets' / 'mini'}" in spec.entrypoint
