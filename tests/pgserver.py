"""A real PostgreSQL for tests: Debian's server binaries (scripts/deps.sh installs them),
a new cluster in a temporary data dir, on 127.0.0.1 and a free port, password auth,
stopped and deleted after.

    with pg_server() as pg:
        pg.uri        # postgresql://lmforge:PASSWORD@127.0.0.1:PORT/mlflow (database made)
        pg.password

As root, initdb and the server run as the `postgres` user (PostgreSQL refuses root).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.services import free_port, log_tail

USER, DATABASE = "lmforge", "mlflow"


@dataclass(frozen=True)
class PgServer:
    port: int
    password: str = field(repr=False)

    @property
    def uri(self) -> str:
        return f"postgresql://{USER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL's bin dir (LMFORGE_PG_BIN names another)."""
    if named := os.environ.get("LMFORGE_PG_BIN"):
        return Path(named)
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_owner(cmd: list[str]) -> list[str]:
    """`cmd` as the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def pg_server() -> Iterator[PgServer]:
    bins = bin_dir()
    if bins is None or not (bins / "initdb").is_file():
        raise RuntimeError("PostgreSQL's initdb not found: run bash scripts/deps.sh")
    root = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data, log, pwfile = root / "data", root / "server.log", root / "pw"
    password = secrets.token_hex(12)
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    port = free_port()

    def run(*cmd: str) -> None:
        out = subprocess.run(
            _as_owner([str(bins / cmd[0]), *cmd[1:]]),
            capture_output=True, text=True, timeout=60,
            env={**os.environ, "PGPASSWORD": password},
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {(out.stderr or out.stdout).strip()[-1500:]}")

    started = False
    try:
        run("initdb", "-D", str(data), "-U", USER, f"--pwfile={pwfile}",
            "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")  # fmt: skip
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root}"
        try:
            run("pg_ctl", "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60", "start")
        except RuntimeError as err:
            raise RuntimeError(f"{err}; server log: {log_tail(log)}") from None
        started = True
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE)
        yield PgServer(port, password)
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
