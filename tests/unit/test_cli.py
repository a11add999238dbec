"""The CLI's contract: --help explains, and bad input fails fast with one line."""

import subprocess
import sys

import pytest

from tests.conftest import REPO

LMFORGE = [sys.executable, "-m", "lmforge.cli"]


def run(*args, timeout=60):
    return subprocess.run(
        [*LMFORGE, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


HELP = [
    [],
    ["prepare"],
    ["train"],
    ["submit"],
    ["generate"],
    ["evaluate"],
    ["export-hf"],
    ["tracking"],
    ["cluster"],
    ["dashboard"],
]

BAD = [
    (["train", "--config", "jobs/configs/tiny.yaml", "--set", "zero.stage=9"], "zero.stage"),
    (
        ["train", "--config", "jobs/configs/tiny.yaml", "--set", "train.typo=1"],
        "train.typo: unknown key",
    ),
    (["train", "--config", "nope.yaml"], "nope.yaml: config file not found"),
    (
        ["train", "--config", "jobs/configs/tiny.yaml", "--set", "data.path=/nonexistent/ds"],
        "/nonexistent/ds: dataset dir not found",
    ),
    (
        ["prepare", "--input", "/nonexistent/corpus", "--output", "/tmp/x"],
        "/nonexistent/corpus: no such file",
    ),
    (
        ["generate", "--checkpoint", "/nonexistent/ckpt", "--prompt", "hi"],
        "/nonexistent/ckpt: checkpoint dir not found",
    ),
    (["generate", "--model", "tiny@best", "--prompt", "hi"], "expected models:/NAME@ALIAS"),
    (
        ["generate", "--model", "models:/no-such-model@best", "--prompt", "hi"],
        "models:/no-such-model@best: not found in the registry",
    ),
    (
        ["evaluate", "--checkpoint", "/nonexistent/ckpt", "--data", "datasets/x"],
        "/nonexistent/ckpt: checkpoint dir not found",
    ),
    (
        [
            "train",
            "--config",
            "jobs/configs/tiny.yaml",
            "--set",
            "tracking.registered_model=a/b",
        ],
        "tracking.registered_model",
    ),
    (
        ["train", "--config", "jobs/configs/tiny.yaml", "--resume", "models:/nope/1"],
        "models:/nope/1: not found in the registry",
    ),
]


# Every command of the two tests below in ONE `lmforge` process, one after another, as
# `lmforge.cli.main` runs them (each with fresh stdout/stderr and logging bound to them):
# a process per command spent ~2 s importing each, 42 s of the suite's CPU for 21 commands.
BATCH = """
import contextlib, io, json, logging, sys
from lmforge.cli import main
out = []
for args in json.loads(sys.argv[1]):
    for h in list(logging.root.handlers):
        logging.root.removeHandler(h)
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            code = main(args)
        except SystemExit as x:
            code = x.code if isinstance(x.code, int) else (0 if x.code is None else 2)
    out.append([code, o.getvalue(), e.getvalue()])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ran():
    """Each command's (returncode, stdout, stderr), by its arguments."""
    import json
    from types import SimpleNamespace

    cmds = [(*c, "--help") for c in HELP] + [tuple(a) for a, _ in BAD]
    out = subprocess.run(
        [sys.executable, "-c", BATCH, json.dumps(cmds)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        c: SimpleNamespace(returncode=r[0], stdout=r[1], stderr=r[2])
        for c, r in zip(cmds, results, strict=True)
    }


@pytest.mark.parametrize("cmd", HELP)
def test_help(cmd, ran):
    out = ran[(*cmd, "--help")]
    assert out.returncode == 0 and "usage: lmforge" in out.stdout


@pytest.mark.parametrize("args, needle", BAD)
def test_bad_input_is_one_line_before_ray_starts(args, needle, ran):
    out = ran[tuple(args)]
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr


def test_generate_needs_a_model_or_a_checkpoint():
    out = run("generate", "--prompt", "hi")
    assert out.returncode == 2 and "one of the arguments --model --checkpoint" in out.stderr


def test_dashboard_listens_on_loopback_and_points_at_ray_and_mlflow(monkeypatch, tmp_path):
    from lmforge.cli import build_parser, dashboard_command

    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = build_parser().parse_args(["dashboard", "--ray-address", "http://127.0.0.1:8299"])
    cmd, env = dashboard_command(args)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--server.port") + 1] == "8501"
    assert cmd[cmd.index("run") + 1] == str(REPO / "dashboard" / "app.py")
    assert env["RAY_JOBS_ADDRESS"] == "http://127.0.0.1:8299"
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert env["RAY_AUTH_MODE"] == "token"
    assert cmd[cmd.index("--runner.magicEnabled") + 1] == "false"  # CPython gh-106905
