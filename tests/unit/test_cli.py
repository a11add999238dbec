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


@pytest.mark.parametrize("cmd", [[], ["prepare"], ["train"], ["generate"], ["cluster"]])
def test_help(cmd):
    out = run(*cmd, "--help")
    assert out.returncode == 0 and "usage: lmforge" in out.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
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
    ],
)
def test_bad_input_is_one_line_before_ray_starts(args, needle):
    out = run(*args)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr
