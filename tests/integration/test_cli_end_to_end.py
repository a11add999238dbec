"""The CLI as a user runs it: `lmforge train` joins the running cluster, then `generate`;
where no cluster runs, `lmforge train` starts a private Ray.

The private-Ray run is started with the module (`private_run`, used by every test here)
and trains beside the joining one: two independent `lmforge train` processes on two Ray
instances at once, each checked on its own output."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.services import kill_group
from lmforge.tracking import store
from tests.conftest import REPO

LMFORGE = str(Path(sys.executable).parent / "lmforge")
pytestmark = pytest.mark.usefixtures("private_run")  # started with the module's first test


def run(*args):
    return subprocess.run([LMFORGE, *args], cwd=REPO, env=dict(os.environ), capture_output=True,
                          text=True, timeout=600)  # fmt: skip


@pytest.fixture(scope="module")
def private_run(dataset, tmp_path_factory):
    """`lmforge train` in a home with no `lmforge cluster up` record and no RAY_ADDRESS,
    started (not waited for): the process, its home and its output file."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    home = tmp_path_factory.mktemp("private") / "home"
    env["LMFORGE_HOME"] = str(home)
    log = home.parent / "train.log"  # a file, not a pipe nobody reads until the end
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [LMFORGE, "train", "--config", "jobs/configs/tiny.yaml", "--set", f"data.path={dataset}",
             "--set", "run.name=private", "--set", "train.max_steps=3", "--set", "train.warmup_steps=1", "--set", "train.eval_every=3",
             "--set", "train.checkpoint_every=3"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    yield SimpleNamespace(proc=proc, home=home, log=log)
    if proc.poll() is None:  # a test failed before it ended: it and the Ray it started
        kill_group(proc.pid)


def test_train_then_generate_from_the_cli(ray_cluster, dataset):
    out = run("train", "--config", "jobs/configs/tiny.yaml", "--set", f"data.path={dataset}",
              "--set", "run.name=cli", "--set", "train.max_steps=8", "--set", "train.eval_every=4",
              "--set", "train.checkpoint_every=8", "--set", "zero.stage=1")  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert f"local Ray cluster at {ray_cluster.address}" in log  # joined, did not start its own
    assert "step      8/8 | loss" in log and "tok/s | mfu" in log
    assert "eval step      4 | val_loss" in log
    checkpoint = [line for line in out.stdout.splitlines() if line.startswith("latest checkpoint:")]
    assert checkpoint and checkpoint[0].endswith("checkpoint_00000008")
    assert log.count("Reporting training result") == 0  # Ray Train's chatter is kept out
    [run_id] = [ln.split()[2] for ln in out.stdout.splitlines() if ln.startswith("MLflow run:")]
    tags = store.client(store.resolve_uri()).get_run(run_id).data.tags
    assert tags["ray.job_id"] and ray_cluster.address in tags["ray.address"]  # where it ran

    gen = run("generate", "--checkpoint", checkpoint[0].split(": ", 1)[1], "--prompt", "KING.",
              "--max-new-tokens", "30", "--seed", "1", "--temperature", "0")  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("KING.") and len(gen.stdout) > len("KING.\n")
    again = run("generate", "--checkpoint", checkpoint[0].split(": ", 1)[1], "--prompt", "KING.",
                "--max-new-tokens", "30", "--seed", "1", "--temperature", "0")  # fmt: skip
    assert again.stdout == gen.stdout  # greedy is repeatable


def test_train_without_a_cluster_starts_a_private_ray(private_run):
    code = private_run.proc.wait(timeout=600)
    log = private_run.log.read_text()
    assert code == 0, log[-3000:]
    assert "a private local Ray" in log
    assert (private_run.home / "runs" / "private" / "checkpoint_00000003").is_dir()
