"""The dashboard's Launch page in Streamlit's AppTest (no Ray needed until Submit)."""

from __future__ import annotations

import sys
import typing

import pytest
from pydantic import TypeAdapter, ValidationError
from streamlit.testing.v1 import AppTest

from lmforge import models, paths
from lmforge.config import Config, load_config
from lmforge.estimate import estimate, human_bytes
from tests.conftest import REPO

APP = str(REPO / "dashboard" / "app.py")


@pytest.fixture
def app(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "dashboard"))
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("RAY_JOBS_ADDRESS", "http://127.0.0.1:9")  # nothing listens there
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    assert not at.exception, at.exception
    return at


def fake_dataset(root, vocab=512):
    """Just enough of a dataset dir for the form to list it and read its vocab."""
    import json

    from lmforge.tokenizer import file_sha256, train_tokenizer

    d = root / "datasets" / "mini"
    d.mkdir(parents=True)
    train_tokenizer(["to be or not to be"] * 50, vocab).save(str(d / "tokenizer.json"))
    manifest = {
        "format": "lmforge-dataset/1",
        "tokenizer": {"sha256": file_sha256(d / "tokenizer.json"), "vocab_size": vocab},
        "splits": {"train": {"shards": [], "tokens": 0}, "val": {"shards": [], "tokens": 0}},
    }
    (d / "manifest.json").write_text(json.dumps(manifest))
    return d


def by_label(widgets, label):
    (w,) = [w for w in widgets if w.label == label]
    return w


def test_an_invalid_value_is_shown_next_to_its_field_and_nothing_can_be_submitted(app):
    by_label(app.number_input, "Heads").set_value(3)  # 64 is not divisible by 3
    app.run()
    assert not app.exception
    errors = [e.value for e in app.error]
    assert any("model.d_model" in e and "not divisible by model.n_head=3" in e for e in errors)
    assert by_label(app.button, "Submit job").disabled
    assert not app.metric  # no estimate for a config that does not validate


def schema_field(key):
    section, leaf = key.split(".")
    return Config.model_fields[section].annotation.model_fields[leaf]


def accepts(key, value) -> bool:
    """Whether the schema's own check of field `key` (its type and bounds) takes `value`."""
    f = schema_field(key)
    try:
        TypeAdapter(typing.Annotated[(f.annotation, *f.metadata)]).validate_python(value)
    except ValidationError:
        return False
    return True


def test_the_form_takes_bounds_help_and_choices_from_the_schema(app):
    """Nothing of the schema is copied into the page: a number field's bounds are where the
    schema starts refusing, every field's help is its description, a choice's options are
    the schema's Literal."""
    widgets = [*app.number_input, *app.selectbox, *app.text_input, *app.toggle]
    keyed = {w.key[2:]: w for w in widgets if (w.key or "").startswith("f_")}
    numbers = [w for w in keyed.values() if w.type == "number_input"]
    # (scaling.num_workers is two inputs, Workers and "Elastic: at most": see below)
    assert len(numbers) >= 13 and "train.precision" in keyed
    for key, w in keyed.items():
        if key not in ("preset", "data.path"):
            assert w.help == schema_field(key).description, key
    assert keyed["data.path"].help.startswith(schema_field("data.path").description)
    for w in numbers:
        key = w.key[2:]
        eps = 1 if schema_field(key).annotation is int else 1e-6
        assert not accepts(key, w.min - eps) and accepts(key, w.min + eps), key
        if w.max is None:
            assert accepts(key, 10**9), key
        else:
            assert not accepts(key, w.max + eps) and accepts(key, w.max - eps), key
    precision = typing.get_args(schema_field("train.precision").annotation)
    assert keyed["train.precision"].options == list(precision)
    assert [int(s) for s in keyed["zero.stage"].options] == [
        s for s in range(-1, 5) if accepts("zero.stage", s)
    ]


def test_a_value_the_schema_refuses_is_shown_as_an_error(app):
    by_label(app.number_input, "Learning rate").set_value(0.0)  # the schema wants lr > 0
    app.run()
    assert not app.exception
    errors = [e.value for e in app.error]
    assert any(e.startswith("`train.lr`") and "greater than 0" in e for e in errors), errors
    assert by_label(app.button, "Submit job").disabled


def test_the_estimate_follows_the_form(app, tmp_path):
    fake_dataset(tmp_path)
    app.run()
    assert by_label(app.selectbox, "Dataset").value == str(tmp_path / "datasets" / "mini")
    mem = {m.label: m.value for m in app.metric}
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["model.vocab_size=512"])
    n = sum(p.numel() for p in models.build(cfg.model).parameters())  # the job's model
    assert mem["Parameters"] == f"{n / 1e6:,.2f} M"
    assert "Memory per worker, ZeRO 2" in mem
    by_label(app.selectbox, "ZeRO stage").set_value(3)
    app.run()
    stage3 = load_config(
        REPO / "jobs" / "configs" / "tiny.yaml",
        ["model.vocab_size=512", f"data.path={tmp_path}/datasets/mini", "zero.stage=3"],
    )
    want = human_bytes(estimate(stage3).per_worker_bytes["total"])
    assert {m.label: m.value for m in app.metric}["Memory per worker, ZeRO 3"] == want
    by_label(app.number_input, "Workers").set_value(4)
    app.run()
    assert {m.label: m.value for m in app.metric}["Tokens per step"] == f"{8 * 64 * 4:,}"


def test_elastic_workers_from_the_two_worker_inputs(app, tmp_path):
    """ "Elastic: at most" above Workers makes num_workers [Workers, at most]: the estimate's
    memory is the fewest workers', its tokens per step the most's."""
    fake_dataset(tmp_path)
    app.run()
    least, most = (
        by_label(app.number_input, "Workers"),
        by_label(app.number_input, "Elastic: at most"),
    )
    assert (least.value, most.value) == (2, 2)  # tiny.yaml: 2 workers, fixed
    assert least.help == schema_field("scaling.num_workers").description
    fixed_mem = {m.label: m.value for m in app.metric}["Memory per worker, ZeRO 2"]
    most.set_value(4)
    app.run()
    assert not app.exception and not app.error
    shown = {m.label: m.value for m in app.metric}
    assert shown["Tokens per step"] == f"{8 * 64 * 4:,}"
    assert shown["Memory per worker, ZeRO 2"] == fixed_mem  # ZeRO over 2 workers, the fewest


def test_submit_against_an_unreachable_ray_shows_one_line_not_a_traceback(app, tmp_path):
    fake_dataset(tmp_path)
    app.run()
    by_label(app.button, "Submit job").click()
    app.run()
    assert not app.exception
    (err,) = [e.value for e in app.error]
    assert "not reachable" in err and "127.0.0.1:9" in err
    assert paths.home() == tmp_path


def test_every_page_loads_without_a_traceback_when_nothing_is_there(app):
    for page in ("jobs", "runs", "models", "playground"):
        app.switch_page(f"pages/{page}.py")
        app.run()
        assert not app.exception, (page, app.exception)
        shown = [e.value for e in app.error] + [i.value for i in app.info]
        assert shown, page  # an explanation, not a blank page


def test_the_dashboard_imports_no_deepspeed_or_ray_train():
    """Layering: pages talk to the Jobs API and MLflow only."""
    import subprocess

    code = (
        "import sys; sys.path.insert(0, 'dashboard');"
        "import lmforge.jobclient, lmforge.jobspec, lmforge.launch_form, lmforge.tracking.browse,"
        " lmforge.playground;"
        "import charts, ui;"
        "bad = [m for m in ('deepspeed', 'ray.train') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_pages_say_when_mlflow_or_ray_is_down(app, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    for page in ("jobs", "runs", "models", "playground"):
        app.switch_page(f"pages/{page}.py")
        app.run()
        assert not app.exception, (page, app.exception)
        (err,) = [e.value for e in app.error]
        assert "127.0.0.1:9" in err, (page, err)


def test_the_form_shows_the_settings_of_the_chosen_architecture(app):
    labels = {w.label for w in app.number_input}
    assert "Heads" in labels and "Key/value heads" not in labels  # gpt2: no such settings
    by_label(app.selectbox, "Architecture").set_value("llama")
    app.run()
    assert not app.exception, app.exception
    assert {"Key/value heads", "MLP width", "RoPE base", "Norm epsilon"} <= {
        w.label for w in app.number_input
    }
    assert by_label(app.number_input, "Key/value heads").value is None  # the arch's default
    by_label(app.number_input, "Heads").set_value(4)
    by_label(app.number_input, "Key/value heads").set_value(3)
    app.run()
    errors = [e.value for e in app.error]
    assert any("model.n_kv_head=3 does not divide model.n_head=4" in e for e in errors), errors
    by_label(app.selectbox, "Architecture").set_value("lstm")
    app.run()
    assert not app.exception, app.exception
    labels = {w.label for w in app.number_input}
    assert "Heads" not in labels and "Key/value heads" not in labels
    assert not [e.value for e in app.error if "n_kv_head" in e.value]  # not carried over


def test_several_datasets_with_weights_make_a_mixture(app, tmp_path):
    """ "Mix with": two datasets and their weights become data.sources; the estimate says
    each source's share, tokens and epochs, and the job carries the mixture."""
    import shutil

    from lmforge import jobspec, launch_form

    mini = fake_dataset(tmp_path)
    other = shutil.copytree(mini, mini.parent / "other")
    app.run()
    by_label(app.multiselect, "Mix with (a mixture by token weight)").set_value(
        [str(mini), str(other)]
    )
    app.run()
    by_label(app.number_input, "Weight of mini").set_value(3.0)
    app.run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    (line,) = [c.value for c in app.caption if c.value.startswith("mixture at step 0")]
    assert "mini 75% (" in line and "other 25% (" in line
    values = {"data.sources": [{"path": str(mini), "weight": 3.0, "name": "mini"},
                               {"path": str(other), "weight": 1.0, "name": "other"}]}  # fmt: skip
    cfg, errors = launch_form.form_config({}, values)
    assert not errors
    spec = jobspec.train_job(cfg)
    assert f"data.sources=[mini:3.0:{mini},other:1.0:{other}]" in spec.entrypoint


def test_dpo_offers_its_loss_and_settings_and_needs_a_version_to_start_from(app, tmp_path):
    """Objective dpo: the preference loss, beta (and SimPO's gamma); without a version to
    start from (the reference) the page says so next to the objective and cannot submit;
    Fine-tune from a version, the job carries the objective and --init-from."""
    from lmforge import jobspec, launch_form

    fake_dataset(tmp_path)
    app.run()
    assert not [w for w in app.selectbox if w.label == "Preference loss"]  # lm: none
    by_label(app.selectbox, "Objective (lm, or dpo on preference pairs)").set_value("dpo")
    app.run()
    by_label(app.selectbox, "Preference loss").set_value("simpo")
    app.run()
    assert not app.exception
    assert by_label(app.number_input, "Beta").value == pytest.approx(0.1)  # the schema's
    assert by_label(app.number_input, "SimPO gamma").value is not None
    (err,) = [e.value for e in app.error]
    assert err.startswith("`train.objective`: dpo starts from a version")
    assert by_label(app.button, "Submit job").disabled

    values = {"train.objective": "dpo", "train.dpo.loss": "simpo", "train.dpo.beta": 0.2}
    cfg, errors = launch_form.form_config({}, values)
    assert not errors
    spec = jobspec.train_job(cfg, init_from="models:/base@latest")
    for part in ("train.objective=dpo", "train.dpo.loss=simpo", "train.dpo.beta=0.2",
                 "--init-from models:/base@latest"):  # fmt: skip
        assert part in spec.entrypoint, spec.entrypoint
