"""`lmforge submit`: `lmforge train`'s arguments, checked before anything is sent, rendered
as the job `jobs/train.py` parses back; then the job id, the log followed, the job's exit."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest

from lmforge import cli, jobclient
from lmforge.config import load_config
from lmforge.jobspec import JobSpec, JobSpecError
from tests.conftest import REPO

TINY = REPO / "jobs" / "configs" / "tiny.yaml"


def parse(*argv: str):
    return cli.build_parser().parse_args(["submit", "--config", str(TINY), *argv])


def as_the_job_reads_it(spec: JobSpec):
    """(config, args) the way jobs/train.py parses the entrypoint."""
    argv = shlex.split(spec.entrypoint)
    assert argv[:3] == ["exec", "python", "jobs/train.py"]
    args = cli.build_parser().parse_args(["train", *argv[3:]])
    return load_config(args.config, args.overrides), args


def test_submit_takes_the_arguments_of_train_plus_address_and_no_wait():
    args = parse("--set", "train.max_steps=3", "--resume", "--address", "http://h:1", "--no-wait")
    assert (args.command, args.overrides, args.resume) == ("submit", ["train.max_steps=3"], True)
    assert (args.address, args.no_wait, args.init_from) == ("http://h:1", True, None)
    args = parse("--init-from", "models:/tiny@best")
    assert (args.address, args.no_wait, args.resume) == (None, False, False)
    assert args.init_from == "models:/tiny@best"


def test_the_job_reads_back_the_config_checked_here(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    outside = tmp_path / "elsewhere" / "ds"  # `lmforge train` takes any path; so does submit
    args = parse("--set", f"data.path={outside}", "--set", "run.name=r7", "--set", "zero.stage=3")
    spec = cli.submit_spec(args)
    back, job_args = as_the_job_reads_it(spec)
    assert back == load_config(TINY, [f"data.path={outside}", "run.name=r7", "zero.stage=3"])
    assert job_args.resume is False and job_args.init_from is None
    assert spec.metadata == {
        "lmforge.kind": "train", "lmforge.run_name": "r7", "lmforge.experiment": "lmforge"
    }  # fmt: skip
    assert spec.runtime_env["working_dir"] == str(REPO)


def test_resume_and_init_from_go_through_as_train_takes_them(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    _, job = as_the_job_reads_it(cli.submit_spec(parse("--set", "run.name=r1", "--resume")))
    assert job.resume is True
    cfg, job = as_the_job_reads_it(cli.submit_spec(parse("--resume", "run-20240101")))
    assert job.resume == "run-20240101"
    assert cfg.tracking.tracking_uri == "http://127.0.0.1:5999"  # the client's MLflow
    ckpt = tmp_path / "runs" / "a" / "checkpoint_00000006"
    _, job = as_the_job_reads_it(cli.submit_spec(parse("--init-from", str(ckpt))))
    assert job.init_from == str(ckpt)
    with pytest.raises(JobSpecError, match="init-from"):
        cli.submit_spec(parse("--init-from", "/tmp/a;rm -rf ~"))


def test_a_value_a_shell_would_read_is_refused():
    with pytest.raises(JobSpecError, match=r"^data.path: .* not allowed in a job \('\$\(\)'\)"):
        cli.submit_spec(parse("--set", "data.path=/tmp/$(id)"))


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *argv],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip


def test_a_bad_config_fails_here_before_anything_is_sent():
    # Nothing listens on port 1: a try to reach the cluster would say "not reachable".
    out = run_cli("submit", "--config", str(TINY), "--set", "zero.stage=7",
                  "--address", "http://127.0.0.1:1")  # fmt: skip
    assert out.returncode == 2
    assert out.stderr == (
        f"lmforge submit: error: {TINY}: zero.stage: Input should be less than or equal to 3"
        " (got 7)\n"
    )  # and not "not reachable": nothing was sent
    assert "submitted" not in out.stdout


def test_an_unreachable_cluster_is_one_line():
    out = run_cli("submit", "--config", str(TINY), "--address", "http://127.0.0.1:1")
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("lmforge submit: error: Ray Jobs API at http://127.0.0.1:1 is not reach")


class FakeJobs:
    """Our logic around the Jobs API: what cmd_submit does with what the cluster says."""

    def __init__(self, status="SUCCEEDED", message="", interrupt=False):
        self.status, self.message, self.interrupt = status, message, interrupt
        self.calls: list[str] = []

    def __call__(self, address=None):
        self.address = address or "http://127.0.0.1:8265"
        return self

    def submit(self, spec):
        self.calls.append("submit")
        return "raysubmit_abc"

    def follow(self, sid):
        self.calls.append("follow")
        yield "step 1/2\n"
        if self.interrupt:
            raise KeyboardInterrupt
        yield "step 2/2\n"

    def wait(self, sid, **kw):
        self.calls.append("wait")
        return self.status

    def job(self, sid):
        return jobclient.JobRow(sid, None, "SUBMISSION", self.status, "", self.message,
                                None, None, {})  # fmt: skip

    def stop(self, sid):
        self.calls.append("stop")


@pytest.fixture
def fake(monkeypatch):
    def install(**kw):
        jobs = FakeJobs(**kw)
        monkeypatch.setattr(jobclient, "JobClient", jobs)
        return jobs

    return install


def test_follows_the_log_to_the_end(fake, capsys):
    jobs = fake()
    assert cli.cmd_submit(parse("--address", "http://h:1")) == 0
    out = capsys.readouterr().out
    assert out.startswith("submitted job raysubmit_abc to http://h:1 (run run-")
    assert "step 1/2\nstep 2/2\n" in out and out.endswith("job raysubmit_abc SUCCEEDED\n")
    assert jobs.calls == ["submit", "follow", "wait"]


def test_a_failed_job_exits_1_with_its_reason(fake, capsys):
    fake(status="FAILED", message="Job failed\nlmforge train: error: data.path=x: not found")
    assert cli.cmd_submit(parse()) == 1
    err = capsys.readouterr().err
    assert err == "lmforge submit: job raysubmit_abc FAILED: data.path=x: not found\n"


def test_ctrl_c_detaches_and_leaves_the_job_running(fake, capsys):
    jobs = fake(interrupt=True)
    assert cli.cmd_submit(parse()) == 130
    assert jobs.calls == ["submit", "follow"]  # not stopped, not waited for
    err = capsys.readouterr().err
    assert "job raysubmit_abc keeps running" in err
    assert "ray job logs --follow --address http://127.0.0.1:8265 raysubmit_abc" in err
    assert "ray job stop --address http://127.0.0.1:8265 raysubmit_abc" in err


def test_no_wait_prints_the_id_and_returns(fake, capsys):
    jobs = fake()
    assert cli.cmd_submit(parse("--no-wait")) == 0
    assert jobs.calls == ["submit"]
    out = capsys.readouterr().out
    assert "submitted job raysubmit_abc" in out and "ray job logs --follow" in out


def test_failure_line_finds_lmforges_error():
    assert jobclient.failure_line("a\nlmforge train: error: zero.stage: 7\n") == "zero.stage: 7"
    assert jobclient.failure_line("Job was stopped\n") == "Job was stopped"
    assert jobclient.failure_line("") == "no message from Ray"


SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "aws-s3cr3t-value",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "MLFLOW_TRACKING_USERNAME": "alice",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-s3cr3t-value",
}


@pytest.fixture
def submitter(monkeypatch):
    for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION",
              "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "MLFLOW_TRACKING_TOKEN"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)


def test_s3_jobs_get_the_submitters_aws_and_mlflow_credentials_in_the_runtime_env(
    submitter, fake, capsys
):
    """As `lmforge train` hands them to its workers: in the runtime env, never in the
    entrypoint, the metadata or what submit prints."""
    spec = cli.submit_spec(parse("--set", "data.path=s3://data/ds", "--set", "run.name=r"))
    assert {k: spec.runtime_env["env_vars"][k] for k in SECRETS} == SECRETS
    text = spec.entrypoint + repr(spec.metadata)
    assert not any(v in text for v in SECRETS.values())
    storage = cli.submit_spec(parse("--set", "run.storage_path=s3://ckpt/runs"))
    assert storage.runtime_env["env_vars"]["AWS_SECRET_ACCESS_KEY"] == "aws-s3cr3t-value"
    fake()
    assert cli.cmd_submit(parse("--set", "data.path=s3://data/ds", "--no-wait")) == 0
    printed = capsys.readouterr()
    assert not any(v in printed.out + printed.err for v in SECRETS.values())


def test_a_local_job_gets_the_mlflow_credentials_and_no_aws_variables(submitter, tmp_path):
    env = cli.submit_spec(parse("--set", f"data.path={tmp_path}")).runtime_env["env_vars"]
    assert env["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert env["MLFLOW_TRACKING_PASSWORD"] == "mlflow-s3cr3t-value"
    assert not any(k.startswith("AWS_") for k in env)
    # ... unless it resumes or starts from S3.
    init = cli.submit_spec(parse("--set", f"data.path={tmp_path}", "--init-from", "s3://c/ck"))
    assert init.runtime_env["env_vars"]["AWS_ACCESS_KEY_ID"] == "AKIDEXAMPLE"
    resume = cli.submit_spec(parse("--set", f"data.path={tmp_path}", "--resume", "s3://c/run"))
    assert resume.runtime_env["env_vars"]["AWS_ACCESS_KEY_ID"] == "AKIDEXAMPLE"


def test_a_sweep_resumes_as_a_job_in_the_run_storage_its_state_is_in(monkeypatch):
    """The dashboard's "Resume": the run storage comes from the sweep's recorded dir; a
    sweep on S3 hands the job the AWS_* variables (its runtime env, not its command line)."""
    from lmforge.sweeps.submit import resume_job

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "it-key")
    spec = resume_job("lr", sweep_dir="s3://bucket/runs/sweeps/lr")
    assert spec.entrypoint.endswith("--resume lr --set run.storage_path=s3://bucket/runs")
    assert spec.runtime_env["env_vars"]["AWS_ACCESS_KEY_ID"] == "it-key"
    assert "it-key" not in spec.entrypoint
    local = resume_job("lr", sweep_dir="/data/runs/sweeps/lr")
    assert local.entrypoint.endswith("--resume lr --set run.storage_path=/data/runs")
    assert "AWS_ACCESS_KEY_ID" not in local.runtime_env["env_vars"]
    assert resume_job("lr").entrypoint.endswith("--resume lr")  # the job's default storage
