"""Every dashboard page in Streamlit's AppTest against the real local Ray (Jobs API) and MLflow.

One job is launched from the Launch page's form and followed through Jobs, Runs, Models
and the Playground, as a person would. It is submitted by the first test and trains while
the tests that need no finished run (uploads, an import and its fine-tune, a failing job)
go on beside it; the tests that follow it wait for its end (`launched`).
"""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from lmforge.jobclient import JobClient
from lmforge.tracking import browse, store
from tests.conftest import REPO

APP = str(REPO / "dashboard" / "app.py")
EXPERIMENT = "dash-pages"


def by_label(widgets, label):
    (w,) = [w for w in widgets if w.label == label]
    return w


@pytest.fixture(scope="module")
def dashboard_env(ray_cluster):
    """The environment `lmforge dashboard` gives the app, for AppTest in this process."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(REPO / "dashboard"))
    mp.setenv("RAY_JOBS_ADDRESS", ray_cluster.dashboard_url)
    mp.setenv("MLFLOW_TRACKING_URI", store.resolve_uri())
    yield
    mp.undo()


def new_app() -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture(scope="module")
def submitted(dashboard_env, ray_cluster, dataset):
    """Submit a 6-step job from the Launch page: (AppTest, submission id)."""
    at = new_app()
    by_label(at.selectbox, "Dataset").set_value(str(dataset))
    for label, value in [("Steps", 6), ("Evaluate every (steps)", 3), ("Checkpoint every (steps)", 3), ("Warm-up steps", 1)]:  # fmt: skip
        by_label(at.number_input, label).set_value(value)
    by_label(at.text_input, "Experiment").set_value(EXPERIMENT)
    at.run()
    assert not at.error, [e.value for e in at.error]
    by_label(at.button, "Submit job").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    sid = at.session_state["jobs_selected"]
    assert any(sid in s.value for s in at.success)
    (code,) = at.code
    assert (
        code.value.startswith("exec python jobs/train.py --set")
        and f"data.path={dataset}" in code.value
    )
    return at, sid


@pytest.fixture(scope="module")
def launched(submitted, ray_cluster):
    """The Launch page's job, finished: (AppTest, submission id)."""
    at, sid = submitted
    client = JobClient(ray_cluster.dashboard_url)
    assert client.wait(sid, timeout_s=600, poll_s=0.5) == "SUCCEEDED", client.tail(sid, 60)
    return at, sid


def test_the_launch_page_submits_a_train_job(submitted, ray_cluster):
    """First, so that its job trains while the tests that need no finished run go on."""
    _, sid = submitted
    row = JobClient(ray_cluster.dashboard_url).job(sid)
    assert row.kind == "SUBMISSION" and row.metadata["lmforge.kind"] == "train"
    assert row.metadata["lmforge.experiment"] == EXPERIMENT


def test_an_imported_folder_fine_tunes_from_the_launch_page(dashboard_env, ray_cluster, dataset):
    """Models page: import a Hugging Face folder from the data roots (its tokenizer is the
    dataset's), fine-tune it from the Launch page for 2 steps; the run's version is listed
    with its architecture and the imported version as its parent."""
    pytest.importorskip("transformers")
    from lmforge import paths
    from tests.unit.test_import_hf import hf_folder

    folder = paths.home() / "uploads" / "hf-dash"
    hf_folder(folder, dataset / "tokenizer.json")
    at = new_app()
    at.switch_page("pages/models.py")
    at.run()
    by_label(at.text_input, "Folder").set_value(str(folder))
    by_label(at.text_input, "Register as").set_value("dash-imported")
    at.run()
    by_label(at.button, "Import").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("as `models:/dash-imported/1`" in s.value for s in at.success)
    by_label(at.button, "Fine-tune from it").click()
    at.run()
    at.switch_page("pages/launch.py")
    at.run()
    by_label(at.selectbox, "Dataset").set_value(str(dataset))
    for label, value in [("Steps", 2), ("Evaluate every (steps)", 2), ("Checkpoint every (steps)", 2), ("Warm-up steps", 1)]:  # fmt: skip
        by_label(at.number_input, label).set_value(value)
    at.run()
    by_label(at.button, "Submit job").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.code[0].value.endswith("--init-from models:/dash-imported/1")
    client = JobClient(ray_cluster.dashboard_url)
    sid = at.session_state["jobs_selected"]
    assert client.wait(sid, timeout_s=600) == "SUCCEEDED", client.tail(sid, 60)
    at.session_state["launch_from"] = None

    at.switch_page("pages/models.py")
    at.run()
    # Other tests' models are registered too: pick this one (the page starts at the first).
    by_label(at.selectbox, "Registered model").set_value("dash-imported")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    assert list(table["arch"]) == ["gpt2", "gpt2"]  # the fine-tune's version, the import
    assert table.iloc[0]["source"].endswith("fine-tuned from models:/dash-imported/1")
    assert table.iloc[1]["source"] == f"imported from {folder.resolve()}"


def test_an_uploaded_corpus_becomes_a_dataset_the_form_offers(dashboard_env, ray_cluster):
    from lmforge import paths
    from tests.conftest import CORPUS

    at = new_app()
    play = (CORPUS / "twelfth_night.txt").read_bytes()
    at.file_uploader[0].set_value([("twelfth_night.txt", play, "text/plain")])
    by_label(at.text_input, "Dataset name").set_value("uploaded-play")
    by_label(at.number_input, "Vocabulary size").set_value(512)
    by_label(at.number_input, "Tokens per packed row").set_value(64)
    at.run()
    by_label(at.button, "Prepare dataset").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    sid = at.session_state["jobs_selected"]
    client = JobClient(ray_cluster.dashboard_url)
    assert client.wait(sid, timeout_s=300) == "SUCCEEDED", client.tail(sid, 40)
    out = paths.home() / "datasets" / "uploaded-play"
    assert (paths.home() / "uploads" / "uploaded-play" / "twelfth_night.txt").read_bytes() == play
    at.run()
    assert str(out) in by_label(at.selectbox, "Dataset").options


def test_uploaded_instruction_rows_become_an_sft_dataset(dashboard_env, ray_cluster):
    """The upload form's SFT format: rows + a built-in template -> a prepare job whose
    dataset has the target mask and the template that travels with it."""
    import json

    from lmforge import paths
    from tests.sft_task import copy_rows

    rows = "".join(json.dumps(r) + "\n" for r in copy_rows(80, seed=3)).encode()
    at = new_app()
    by_label(at.radio, "Format").set_value("Instruction rows (SFT)")
    at.run()
    at.file_uploader[0].set_value([("rows.jsonl", rows, "application/jsonl")])
    by_label(at.text_input, "Dataset name").set_value("uploaded-rows")
    by_label(at.number_input, "Vocabulary size").set_value(300)
    by_label(at.selectbox, "Template").set_value("instruct")
    by_label(at.number_input, "Longest example (tokens)").set_value(64)
    at.run()
    by_label(at.button, "Prepare dataset").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    client = JobClient(ray_cluster.dashboard_url)
    sid = at.session_state["jobs_selected"]
    assert client.wait(sid, timeout_s=300) == "SUCCEEDED", client.tail(sid, 40)
    out = paths.home() / "datasets" / "uploaded-rows"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data_format"] == "sft" and manifest["sft"]["rows"] == 80, manifest
    assert manifest["sft"]["target_tokens"] < manifest["tokens"]  # prompts are no targets
    assert json.loads((out / "template.json").read_text())["name"] == "instruct"
    at.run()
    assert str(out) in by_label(at.selectbox, "Dataset").options


def test_a_job_that_fails_says_why_on_the_jobs_page(dashboard_env, ray_cluster, dataset):
    """Valid by the schema, refused by the job's own checks: the dataset is too short."""
    at = new_app()
    by_label(at.selectbox, "Dataset").set_value(str(dataset))
    by_label(at.number_input, "Context").set_value(100_000)
    at.run()
    by_label(at.button, "Submit job").click()
    at.run()
    assert not at.error, [e.value for e in at.error]
    sid = at.session_state["jobs_selected"]
    assert JobClient(ray_cluster.dashboard_url).wait(sid, timeout_s=300) == "FAILED"
    at.switch_page("pages/jobs.py")
    at.run()
    assert not at.exception
    (err,) = [e.value for e in at.error]
    assert err.startswith("The job failed: model.context_length=100000: too long for"), err


def test_the_run_column_names_the_jobs_mlflow_run(dashboard_env, ray_cluster):
    """The MLflow run tagged with the job's submission id (as the launcher tags it) names
    the job's run; without one, the job's metadata does; a Ray driver points to submit."""
    from lmforge.jobspec import JobSpec

    client = JobClient(ray_cluster.dashboard_url)
    tagged = client.submit(JobSpec("python -c 'print(1)'", {}))  # no lmforge metadata
    named = client.submit(JobSpec("python -c 'print(2)'", {}, {"lmforge.run_name": "from-meta"}))
    uri = store.resolve_uri()
    mlflow = store.client(uri)
    exp = store.ensure_experiment(mlflow, "dash-run-column", uri)
    mlflow.create_run(exp, run_name="from-mlflow", tags={"ray.submission_id": tagged})
    at = new_app()
    at.switch_page("pages/jobs.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    run = dict(zip(table["job"], table["run"], strict=True))
    assert (run[tagged], run[named]) == ("from-mlflow", "from-meta")
    # This test process is a Ray driver (the session fixture connected it): no log, but a hint.
    driver = next(j.job_id for j in client.jobs() if j.kind == "DRIVER" and not j.finished)
    by_label(at.selectbox, "Job").set_value(driver)
    at.run()
    assert not at.code
    assert any("`lmforge submit`" in c.value and "no log here" in c.value for c in at.caption)


def test_jobs_page_lists_the_job_with_its_log_and_run(launched):
    at, sid = launched
    at.switch_page("pages/jobs.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[0].value
    row = table[table["job"] == sid].iloc[0]
    assert row["status"] == "SUCCEEDED" and row["kind"] == "train"
    assert any("SUCCEEDED" in h.value for h in at.subheader)
    (log,) = at.code
    assert "step      6/6" in log.value and "checkpoint step 6" in log.value
    assert any(b.label == "Open its curves" for b in at.button)  # its MLflow run was found
    assert not any(b.label == "Stop job" for b in at.button)  # finished: nothing to stop


def test_runs_page_draws_the_runs_curves_and_config(launched):
    at, sid = launched
    run = browse.run_for_submission(store.resolve_uri(), sid)
    assert run is not None and run.experiment == EXPERIMENT
    at.session_state["runs_selected"] = [run.run_id]
    at.switch_page("pages/runs.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert by_label(at.multiselect, "Runs").value == [run.run_id]
    chart = at.get("plotly_chart")[0]
    import json

    fig = json.loads(chart.proto.spec)
    losses = [
        t for t in fig["data"] if "loss" in t["hovertemplate"] and "val" not in t["hovertemplate"]
    ]
    assert losses and losses[0]["x"] == list(range(1, 7))  # one point per step 1..6
    assert any("train:\n  max_steps: 6" in c.value for c in at.code)


def test_models_page_lists_versions_and_sets_an_alias(launched):
    at, _ = launched
    at.switch_page("pages/models.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    by_label(at.selectbox, "Registered model").set_value(EXPERIMENT)
    at.run()
    table = at.dataframe[0].value
    assert sorted(table["step"]) == [3, 6]
    assert "latest" in table[table["step"] == 6].iloc[0]["aliases"]
    by_label(at.selectbox, "Version").set_value(int(table[table["step"] == 3].iloc[0]["version"]))
    by_label(at.text_input, "Alias").set_value("candidate")
    at.run()
    by_label(at.button, "Set alias").click()
    at.run()
    assert not at.exception
    rows = {v.step: v for v in browse.versions(store.resolve_uri(), EXPERIMENT)}
    assert "candidate" in rows[3].aliases
    by_label(at.text_input, "Alias").set_value("latest")
    at.run()
    by_label(at.button, "Set alias").click()
    at.run()
    assert any("reserved" in e.value for e in at.error)


def test_playground_generates_and_compares_and_cuts_a_long_prompt(launched):
    at, _ = launched
    at.switch_page("pages/playground.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    by_label(at.selectbox, "A: model").set_value(EXPERIMENT)
    at.run()
    by_label(at.toggle, "Compare two versions side by side").set_value(True)
    at.run()
    by_label(at.selectbox, "B: model").set_value(EXPERIMENT)
    by_label(at.selectbox, "B: version").set_value("@latest")
    by_label(at.number_input, "Max new tokens").set_value(20)
    by_label(at.text_area, "Prompt").set_value("ROMEO: " * 100)  # far over the 64-token context
    by_label(at.button, "Generate").click()
    at.run(timeout=120)
    assert not at.exception and not at.error, [e.value for e in at.error]
    notices = [i.value for i in at.info if "kept its last 63 tokens" in i.value]
    assert len(notices) == 2  # one per side
    texts = [t.value for t in at.text]
    assert len(texts) == 2 and all(t.startswith("ROMEO: ROMEO:") for t in texts)
    assert all(len(t) > len("ROMEO: " * 100) for t in texts)
    # Same seed, and @best and @latest are versions of one run: each side says which it used.
    assert any("@best" in m.value for m in at.markdown) and any(
        "@latest" in m.value for m in at.markdown
    )


def test_playground_chat_two_turns_samples_and_colours(launched):
    at, _ = launched
    at.switch_page("pages/playground.py")
    at.run()
    by_label(at.selectbox, "A: model").set_value(EXPERIMENT)
    by_label(at.radio, "Mode").set_value("Chat")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    # A version trained on plain text has no template of its own: chat is the default.
    assert by_label(at.selectbox, "Template").value == "chat"
    by_label(at.number_input, "Max new tokens").set_value(8)
    at.chat_input[0].set_value("Good morrow").run(timeout=120)
    at.chat_input[0].set_value("And to you?").run(timeout=120)
    assert not at.exception and not at.error, [e.value for e in at.error]
    history = at.session_state[f"chat:models:/{EXPERIMENT}@best"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in history[::2]] == ["Good morrow", "And to you?"]
    # The preview is the exact text of the next turn: both turns in the chat template.
    preview = at.code[-1].value
    assert preview.startswith("<|user|>\nGood morrow\n<|assistant|>\n")
    assert "<|user|>\nAnd to you?\n<|assistant|>\n" in preview
    assert preview.endswith("<|user|>\n…\n<|assistant|>")  # st.code drops the last newline
    by_label(at.button, "Clear the conversation").click().run()
    assert at.session_state[f"chat:models:/{EXPERIMENT}@best"] == []

    # Complete mode: three samples side by side, shaded by probability, in a template.
    by_label(at.radio, "Mode").set_value("Complete")
    at.run()
    by_label(at.selectbox, "Template").set_value("instruct")
    by_label(at.number_input, "Samples").set_value(3)
    by_label(at.toggle, "Colour by probability").set_value(True)
    by_label(at.text_area, "Prompt").set_value("Name a king.")
    at.run()
    assert at.code[-1].value == "### Instruction:\nName a king.\n\n### Response:"
    by_label(at.button, "Generate").click().run(timeout=120)
    assert not at.exception and not at.error, [e.value for e in at.error]
    shaded = [h.proto.body for h in at.get("html")]
    assert len(shaded) == 3 and all("hsl(" in h and "title=" in h for h in shaded)


def test_fine_tune_from_a_version_then_stop_the_job(launched, ray_cluster):
    at, _ = launched
    at.switch_page("pages/models.py")
    at.run()
    by_label(at.selectbox, "Registered model").set_value(EXPERIMENT)
    at.run()
    version = by_label(at.selectbox, "Version").value
    by_label(at.button, "Fine-tune from it").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any(f"Fine-tuning from `models:/{EXPERIMENT}/{version}`" in i.value for i in at.info)
    at.switch_page("pages/launch.py")  # AppTest stays on the page it was told, unlike a browser
    by_label(at.number_input, "Steps").set_value(100_000)
    by_label(at.number_input, "Warm-up steps").set_value(1)
    at.run()
    by_label(at.button, "Submit job").click()
    at.run()
    assert not at.error, [e.value for e in at.error]
    code = at.code[0].value
    assert code.endswith(f"--init-from models:/{EXPERIMENT}/{version}")
    assert "run.name=run-" in code  # a new run, not the source's
    sid = at.session_state["jobs_selected"]

    at.switch_page("pages/jobs.py")
    at.run()
    assert by_label(at.selectbox, "Job").value == sid
    by_label(at.button, "Stop job").click()
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    client = JobClient(ray_cluster.dashboard_url)
    assert client.wait(sid, timeout_s=120) == "STOPPED"
    at.run()
    assert not any(b.label == "Stop job" for b in at.button)
    assert any("STOPPED" in h.value for h in at.subheader)
    at.session_state["launch_from"] = None  # leave the Launch page as it was
