"""Where lmforge's files live: a local path, or `s3://bucket/prefix` on any S3-compatible
store (AWS, MinIO, Ceph, moto). The only module that knows S3.

    storage.configure(cfg.storage)        # endpoint, region, addressing of this process
    p = storage.resolve("s3://b/runs")    # an S3Path (local paths: a pathlib.Path)
    (p / "run-1" / "manifest.json").read_text()
    fs, fs_path = storage.ray_storage(p)  # for Ray Train's storage_path/storage_filesystem

An `S3Path` has the few `pathlib.Path` methods lmforge's readers use (`/`, name, parent,
exists, is_file, is_dir, stat, read/write, iterdir, glob), so checkpoint and dataset code
reads either kind. Files go through `pyarrow.fs.S3FileSystem` (no boto).

Endpoint, region and path-style come from the config's `storage` section, else the
standard variables `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_REGION` /
`AWS_DEFAULT_REGION`. Credentials are never in the config: the AWS SDK reads them from
the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
`AWS_PROFILE`) of each process, and `runtime_env_vars()` hands them to Ray's workers.
The filesystem is built without explicit keys, so pickling it (Ray sends it to every
worker) carries no secret.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

from lmforge import paths
from lmforge.errors import LmforgeError

SCHEME = "s3://"
# What the AWS SDK of a worker needs to reach the store as the driver does.
AWS_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
)


class StorageError(LmforgeError, ValueError):
    """A storage location that cannot be used; the message names it."""


@dataclass(frozen=True)
class S3Settings:
    """How to reach the store; from `storage.*` in the config, else the AWS_* variables."""

    endpoint_url: str | None = None  # http(s)://host:port; None: AWS itself
    region: str | None = None
    force_path_style: bool | None = None  # None: path-style with an endpoint, else virtual


_settings = S3Settings()


def configure(section: Any = None) -> S3Settings:
    """Set this process's S3 settings from a config's `storage` section (None: env only)."""
    global _settings
    _settings = S3Settings(
        endpoint_url=getattr(section, "endpoint_url", None),
        region=getattr(section, "region", None),
        force_path_style=getattr(section, "force_path_style", None),
    )
    return _settings


def settings() -> S3Settings:
    """This process's settings, the environment filling in what the config leaves unset."""
    env = os.environ
    return S3Settings(
        endpoint_url=_settings.endpoint_url
        or env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or None,
        region=_settings.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        force_path_style=_settings.force_path_style,
    )


def check_endpoint(url: str | None) -> None:
    """An endpoint is http(s)://host[:port] with nothing after it (credentials never)."""
    if url is None:
        return
    parts = urlsplit(url)
    if "@" in parts.netloc:  # first: the other messages echo the URL
        raise StorageError(
            "storage.endpoint_url: holds credentials (user:password@); set AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY (AWS_* variables) in the environment instead"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(f"storage.endpoint_url={url!r}: expected http(s)://host[:port]")
    if parts.path.strip("/") or parts.query:
        raise StorageError(f"storage.endpoint_url={url!r}: expected no path or query")


def filesystem_options(s: S3Settings) -> dict[str, Any]:
    """pyarrow `S3FileSystem` keyword arguments for `s` (never credentials)."""
    opts: dict[str, Any] = {}
    if s.endpoint_url:
        check_endpoint(s.endpoint_url)
        parts = urlsplit(s.endpoint_url)
        opts["endpoint_override"] = parts.netloc
        opts["scheme"] = parts.scheme
    if s.region:
        opts["region"] = s.region
    if s.force_path_style is False:
        opts["force_virtual_addressing"] = True
    return opts


@functools.cache
def _filesystem(s: S3Settings):
    from pyarrow.fs import S3FileSystem

    return S3FileSystem(**filesystem_options(s))


def filesystem():
    """The `pyarrow.fs.S3FileSystem` of this process's settings (one per settings)."""
    return _filesystem(settings())


def is_s3(path: object) -> bool:
    return isinstance(path, S3Path) or str(path).startswith(SCHEME)


def is_remote(path: object) -> bool:
    return isinstance(path, S3Path)


def resolve(path: str | os.PathLike | S3Path) -> Path | S3Path:
    """An `S3Path` for `s3://bucket/key`, a local absolute path (relative to LMFORGE_HOME)
    for anything else; another URI scheme is refused."""
    if isinstance(path, S3Path):
        return path
    text = str(path)
    if text.startswith(SCHEME):
        key = text[len(SCHEME) :].strip("/")
        if not key or key.startswith("/"):
            raise StorageError(f"{text}: expected s3://bucket/prefix")
        return S3Path(key)
    if paths.is_uri(text):
        raise StorageError(f"{text}: only local paths and s3://bucket/prefix are supported")
    return paths.resolve(text)


def ray_storage(path: Path | S3Path) -> tuple[str, Any]:
    """Ray Train's (storage_path, storage_filesystem) for a storage dir."""
    if isinstance(path, S3Path):
        return path.key, path.fs
    return str(path), None


def runtime_env_vars() -> dict[str, str]:
    """The AWS_* variables of this process, for Ray's runtime env of the workers (never
    for logs or MLflow)."""
    return {k: os.environ[k] for k in AWS_ENV if os.environ.get(k)}


class S3Path:
    """An object or prefix in S3 (`s3://bucket/key`) with the Path methods lmforge uses.

    S3 has no directories: a prefix is a dir when objects are under it, `mkdir` does
    nothing."""

    def __init__(self, key: str, fs: Any = None) -> None:
        self.key = key.strip("/")
        self._fs = fs

    @property
    def fs(self):
        return self._fs if self._fs is not None else filesystem()

    def __str__(self) -> str:
        return SCHEME + self.key

    def __repr__(self) -> str:
        return f"S3Path({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Path) and other.key == self.key

    def __hash__(self) -> int:
        return hash(("s3", self.key))

    def __truediv__(self, part: str | os.PathLike) -> S3Path:
        rel = PurePosixPath(str(part)).as_posix().strip("/")
        return S3Path(f"{self.key}/{rel}", self._fs)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> S3Path:
        return S3Path(self.key.rsplit("/", 1)[0], self._fs) if "/" in self.key else self

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    def with_name(self, name: str) -> S3Path:
        return self.parent / name

    def expanduser(self) -> S3Path:
        return self

    def resolve(self) -> S3Path:
        return self

    def is_absolute(self) -> bool:
        return True

    def relative_to(self, other: S3Path) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key)

    def _info(self):
        return self.fs.get_file_info(self.key)

    def exists(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type != FileType.NotFound

    def is_file(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.File

    def is_dir(self) -> bool:
        from pyarrow.fs import FileType

        return self._info().type == FileType.Directory

    def stat(self) -> SimpleNamespace:
        info = self._info()
        if info.size is None:
            raise FileNotFoundError(f"{self}: no such object")
        mtime = info.mtime.timestamp() if info.mtime else 0.0
        return SimpleNamespace(st_size=info.size, st_mtime=mtime)

    def open_stream(self):
        return self.fs.open_input_stream(self.key)

    def read_bytes(self) -> bytes:
        with self.open_stream() as f:  # pyarrow's errors name the bucket and key
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.key) as f:
            f.write(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> None:
        self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """S3 has no directories: nothing to make."""

    def _children(self, recursive: bool) -> list:
        from pyarrow.fs import FileSelector

        return self.fs.get_file_info(
            FileSelector(self.key, allow_not_found=True, recursive=recursive)
        )

    def iterdir(self):
        for info in self._children(recursive=False):
            yield S3Path(info.path, self._fs)

    def glob(self, pattern: str):
        """Children whose name matches `pattern` (one level: no `/` or `**`)."""
        for child in self.iterdir():
            if fnmatch.fnmatchcase(child.name, pattern):
                yield child

    def files(self) -> dict[str, int]:
        """Every object under this prefix: relative POSIX path -> size (one listing)."""
        from pyarrow.fs import FileType

        return {
            PurePosixPath(i.path).relative_to(self.key).as_posix(): i.size
            for i in self._children(recursive=True)
            if i.type == FileType.File
        }

    def remove(self) -> None:
        """Delete every object under this prefix (and the object itself)."""
        from pyarrow.fs import FileType

        info = self._info()
        if info.type == FileType.Directory:
            self.fs.delete_dir(self.key)
        elif info.type == FileType.File:
            self.fs.delete_file(self.key)


def open_bytes(path: Path | S3Path):
    """A binary reader of a local file or an S3 object (`read(n)`, a context manager)."""
    return path.open_stream() if isinstance(path, S3Path) else open(path, "rb")


def upload_dir(local: Path, dest: S3Path, last: str | None = None, replace: bool = False) -> None:
    """Copy `local`'s files under `dest`; `last` (a relative path) is written last, so a
    reader that waits for it sees the rest complete. `replace`: objects under `dest` that
    `local` does not have are deleted after."""
    before = dest.files() if replace else {}
    names = sorted(f.relative_to(local).as_posix() for f in local.rglob("*") if f.is_file())
    if last in names:
        names.remove(last)
        names.append(last)
    for rel in names:
        upload(local / rel, dest / rel)
    for rel in set(before) - set(names):
        dest.fs.delete_file((dest / rel).key)


def upload(src: Path, dest: S3Path) -> None:
    """Copy one local file to an S3 object."""
    with dest.fs.open_output_stream(dest.key) as out, open(src, "rb") as f:
        shutil.copyfileobj(f, out, 1 << 20)


def download(src: Path | S3Path, dst: Path) -> Path:
    """Copy one file to a local path (its parent made)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.part")
    with open_bytes(src) as f, open(tmp, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
    tmp.replace(dst)
    return dst


def download_dir(src: S3Path, dst: Path) -> Path:
    """Copy every object under `src` to `dst` (its relative paths kept)."""
    for rel in src.files():
        download(src / rel, dst / rel)
    return dst


def cache_dir(path: S3Path) -> Path:
    """Where a local copy of `path` goes (under LMFORGE_HOME, one dir per URI)."""
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return paths.home() / "cache" / "s3" / f"{path.name}-{digest}"


def local_file(path: Path | S3Path, siblings: tuple[str, ...] = ()) -> Path:
    """A local path of the file: itself, or a copy made once per process in a temp dir,
    with those of `siblings` (names beside it) that exist."""
    if not isinstance(path, S3Path):
        return path
    return _local_copy(path, tuple(siblings))


@functools.cache
def _local_copy(path: S3Path, siblings: tuple[str, ...]) -> Path:
    d = Path(tempfile.mkdtemp(prefix="lmforge-s3-"))
    for name in siblings:
        if (path.parent / name).is_file():
            download(path.parent / name, d / name)
    return download(path, d / path.name)
