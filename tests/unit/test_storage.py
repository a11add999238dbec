"""s3:// paths: settings from the config or AWS_*, the S3Path reader, and datasets and
checkpoints in a real S3 API (moto's server, from .venv-services; no Ray)."""

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint as ckpt_io
from lmforge import models, paths, storage
from lmforge.config import ConfigError, load_config
from lmforge.data.dataset import Dataset, DatasetError
from lmforge.data.stream import TokenStream
from lmforge.storage import S3Path, StorageError
from lmforge.tokenizer import train_tokenizer
from tests.conftest import REPO
from tests.s3server import MOTO_SERVER, s3_server
from tests.unit.test_dataset_stream import make_dataset

SECRET = "unit-test-secret-6f1d0c"


@pytest.fixture(scope="module")
def moto():
    if not MOTO_SERVER.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{MOTO_SERVER} missing: scripts/setup.sh builds .venv-services")
        pytest.skip(f"{MOTO_SERVER} missing: run bash scripts/setup.sh")
    with s3_server("unit", secret=SECRET) as s3:
        yield s3


@pytest.fixture
def s3(moto, monkeypatch):
    """The moto server as this process's S3 (its AWS_* set), and a fresh prefix in it."""
    for key in storage.AWS_ENV:
        monkeypatch.delenv(key, raising=False)
    for key, value in moto.env.items():
        monkeypatch.setenv(key, value)
    storage.configure(None)
    yield moto
    storage.configure(None)


@pytest.fixture
def prefix(s3, request):
    return storage.resolve(s3.uri(request.node.name.replace("[", "-").strip("]")))


def test_settings_come_from_the_config_else_the_environment(monkeypatch):
    for key in storage.AWS_ENV:
        monkeypatch.delenv(key, raising=False)
    storage.configure(None)
    assert storage.settings() == storage.S3Settings()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert storage.settings().endpoint_url == "http://generic:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")  # the S3-specific one wins
    monkeypatch.setenv("AWS_REGION", "eu-north-1")
    assert storage.settings() == storage.S3Settings("http://s3-only:2", "eu-north-1")
    cfg = load_config(None, ["storage.endpoint_url=https://minio.lan:9000",
                             "storage.region=local", "storage.force_path_style=false"])  # fmt: skip
    storage.configure(cfg.storage)
    try:
        s = storage.settings()
        assert s == storage.S3Settings("https://minio.lan:9000", "local", False)
        assert storage.filesystem_options(s) == {
            "endpoint_override": "minio.lan:9000", "scheme": "https", "region": "local",
            "force_virtual_addressing": True,
        }  # fmt: skip
    finally:
        storage.configure(None)
    assert storage.filesystem_options(storage.S3Settings()) == {}  # AWS itself


@pytest.mark.parametrize(
    "override, why",
    [
        ("storage.endpoint_url=http://key:secret@host:9000", "holds credentials"),
        ("storage.endpoint_url=minio:9000", r"expected http\(s\)://host"),
        ("storage.endpoint_url=http://minio:9000/bucket", "no path"),
        ("storage.access_key=abc", "unknown key"),  # credentials have no place in a config
        ("run.storage_path=gs://bucket/runs", "the only URI scheme"),
        ("data.path=s3://", "expected a local path or s3://bucket/prefix"),
    ],
)
def test_bad_storage_settings_are_refused_naming_the_key(override, why):
    with pytest.raises(ConfigError, match=why) as err:
        load_config(None, [override])
    assert override.split("=")[0].split(".")[0] in str(err.value)


def test_paths_resolve_to_s3_or_local():
    p = storage.resolve("s3://bkt/runs/run-1/")
    assert isinstance(p, S3Path) and str(p) == "s3://bkt/runs/run-1"
    assert (p / "checkpoint_00000010").key == "bkt/runs/run-1/checkpoint_00000010"
    assert p.name == "run-1" and str(p.parent) == "s3://bkt/runs" and p.bucket == "bkt"
    assert storage.resolve("datasets/x") == paths.home() / "datasets" / "x"
    with pytest.raises(StorageError, match="only local paths and s3://"):
        storage.resolve("gs://bkt/x")
    assert storage.ray_storage(p) == ("bkt/runs/run-1", p.fs)
    assert storage.ray_storage(paths.home()) == (str(paths.home()), None)


def test_the_filesystem_pickles_without_the_secret(s3):
    """Ray pickles the storage filesystem to every worker: no credential may travel in it."""
    fs = storage.filesystem()
    blob = pickle.dumps(fs)
    assert SECRET.encode() not in blob and b"testing" not in blob
    assert storage.runtime_env_vars()["AWS_SECRET_ACCESS_KEY"] == SECRET  # for the runtime env


def test_s3_paths_read_write_list_and_remove(prefix, tmp_path):
    assert not prefix.exists() and list(prefix.iterdir()) == []
    (prefix / "a" / "one.txt").write_text("one")
    (prefix / "two.bin").write_bytes(b"\x00\x01")
    assert prefix.is_dir() and (prefix / "a").is_dir() and (prefix / "two.bin").is_file()
    assert (prefix / "a" / "one.txt").read_text() == "one"
    assert (prefix / "two.bin").stat().st_size == 2
    assert sorted(c.name for c in prefix.iterdir()) == ["a", "two.bin"]
    assert [c.name for c in prefix.glob("*.bin")] == ["two.bin"]
    assert prefix.files() == {"a/one.txt": 3, "two.bin": 2}
    with pytest.raises(FileNotFoundError):
        (prefix / "nope").read_text()
    local = storage.download(prefix / "a" / "one.txt", tmp_path / "x" / "one.txt")
    assert local.read_text() == "one"
    prefix.remove()
    assert not prefix.exists()


def test_upload_dir_writes_the_last_file_last_and_replaces(prefix, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("manifest.json", "b.txt", "sub/c.txt"):
        (src / name).write_text(name)
    (prefix / "stale.txt").write_text("old")
    order = []
    real = storage.upload
    storage.upload = lambda s, d: (order.append(d.name), real(s, d))
    try:
        storage.upload_dir(src, prefix, last="manifest.json", replace=True)
    finally:
        storage.upload = real
    assert order[-1] == "manifest.json" and len(order) == 3
    assert prefix.files() == {"manifest.json": 13, "b.txt": 5, "sub/c.txt": 9}


def test_a_dataset_in_s3_streams_and_resumes_as_the_local_one(prefix, tmp_path):
    local, _, _ = make_dataset(tmp_path / "ds", n_docs=80)
    storage.upload_dir(local.path, prefix, last="manifest.json")
    remote = Dataset(prefix)
    remote.check_shards()  # footers read from S3
    assert remote.manifest == local.manifest and remote.manifest_sha256 == local.manifest_sha256
    assert remote.tokenizer_path.read_bytes() == local.tokenizer_path.read_bytes()
    a = TokenStream(local, "train", 16, batch_size=4, rank=1, world=2, seed=3)
    b = TokenStream(remote, "train", 16, batch_size=4, rank=1, world=2, seed=3)
    ia, ib = a.batches(), b.batches()
    for _ in range(13):  # past an epoch boundary of this small share
        xa, _ = next(ia)
        xb, _ = next(ib)
        assert torch.equal(xa, xb)
    assert b.state_dict() == a.state_dict()
    assert len(b._files) <= 8  # shards open at a time: bounded, as locally
    c = TokenStream(remote, "train", 16, batch_size=4, rank=1, world=2, seed=3)
    c.load_state_dict(json.loads(json.dumps(b.state_dict())))
    ic = c.batches()
    for _ in range(5):
        xa, ya = next(ia)
        xc, yc = next(ic)
        assert torch.equal(xa, xc) and torch.equal(ya, yc)


def test_a_damaged_dataset_in_s3_is_named(prefix, tmp_path):
    local, m, _ = make_dataset(tmp_path / "ds")
    storage.upload_dir(local.path, prefix, last="manifest.json")
    shard = m["splits"]["train"]["shards"][0]["file"]
    data = (prefix / shard).read_bytes()
    (prefix / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=f"{prefix / shard}: cannot read it as Parquet"):
        Dataset(prefix).check_shards()
    (prefix / shard).fs.delete_file((prefix / shard).key)
    with pytest.raises(DatasetError, match="shard listed but missing"):
        Dataset(prefix)
    with pytest.raises(DatasetError, match="dataset dir not found"):
        Dataset(prefix / "nothing-here")


@pytest.fixture
def s3_checkpoint(prefix, tmp_path):
    """A sealed checkpoint (servable files + a rank's engine file) uploaded to S3."""
    tok = train_tokenizer(["to be or not to be"] * 5, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["model.vocab_size=300"])
    torch.manual_seed(0)
    model = models.build(cfg.model)
    local = tmp_path / "checkpoint_00000010"
    (local / "deepspeed" / "state").mkdir(parents=True)
    (local / "deepspeed" / "state" / "optim.pt").write_bytes(b"x" * 1000)
    ckpt_io.save_servable(local, model.state_dict(), cfg, tmp_path / "tokenizer.json",
                          ckpt_io.TrainerState(step=10))  # fmt: skip
    ckpt_io.seal(local)
    remote = prefix / "run" / local.name
    storage.upload_dir(local, remote, last=ckpt_io.FILES)
    return remote, model


def test_a_checkpoint_in_s3_is_checked_there_and_loads(s3_checkpoint):
    remote, model = s3_checkpoint
    assert ckpt_io.incomplete(remote) is None
    assert ckpt_io.read_state(remote).step == 10
    local = ckpt_io.resolve_checkpoint(str(remote))  # generate --checkpoint s3://...
    assert local.is_dir() and not (local / "deepspeed").exists()  # servable files only
    loaded, _, cfg = ckpt_io.load_model(str(remote))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert cfg.model.vocab_size == 300


@pytest.mark.parametrize("damage", ["missing", "cut short"])
def test_a_damaged_checkpoint_in_s3_is_caught_by_its_file_list(s3_checkpoint, damage):
    remote, _ = s3_checkpoint
    engine = remote / "deepspeed" / "state" / "optim.pt"
    if damage == "missing":
        engine.fs.delete_file(engine.key)
        why = "deepspeed/state/optim.pt is missing"
    else:
        engine.write_bytes(b"x" * 10)
        why = f"deepspeed/state/optim.pt has 10 bytes, {ckpt_io.FILES} says 1000"
    assert ckpt_io.incomplete(remote) == why
    with pytest.raises(ckpt_io.CheckpointError, match="an incomplete checkpoint"):
        ckpt_io.resolve_checkpoint(str(remote))


def test_fine_tune_weights_are_staged_in_an_s3_run_and_load_from_there(s3_checkpoint, prefix):
    """`--init-from` with the run in S3: stage_init uploads the servable files under the
    run dir; a worker loads the weights from there (plan.stage_init, loop.Trainer)."""
    from types import SimpleNamespace

    from lmforge.training.plan import InitSource, stage_init

    remote, model = s3_checkpoint
    local = ckpt_io.resolve_checkpoint(str(remote))
    dst = prefix / "ft-run" / "init_from"
    (dst / "stale").write_text("from an earlier attempt")
    plan = SimpleNamespace(init=InitSource("models:/base/1", local), init_dir=dst)
    assert stage_init(plan) == dst
    assert sorted(dst.files()) == sorted([*ckpt_io.servable_files(local), "SOURCE"])
    assert (dst / "SOURCE").read_text() == "models:/base/1\n"
    fresh = models.build(ckpt_io.read_config(dst).model)
    ckpt_io.load_weights(fresh, storage.local_file(dst / ckpt_io.WEIGHTS).parent)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_an_evaluation_task_in_s3_is_checked_and_read_by_the_harness(prefix, tmp_path):
    """A task file in S3 (issue 26): its include beside it, one data file relative to it
    and one by s3:// URI; the harness loads its docs from the local copies. Errors name the
    S3 objects, never the copies."""
    pytest.importorskip("lm_eval")
    from lmforge.evaluation import TaskError, check_tasks
    from lmforge.evaluation.tasks import task_manager
    from tests.unit import evaltasks

    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(3)]
    more = [{"prompt": "q", "completion": " r"}]
    evaltasks.write_rows(tmp_path / "rows.jsonl", rows)
    (prefix / "tasks" / "data" / "rows.jsonl").write_text((tmp_path / "rows.jsonl").read_text())
    (prefix / "elsewhere" / "more.jsonl").write_text(json.dumps(more[0]) + "\n")
    base = evaltasks.generative(tmp_path, "g", Path("data/rows.jsonl")).read_text()
    common, own = base.split("output_type:", 1)
    (prefix / "tasks" / "common.yaml").write_text("output_type:" + own)
    task = common.replace(
        "    test: data/rows.jsonl",
        f"    test: data/rows.jsonl\n    extra: {prefix / 'elsewhere' / 'more.jsonl'}",
    )
    (prefix / "tasks" / "g.yaml").write_text(task + "include: common.yaml\n")

    (source,) = check_tasks(str(prefix / "tasks" / "g.yaml"))
    assert source.name == "g" and source.file.is_file()
    task_obj = task_manager([source]).load_task_or_group(["g"])["g"]
    docs = list(task_obj.test_docs())
    assert [d["prompt"] for d in docs] == ["p0", "p1", "p2"]
    assert list(task_obj.dataset["extra"])[0]["prompt"] == "q"

    (prefix / "tasks" / "bad.yaml").write_text(task.replace("data/rows.jsonl", "data/nope.jsonl"))
    with pytest.raises(TaskError) as err:
        check_tasks(str(prefix / "tasks" / "bad.yaml"))
    assert str(err.value) == (
        f"{prefix / 'tasks' / 'bad.yaml'}:5: data file {prefix / 'tasks' / 'data' / 'nope.jsonl'} "
        "not found"
    )
    bad_row = prefix / "tasks" / "data" / "bad.jsonl"
    bad_row.write_text('{"prompt": "a"}\n')
    (prefix / "tasks" / "badrow.yaml").write_text(
        task.replace("data/rows.jsonl", "data/bad.jsonl") + "include: common.yaml\n"
    )
    with pytest.raises(TaskError, match=rf"^{re.escape(str(bad_row))}:1: doc_to_target of "
                       rf"{re.escape(str(prefix / 'tasks' / 'badrow.yaml'))} reads a field"):  # fmt: skip
        check_tasks(str(prefix / "tasks" / "badrow.yaml"))
    with pytest.raises(TaskError, match="task file not found"):
        check_tasks(str(prefix / "tasks" / "missing.yaml"))
    local = tmp_path / "local.yaml"
    local.write_text(task.replace("data/rows.jsonl", str(prefix / "tasks/data/rows.jsonl")))
    with pytest.raises(TaskError, match="is in S3 and this task file is local"):
        check_tasks(str(local))
