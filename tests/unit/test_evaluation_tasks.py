"""Evaluation task files checked before any work (issue 26), and `lmforge evaluate --tasks`:
its table (a column per model) and the scores it logs on a version."""

import json
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lmforge.cli import main  # noqa: E402
from lmforge.evaluation import TaskError, check_tasks  # noqa: E402
from tests.unit import evaltasks  # noqa: E402
from tests.unit.test_evaluation_lm import hf_folder, tokenizer_file  # noqa: E402, F401

ROWS = [{"prompt": "a b =", "completion": " b", "choices": [" a", " b"], "label": 1}] * 4


def _refused(spec, match: str) -> str:
    with pytest.raises(TaskError) as err:
        check_tasks(spec)
    text = str(err.value)
    assert match in text, text
    assert "\n" not in text
    return text


def test_good_task_files_pass_and_name_their_tasks(tmp_path):
    data = evaltasks.write_rows(tmp_path / "rows.jsonl", ROWS)
    files = [
        evaltasks.generative(tmp_path, "g", data),
        evaltasks.multiple_choice(tmp_path, "m", data),
    ]
    sources = check_tasks(",".join(map(str, files)))
    assert [(s.name, s.file) for s in sources] == [("g", files[0]), ("m", files[1])]


def test_harness_task_names_are_known_and_a_typo_gets_the_close_names(tmp_path):
    """A standard task by name (its data is fetched where the harness can reach it; here
    only its name is checked) beside a task file; a misspelt one is refused with a hint."""
    data = evaltasks.write_rows(tmp_path / "rows.jsonl", ROWS)
    g = evaltasks.generative(tmp_path, "g", data)
    sources = check_tasks(f"{g},arc_easy")
    assert [(s.name, s.file) for s in sources] == [("g", g), ("arc_easy", None)]
    text = _refused(f"{g},arc_eazy", "evaluation task 'arc_eazy': not a task of lm-evaluation")
    assert text.endswith("did you mean arc_easy?") or "did you mean arc_easy," in text, text


def test_bad_task_files_are_named_with_their_line(tmp_path):
    data = evaltasks.write_rows(tmp_path / "rows.jsonl", ROWS)
    good = evaltasks.generative(tmp_path, "g", data).read_text()
    bad = tmp_path / "bad.yaml"

    bad.write_text(good.replace("test_split: test", "test_split: [test"))
    _refused(str(bad), f"{bad}:7: not valid YAML")
    bad.write_text(good.replace("doc_to_text:", "doc_to_txt:"))
    _refused(str(bad), f"{bad}:8: unknown key 'doc_to_txt'")
    bad.write_text(good.replace("metric: bleu", "metric: bleuu"))
    _refused(str(bad), f"{bad}:17: unknown metric 'bleuu'")
    bad.write_text(good.replace("output_type: generate_until", "output_type: generate"))
    _refused(str(bad), f"{bad}:7: output_type 'generate' is not one of")
    bad.write_text(good.replace(str(data), str(tmp_path / "nope.jsonl")))
    _refused(str(bad), f"{bad}:5: data file {tmp_path / 'nope.jsonl'} not found")
    _refused(str(tmp_path / "missing.yaml"), "missing.yaml: task file not found")
    _refused("", "no evaluation task given")

    # Rows: not JSON, not an object, a field the templates read is missing.
    rows = tmp_path / "rows2.jsonl"
    bad.write_text(good.replace(str(data), str(rows)))
    rows.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion"\n')
    _refused(str(bad), f"{rows}:3: not a JSON line")
    rows.write_text('{"prompt": "a", "completion": "b"}\n["a", "b"]\n')
    _refused(str(bad), f"{rows}:2: a row must be a JSON object")
    rows.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    _refused(str(bad), f"{rows}:2: doc_to_target of {bad} reads a field this row lacks")
    mc = evaltasks.multiple_choice(tmp_path, "m", data)
    mc.write_text(mc.read_text().replace("doc_to_target: label", "doc_to_target: lable"))
    _refused(str(mc), f"{data}:1: doc_to_target of {mc} names the field 'lable'")
    twice = evaltasks.generative(tmp_path, "g", data)
    _refused(f"{twice},{twice}", "task 'g' is given twice")


def test_cli_refuses_a_bad_task_before_reading_any_model(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: x\nmetric_list:\n  - metric: nope\n")
    code = main(["evaluate", "--checkpoint", str(tmp_path / "no-ckpt"), "--tasks", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (
        f"lmforge evaluate: error: {bad}:3: unknown metric 'nope' (known: "
        + err.split("(known: ", 1)[1]
    )


def test_cli_prints_one_table_and_logs_scores_on_each_version(
    tmp_path,
    tokenizer_file,  # noqa: F811 - the fixture imported above
    tracking_uri,
    capsys,
    monkeypatch,
):
    from mlflow import MlflowClient

    from lmforge.import_hf import import_hf

    uri = tracking_uri
    for arch in ("gpt2", "llama"):
        import_hf(hf_folder(tmp_path / arch, arch, tokenizer_file), "evalunit", tracking_uri=uri)
    data = evaltasks.write_rows(tmp_path / "rows.jsonl", ROWS)
    gen = evaltasks.generative(tmp_path, "g", data, max_gen=4)
    mc = evaltasks.multiple_choice(tmp_path, "m", data)
    probes = tmp_path / "probes.txt"
    probes.write_text('to be or not\n{"prompt": "the question"}\n')
    args = ["evaluate", "--model", "models:/evalunit/1", "--model", "models:/evalunit/2",
            "--tasks", f"{gen},{mc}", "--limit", "3", "--tracking-uri", uri,
            "--probes", str(probes), "--probe-samples", "1"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    head = out.index(next(line for line in out if line.startswith("task")))
    assert out[head].split() == ["task", "metric", "models:/evalunit/1", "models:/evalunit/2"]
    body = {tuple(line.split()[:2]) for line in out[head + 2 : head + 8]}
    assert body == {("g", "exact_match"), ("g", "bleu"), ("g", "chrf"), ("g", "rougeL"),
                    ("m", "acc"), ("m", "acc_norm")}  # fmt: skip
    assert out[-1] == "logged to models:/evalunit/1, models:/evalunit/2"
    c = MlflowClient(uri)
    for version in ("1", "2"):
        v = c.get_model_version("evalunit", version)
        assert 0.0 <= float(v.tags["eval.m.acc"]) <= 1.0 and "eval.g.bleu" in v.tags
        history = c.get_metric_history(v.run_id, "eval/m/acc")
        assert [(m.step, m.value) for m in history] == [(0, float(v.tags["eval.m.acc"]))]
        results = c.download_artifacts(v.run_id, v.tags["eval.results"], str(tmp_path))
        raw = json.loads(Path(results).read_text())
        assert raw["results"]["m"]["acc,none"] == pytest.approx(float(v.tags["eval.m.acc"]))
        assert raw["n-samples"]["m"]["effective"] == 3
    # Evaluated again: the version's tags are the new values, its run's metric is not logged twice.
    assert main(args[:3] + args[5:11]) == 0
    assert len(c.get_metric_history(c.get_model_version("evalunit", "1").run_id, "eval/m/acc")) == 1

    # best follows the selected score (here the highest m/acc), whatever val_loss says.
    from lmforge.evaluation import record
    from lmforge.tracking import registry

    c.set_model_version_tag("evalunit", "1", "val_loss", "1.0")  # best by val_loss: 1
    c.set_model_version_tag("evalunit", "2", "val_loss", "2.0")
    c.set_model_version_tag("evalunit", "1", "eval.m.acc", "0.25")
    c.set_model_version_tag("evalunit", "2", "eval.m.acc", "0.75")
    registry.update_aliases(c, "evalunit")
    assert str(c.get_model_version_by_alias("evalunit", "best").version) == "1"
    record.set_selection("evalunit", "m/acc", "max", uri)
    registry.update_aliases(c, "evalunit")
    assert str(c.get_model_version_by_alias("evalunit", "best").version) == "2"

    # The Models page: a column per score, each version's probe answers, two side by side.
    from streamlit.testing.v1 import AppTest

    from tests.conftest import REPO
    from tests.unit.test_dashboard_launch import by_label

    monkeypatch.syspath_prepend(str(REPO / "dashboard"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("RAY_JOBS_ADDRESS", "http://127.0.0.1:9")
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=60)
    at.run()
    at.switch_page("pages/models.py")
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    versions = at.dataframe[0].value
    assert {"g/exact_match", "g/bleu", "m/acc", "m/acc_norm"} <= set(versions.columns)
    assert list(versions["m/acc"]) == [0.75, 0.25]  # newest first
    assert any("follows the highest m/acc" in x.value for x in at.caption)
    answers = at.dataframe[1].value
    assert list(answers["prompt"]) == ["to be or not"] * 2 + ["the question"] * 2
    assert list(answers["kind"]) == ["greedy", "sample 1"] * 2
    by_label(at.selectbox, "Side by side with").set_value(
        1 if by_label(at.selectbox, "Answers of version").value == 2 else 2
    )
    at.run()
    assert not at.exception, at.exception
    both = at.dataframe[1].value
    assert {"version 1", "version 2"} <= set(both.columns) and len(both) == 4

    # A checkpoint's evaluation that fails leaves a warning on its version, and no scores;
    # a checkpoint deleted before its turn is skipped.
    from lmforge.evaluation.checkpoints import EvalSettings, evaluate_persisted
    from lmforge.tracking.registry import fetch_checkpoint
    from lmforge.tracking.tracker import RUN_DIR_TAG

    ckpt = fetch_checkpoint("models:/evalunit/1", uri)
    exp = c.get_experiment_by_name("evalunit").experiment_id
    run = c.create_run(exp, tags={RUN_DIR_TAG: str(tmp_path / "runs" / "r")})
    c.create_model_version("evalunit", str(ckpt), run_id=run.info.run_id, tags={"step": "0"})
    s = EvalSettings(tasks=[str(gen)], tracking_uri=uri, experiment="evalunit",
                     registered_model="evalunit", run_dir=str(tmp_path / "runs" / "r"),
                     wait_version_s=5)  # fmt: skip
    data.unlink()  # its data went away after the launch's check
    assert evaluate_persisted(ckpt, s) == {}
    warned = c.get_model_version("evalunit", "3").tags
    assert warned["eval.warning"].startswith("evaluation of step 0 failed: ")
    assert f"data file {data} not found" in warned["eval.warning"]
    assert not any(k.startswith("eval.g.") for k in warned)
    assert evaluate_persisted(tmp_path / "deleted", s) == {}


def test_eval_settings_check_tasks_probes_and_select_before_a_run(tmp_path):
    from lmforge.config import config_from_dict
    from lmforge.errors import LmforgeError
    from lmforge.evaluation.checkpoints import settings_of
    from lmforge.evaluation.probes import ProbeError

    data = evaltasks.write_rows(tmp_path / "rows.jsonl", ROWS)
    gen = evaltasks.generative(tmp_path, "g", data)
    probes = tmp_path / "probes.txt"
    probes.write_text('one\n\n{"prompt": "two"}\n')

    def settings(**e):
        return settings_of(config_from_dict({"eval": e}))

    assert settings() is None  # nothing asked: no evaluation
    s = settings(tasks=[str(gen)], select="g/exact_match", probes=str(probes))
    assert (s.select, s.select_mode, s.probes) == ("g/exact_match", "max", ["one", "two"])
    assert settings(tasks=[str(gen)]).select_mode == "min"  # val_loss
    assert settings(tasks=[str(gen)], select="g/bleu", select_mode="min").select_mode == "min"
    with pytest.raises(
        LmforgeError, match="eval.select='h/acc': task 'h' is not one of eval.tasks"
    ):
        settings(tasks=[str(gen)], select="h/acc")
    probes.write_text('{"prompt": ""}\n')
    with pytest.raises(ProbeError, match=f"{probes}:1: a JSON probe needs"):
        settings(probes=str(probes))
