"""Job specs: built from validated values only, read back by the job as the same config."""

from __future__ import annotations

import shlex

import pytest

from lmforge.cli import build_parser
from lmforge.config import load_config
from lmforge.jobspec import JobSpecError, inside_roots, prepare_job, safe_token, train_job
from lmforge.tracking.registry import RegistryError
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "tiny.yaml"


@pytest.fixture(autouse=True)
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.delenv("LMFORGE_DATA_ROOTS", raising=False)
    (tmp_path / "datasets" / "plays").mkdir(parents=True)
    return tmp_path


def job_config(spec):
    """What jobs/train.py makes of the entrypoint: parse it exactly as the job does."""
    argv = shlex.split(spec.entrypoint)
    assert argv[:3] == ["exec", "python", "jobs/train.py"]
    args = build_parser().parse_args(["train", *argv[3:]])
    return load_config(args.config, args.overrides), args


def test_the_job_reads_back_exactly_the_validated_config(home):
    cfg = load_config(TINY, [
        "data.path=datasets/plays", "train.lr=1e-5", "train.min_lr=1e-6", "zero.stage=3",
        "scaling.cpus_per_worker=0.5", "run.name=r1", "tracking.experiment=exp.v2",
    ])  # fmt: skip
    spec = train_job(cfg, tracking_uri=f"sqlite:///{home}/mlflow/mlflow.db")
    back, args = job_config(spec)
    want = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"path": str(home / "datasets" / "plays")}),
            "tracking": cfg.tracking.model_copy(
                update={"tracking_uri": f"sqlite:///{home}/mlflow/mlflow.db"}
            ),
        }
    )
    assert back == want
    assert args.resume is False and args.init_from is None
    assert spec.metadata == {
        "lmforge.kind": "train", "lmforge.run_name": "r1", "lmforge.experiment": "exp.v2"
    }  # fmt: skip
    assert spec.runtime_env["working_dir"] == str(REPO)
    assert spec.runtime_env["py_modules"] == [str(REPO / "platform" / "lmforge")]


@pytest.mark.parametrize(
    "override",
    [
        "tracking.experiment=x; rm -rf ~",
        "tracking.experiment=$(touch /tmp/pwned)",
        "tracking.experiment=a`id`",
        "tracking.experiment=a|b",
        "tracking.experiment=a && b",
        "tracking.experiment=a>b",
        'tracking.experiment=a"b',
        "tracking.experiment=a\\b",
    ],
)
def test_shell_metacharacters_in_a_user_field_are_refused(override):
    cfg = load_config(TINY, ["data.path=datasets/plays", override, "tracking.registered_model=m"])
    with pytest.raises(JobSpecError, match=r"^tracking\.experiment: .* not allowed in a job"):
        train_job(cfg)


@pytest.mark.parametrize("path", ["/etc", "datasets/../../etc", "/tmp", "s3://bucket/data"])
def test_a_dataset_outside_the_data_roots_is_refused(path):
    cfg = load_config(TINY, [f"data.path={path}"])
    with pytest.raises(JobSpecError, match=r"^data\.path="):
        train_job(cfg)


def test_a_symlink_out_of_the_roots_is_refused(home, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (home / "datasets" / "sneaky").symlink_to(outside)
    with pytest.raises(JobSpecError, match="outside the allowed data roots"):
        inside_roots("datasets/sneaky", "data.path")


def test_data_roots_come_from_the_environment(monkeypatch, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("shared")
    monkeypatch.setenv("LMFORGE_DATA_ROOTS", str(elsewhere))
    assert inside_roots(elsewhere / "ds", "data.path") == elsewhere / "ds"
    with pytest.raises(JobSpecError):
        inside_roots("datasets/plays", "data.path")


def test_values_that_would_read_back_differently_are_refused():
    assert safe_token("train.lr", 1e-5) == "train.lr=1.0e-05"  # YAML reads 1e-05 as a string
    assert safe_token("run.name", None) == "run.name=null"
    with pytest.raises(JobSpecError, match="read back as a different value"):
        safe_token("run.name", "123")  # would become the integer 123
    with pytest.raises(JobSpecError, match="read back as a different value"):
        safe_token("run.name", "true")


def test_resume_and_init_from_take_registry_uris_only():
    cfg = load_config(TINY, ["data.path=datasets/plays"])
    _, args = job_config(train_job(cfg, resume="models:/tiny/3"))
    assert args.resume == "models:/tiny/3"
    _, args = job_config(train_job(cfg, init_from="models:/tiny@best"))
    assert args.init_from == "models:/tiny@best"
    with pytest.raises(RegistryError):
        train_job(cfg, init_from="/etc/passwd")


def test_prepare_job_paths_stay_inside_the_roots(home):
    spec = prepare_job([home / "uploads" / "c"], "datasets/c", vocab_size=512, seq_tokens=64)
    argv = shlex.split(spec.entrypoint)
    assert argv[:3] == ["exec", "python", "jobs/prepare.py"]
    args = build_parser().parse_args(["prepare", *argv[3:]])
    assert args.input == [str(home / "uploads" / "c")]
    assert args.output == str(home / "datasets" / "c")
    assert (args.vocab_size, args.seq_tokens) == (512, 64)
    with pytest.raises(JobSpecError, match="^input="):
        prepare_job(["/etc"], "datasets/c")
    with pytest.raises(ValueError, match="--vocab-size"):
        prepare_job([home / "uploads" / "c"], "datasets/c", vocab_size=10)
    assert args.format == "text" and args.template is None


def test_prepare_job_for_instruction_rows_parses_as_lmforge_prepare_would(home):
    from lmforge import templates
    from lmforge.errors import UsageError
    from lmforge.jobspec import DASHBOARD_TEMPLATES

    assert set(DASHBOARD_TEMPLATES) < set(templates.NAMES)  # built-in names, few-shot left out
    spec = prepare_job(
        [home / "uploads" / "c"], "datasets/c", seq_tokens=128,
        data_format="sft", template="instruct", prompt_policy="cut-prompt",
    )  # fmt: skip
    args = build_parser().parse_args(["prepare", *shlex.split(spec.entrypoint)[3:]])
    assert (args.format, args.template, args.prompt_policy) == ("sft", "instruct", "cut-prompt")
    with pytest.raises(UsageError, match="--format sft needs --template"):
        prepare_job([home / "uploads" / "c"], "datasets/c", data_format="sft")
    with pytest.raises(JobSpecError, match="template 'few-shot': one of plain, instruct"):
        prepare_job([home / "uploads" / "c"], "datasets/c", data_format="sft", template="few-shot")
