"""What `lmforge prepare` refuses before it starts Ray: nothing of the user's is clobbered."""

import pytest

from lmforge.data.prepare import PrepareOptions, check_output


def test_an_existing_non_dataset_dir_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not empty and not a dataset"):
            check_output(out, [], overwrite)
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_dataset_is_replaced_only_with_overwrite(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output(tmp_path / "ds", [], overwrite=False)
    check_output(tmp_path / "ds", [], overwrite=True)
    check_output(tmp_path / "new", [], overwrite=False)  # a new dir is fine


def test_output_holding_the_inputs_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="holds input files"):
        check_output(tmp_path, [tmp_path / "a.txt"], overwrite=True)


@pytest.mark.parametrize(
    "kw, flag",
    [({"vocab_size": 100}, "--vocab-size"), ({"val_fraction": 1.0}, "--val-fraction"),
     ({"seq_tokens": 1}, "--seq-tokens"), ({"rows_per_group": 0}, "--rows-per-group")],
)  # fmt: skip
def test_bad_options_name_the_flag(kw, flag):
    with pytest.raises(ValueError, match=flag):
        PrepareOptions(**kw)


@pytest.mark.parametrize(
    "name, content, where",
    [("latin1.txt", "café".encode("latin-1"), "latin1.txt"),
     ("lines.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "lines.jsonl:2")],
)  # fmt: skip
def test_non_utf8_text_is_named_with_its_file(tmp_path, name, content, where):
    from lmforge.data.readers import CorpusError, read_documents

    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError, match=f"{tmp_path / where}: not UTF-8 text") as err:
        list(read_documents(tmp_path / name))
    assert "\n" not in str(err.value)


def test_a_zero_length_corpus_is_named_before_ray_starts(tmp_path):
    from lmforge.data.prepare import prepare
    from lmforge.data.readers import CorpusError

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_bytes(b"")
    with pytest.raises(CorpusError, match=f"--input {tmp_path / 'corpus'}: the corpus is empty"):
        prepare([tmp_path / "corpus"], tmp_path / "out", PrepareOptions())
    assert not (tmp_path / "out").exists()


def test_prepare_uses_the_callers_ray_and_starts_none(tmp_path):
    """The library never decides how to connect: without a connected Ray it refuses (Ray
    Data would otherwise start a Ray of its own, without the cluster's address or token).
    In a fresh process: this one may hold the integration tests' connection."""
    import subprocess
    import sys

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("to be or not to be")
    script = f"""
import sys
from lmforge.data.prepare import PrepareOptions, prepare
try:
    prepare([{str(tmp_path / "corpus")!r}], {str(tmp_path / "out")!r}, PrepareOptions())
except RuntimeError as err:
    print(err)
    import ray
    sys.exit(3 if ray.is_initialized() else 0)
sys.exit(4)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "lmforge.cluster.connect()" in out.stdout
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()


def test_lmforge_prepare_checks_its_input_before_it_connects(tmp_path, monkeypatch):
    from lmforge import cli, cluster

    calls = []
    monkeypatch.setattr(cluster, "connect", lambda: calls.append("connect"))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "empty.txt").write_bytes(b"")
    out = tmp_path / "out"
    assert cli.main(["prepare", "--input", str(tmp_path / "corpus"), "--output", str(out)]) == 2
    assert calls == [] and not out.exists()
