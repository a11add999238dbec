"""A real local S3 API for tests: moto's server mode from .venv-services, on 127.0.0.1 and a
free port, health-checked before use and killed after.

    with s3_server("lmforge") as s3:
        s3.endpoint_url   # http://127.0.0.1:PORT
        s3.bucket         # created, empty
        s3.env            # AWS_* to put in os.environ (dummy credentials, the endpoint)
        s3.uri("runs")    # s3://lmforge/runs
        s3.pid            # the server process (a test may stop it: SIGSTOP / SIGCONT)

moto keeps everything in memory: each server starts empty.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.services import free_port, http_ok, kill_group, log_tail

REPO = Path(__file__).resolve().parents[1]
MOTO_SERVER = REPO / ".venv-services" / "bin" / "moto_server"


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    env: dict[str, str] = field(repr=False)
    pid: int = 0  # the moto server's (its own process group): SIGSTOP makes the store hang

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def create_bucket(endpoint_url: str, bucket: str) -> None:
    req = urllib.request.Request(f"{endpoint_url}/{bucket}", method="PUT")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200, r.status


@contextlib.contextmanager
def s3_server(
    bucket: str = "lmforge", log_dir: Path | None = None, secret: str = "dummy-secret-key"
) -> Iterator[S3Server]:
    if not MOTO_SERVER.is_file():
        raise RuntimeError(f"{MOTO_SERVER} missing: run bash scripts/setup.sh")
    port = free_port()
    log = Path(log_dir or tempfile.mkdtemp(prefix="moto-")) / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not http_ok(f"{endpoint}/moto-api/data.json"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not come up: {log_tail(log)}")
            time.sleep(0.2)
        create_bucket(endpoint, bucket)
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": secret,
            "AWS_REGION": "us-east-1",
        }
        yield S3Server(endpoint, bucket, env, proc.pid)
    finally:
        kill_group(proc.pid)
