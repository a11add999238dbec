"""The Launch form's logic: fields as the schema has them, uploads, errors under their keys."""

from __future__ import annotations

import pytest

from lmforge.config import Config
from lmforge.jobspec import JobSpecError
from lmforge.launch_form import form_config, form_field, preset_config, presets, save_upload


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.delenv("LMFORGE_DATA_ROOTS", raising=False)
    return tmp_path


@pytest.fixture
def tiny():
    return preset_config(presets()["tiny"])


def refused(base, key, value) -> bool:
    """Whether the schema files an error under `key` for this form value."""
    _, errors = form_config(base, {key: value})
    return key in errors


def test_bounds_are_where_the_schema_starts_refusing(tiny):
    layers = form_field("model.n_layer")
    assert (layers.type, layers.max) == (int, None)
    assert not refused(tiny, "model.n_layer", layers.min)
    assert refused(tiny, "model.n_layer", layers.min - 1)
    assert not refused(tiny, "model.n_layer", 10**6)  # no upper bound in the schema either
    stage = form_field("zero.stage")
    assert [v for v in range(-2, 6) if not refused(tiny, "zero.stage", v)] == list(
        range(stage.min, stage.max + 1)
    )
    lr = form_field("train.lr")  # 0 < lr <= 1: the exclusive bound is the bound itself
    assert lr.type is float and refused(tiny, "train.lr", lr.min)
    assert not refused(tiny, "train.lr", lr.max) and refused(tiny, "train.lr", lr.max * 1.01)


def test_defaults_help_and_choices_are_the_schemas(tiny):
    assert form_field("train.lr").default == Config().train.lr
    assert form_field("model.vocab_size").default is None  # `int | None`: an int field
    assert form_field("model.vocab_size").type is int
    assert (
        form_field("train.lr").help
        == Config.model_fields["train"].annotation.model_fields["lr"].description
    )
    precision = form_field("train.precision")
    assert precision.type is str
    gpu = {**tiny, "scaling": {**tiny.get("scaling", {}), "use_gpu": True}}  # fp16 needs one
    assert all(not refused(gpu, "train.precision", p) for p in precision.choices)
    assert refused(gpu, "train.precision", "fp8")
    for key in ("train.nope", "nope.lr", "train.lr.x"):
        with pytest.raises(KeyError, match=key):
            form_field(key)


def test_uploads_keep_to_their_folder(home):
    corpus, out = save_upload("mine", [("a.txt", b"to be"), ("b.jsonl", b'{"text": "x"}\n')])
    assert corpus == home / "uploads" / "mine" and out == home / "datasets" / "mine"
    assert (corpus / "a.txt").read_bytes() == b"to be"
    for bad in ["../evil.txt", "a b.txt", "x.sh", ".hidden.txt"]:
        with pytest.raises(JobSpecError):
            save_upload("mine", [(bad, b"")])
    with pytest.raises(JobSpecError, match="dataset name"):
        save_upload("../up", [("a.txt", b"")])


def test_form_errors_are_filed_under_their_keys(tiny):
    cfg, errors = form_config(tiny, {"model.n_head": 3, "train.lr": 0, "zero.stage": 7})
    assert cfg is None
    assert set(errors) == {"model.d_model", "train.lr", "zero.stage"}
    cfg, errors = form_config(tiny, {"model.n_head": 3})
    assert cfg is None and set(errors) == {"model.d_model"}
    assert "not divisible by model.n_head=3" in errors["model.d_model"]
    cfg, errors = form_config(tiny, {"train.max_steps": 7})
    assert errors == {} and cfg.train.max_steps == 7
