"""A shared MLflow for real: `lmforge tracking up` over a real PostgreSQL (tests/pgserver.py)
with artifacts in S3 (moto), proxied by the server, behind MLflow's basic-auth app. A
1-worker run (local: no Ray Train job, which the other integration tests cover) logs to it with a user's credentials from its environment and no S3
credentials at all; the version it registers has its files in the bucket, takes an alias,
loads as a pyfunc through the server and generates what its checkpoint generates. No
password reaches a command line, a record, the log or MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from types import SimpleNamespace

import psutil
import pytest
import requests

from lmforge import cli, storage
from lmforge.services import free_port, http_ok
from lmforge.tracking import browse, registry, store
from lmforge.training.launch import run_training
from tests.integration.conftest import tiny_config
from tests.pgserver import pg_server

ADMIN_PW, USER, USER_PW = "it-admin-Pw-7c2e9a41d0", "trainer", "it-trainer-Pw-5d81b3f6e2"
MODEL, EXPERIMENT = "it-pg", "it-pg"


def _lmforge(*args, env):
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip


@pytest.fixture(scope="module")
def shared(s3_server, tmp_path_factory):
    """`lmforge tracking up --backend-store-uri postgresql://... --artifacts-destination
    s3://... --auth`, as a user runs it (its own LMFORGE_HOME), and a user `trainer`."""
    home = tmp_path_factory.mktemp("tracking-home")
    with pg_server() as pg:
        env = {**os.environ, **s3_server.env, "LMFORGE_HOME": str(home),
               "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PW}  # fmt: skip
        port = free_port()
        up = _lmforge(
            "tracking", "up", "--port", str(port), "--backend-store-uri", pg.uri,
            "--artifacts-destination", s3_server.uri("mlflow"), "--auth", env=env,
        )  # fmt: skip
        try:
            assert up.returncode == 0, up.stderr[-3000:]
            url = f"http://127.0.0.1:{port}"
            # The admin makes the job's user (MLflow's auth client needs Flask-WTF, which
            # only the services env has: its REST API instead).
            made = requests.post(
                f"{url}/api/2.0/mlflow/users/create", json={"username": USER, "password": USER_PW},
                auth=("admin", ADMIN_PW), timeout=30,
            )  # fmt: skip
            assert made.status_code == 200, made.text
            yield SimpleNamespace(url=url, pg=pg, s3=s3_server, home=home, up=up)
        finally:
            _lmforge("tracking", "down", env=env)


def test_the_server_serves_postgres_and_s3_and_keeps_passwords_off(shared):
    assert "store: postgresql://lmforge:***@127.0.0.1" in shared.up.stdout
    assert "artifacts in s3://lmforge-it/mlflow (proxied)" in shared.up.stdout
    record = json.loads((shared.home / "tracking.json").read_text())
    assert record["url"] == shared.url and record["auth"] is True
    server = psutil.Process(record["pid"])
    texts = [shared.up.stdout, shared.up.stderr, json.dumps(record)]
    texts += [" ".join(p.cmdline()) for p in (server, *server.children(recursive=True))]
    assert all(shared.pg.password not in t and ADMIN_PW not in t for t in texts)
    assert ".venv-services/bin/mlflow" in " ".join(server.cmdline())  # psycopg and boto3


def test_without_credentials_the_server_refuses(shared, monkeypatch):
    assert http_ok(f"{shared.url}/health")  # the one open endpoint
    search = f"{shared.url}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=10)
    assert refused.value.code == 401
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match="401"):
        store.client(shared.url).search_experiments()
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER_PW)
    c = store.client(shared.url)  # the right password: the user writes, then reads it back
    made = c.create_experiment("it-pg-auth")
    assert c.get_experiment_by_name("it-pg-auth").experiment_id == made
    assert "it-pg-auth" in {e.name for e in c.search_experiments()}


def test_a_run_registers_and_generates_through_the_server(
    shared, dataset, monkeypatch, capfd, plain_main
):
    for key in storage.AWS_ENV:  # the job has no S3 credentials: the server proxies
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", USER_PW)
    url = shared.url
    cfg = tiny_config(
        dataset, "pg-run", "scaling.num_workers=1", "train.max_steps=4",
        "train.checkpoint_every=4", "train.eval_every=4", "train.eval_steps=1",
        "train.log_every=1", "train.warmup_steps=1", f"tracking.tracking_uri={url}",
        f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={MODEL}",
    )  # fmt: skip
    result = run_training(cfg, local=True)  # the trainer of a Ray job; MLflow is the point here
    c = store.client(url)
    (version,) = c.search_model_versions(f"name='{MODEL}'")
    assert version.tags["step"] == "4" and version.run_id == result.mlflow_run_id
    assert [m.step for m in c.get_metric_history(result.mlflow_run_id, "loss")] == [1, 2, 3, 4]
    run = c.get_run(result.mlflow_run_id)
    logged = json.dumps([run.data.params, run.data.tags])
    out = capfd.readouterr()
    for secret in (USER_PW, shared.pg.password, ADMIN_PW):
        assert secret not in logged and secret not in out.out + out.err

    # The version's files are in the bucket, under the server's artifacts destination.
    import pyarrow.fs

    s3 = pyarrow.fs.S3FileSystem(
        endpoint_override=shared.s3.endpoint_url, scheme="http", region="us-east-1",
        access_key=shared.s3.env["AWS_ACCESS_KEY_ID"],
        secret_key=shared.s3.env["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip
    found = s3.get_file_info(pyarrow.fs.FileSelector(f"{shared.s3.bucket}/mlflow", recursive=True))
    keys = [f.path for f in found if f.type == pyarrow.fs.FileType.File]
    assert any(k.endswith("/artifacts/checkpoint/model.safetensors") for k in keys), keys
    assert any(k.endswith("/config.yaml") for k in keys), keys

    # Aliases, the dashboard's Models rows, the pyfunc and generation, all through the server.
    assert c.get_model_version_by_alias(MODEL, "best").version == version.version
    browse.set_alias(url, MODEL, "prod", int(version.version))
    rows = browse.versions(url, MODEL)
    assert [(r.version, r.step) for r in rows] == [(int(version.version), 4)]
    assert set(rows[0].aliases) == {"best", "prod"}
    import mlflow.pyfunc

    with registry.fluent_uri(url):
        model = mlflow.pyfunc.load_model(f"models:/{MODEL}@prod")
    (text,) = model.predict(["ROMEO:"], params={"max_new_tokens": 8, "seed": 3})
    assert isinstance(text, str) and text
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "12", "--seed", "7"]
    capfd.readouterr()
    assert cli.main(["generate", "--model", f"models:/{MODEL}@prod", "--tracking-uri", url,
                     *args]) in (0, None)  # fmt: skip
    from_registry = capfd.readouterr().out
    assert cli.main(["generate", "--checkpoint", str(result.checkpoint), *args]) in (0, None)
    assert from_registry.startswith("ROMEO:") and from_registry == capfd.readouterr().out
