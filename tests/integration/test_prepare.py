"""`lmforge prepare` on a real local Ray: counts, determinism, input formats, bad input."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.dataset import Dataset
from lmforge.data.prepare import PrepareOptions, prepare
from lmforge.data.readers import CorpusError
from lmforge.tokenizer import load_tokenizer
from tests.integration.conftest import PLAYS


def test_manifest_counts_match_the_corpus(dataset, corpus):
    ds = Dataset(dataset)
    m = ds.manifest
    tok = load_tokenizer(ds.tokenizer_path)
    texts = [p.read_text() for p in sorted(corpus.glob("*.txt"))]
    expected = sum(len(tok.encode(t, add_special_tokens=False).ids) + 1 for t in texts)
    assert m["documents"] == len(texts)
    assert m["tokens"] == expected == ds.tokens("train") + ds.tokens("val")
    assert abs(ds.tokens("val") / m["tokens"] - 0.05) < 0.01
    stored = sum(
        len(row)
        for split in ("train", "val")
        for shard in m["splits"][split]["shards"]
        for row in pq.read_table(dataset / shard["file"]).column("tokens").to_pylist()
    )
    assert stored == m["tokens"]
    assert m["tokenizer"]["vocab_size"] == tok.get_vocab_size() <= 512


def test_prepare_is_deterministic(ray_cluster, corpus, tmp_path):
    a = prepare([corpus], tmp_path / "a", PrepareOptions(vocab_size=300, seq_tokens=128))
    b = prepare([corpus], tmp_path / "b", PrepareOptions(vocab_size=300, seq_tokens=128))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare([corpus], tmp_path / "a", PrepareOptions(vocab_size=300))


def test_jsonl_parquet_and_tokenizer_reuse(ray_cluster, dataset, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    docs = ["To be or not to be.", "床前明月光 🌙", "Once more unto the breach."]
    (src / "a.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs))
    )
    pq.write_table(pa.table({"text": docs}), src / "b.parquet")
    reuse = dataset / "tokenizer.json"
    m = prepare([src], tmp_path / "out", PrepareOptions(tokenizer=reuse, val_fraction=0.0))
    tok = load_tokenizer(reuse)
    assert m["documents"] == 6
    assert m["tokens"] == 2 * sum(len(tok.encode(t).ids) + 1 for t in docs)
    assert m["tokenizer"]["sha256"] == Dataset(dataset).tokenizer_sha256


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", r"empty.txt: the corpus is empty"),
        ("bad.jsonl", b'{"text": "ok"}\n{"body": "no text"}\n', r"bad.jsonl:2: no 'text' field"),
        ("latin1.txt", "café".encode("latin-1"), r"latin1.txt: not UTF-8"),
        ("broken.jsonl", b'{"text": "ok"}\n{oops\n', r"broken.jsonl:2: not valid JSON"),
    ],
)
def test_bad_corpus_is_a_one_line_error_naming_the_file(
    ray_cluster, tmp_path, name, content, message
):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError, match=message) as err:
        prepare([tmp_path / name], tmp_path / "out", PrepareOptions(vocab_size=300))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_bad_corpus_found_by_the_ray_tasks_is_named_too(ray_cluster, dataset, tmp_path):
    # With a given tokenizer the driver never reads the text: the error comes from Ray Data.
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"body": 1}\n')
    opts = PrepareOptions(tokenizer=dataset / "tokenizer.json")
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: no 'text' field"):
        prepare([tmp_path / "bad.jsonl"], tmp_path / "out", opts)


def test_missing_input_path(tmp_path):
    with pytest.raises(CorpusError, match="nowhere: no such file"):
        prepare([tmp_path / "nowhere"], tmp_path / "out", PrepareOptions())


@pytest.mark.ray  # a private one, without the session's cluster
def test_prepare_job_without_a_cluster_starts_a_private_ray(corpus, tmp_path):
    """jobs/prepare.py (`lmforge prepare`'s code path) where no cluster runs: the entry point
    connects, to a private local Ray, and the library uses it."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["LMFORGE_HOME"] = str(tmp_path / "home")  # no `lmforge cluster up` recorded here
    out = tmp_path / "out"
    cmd = [sys.executable, "jobs/prepare.py", "--input", str(corpus / PLAYS[0]),
           "--output", str(out), "--vocab-size", "300", "--seq-tokens", "128"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "a private local Ray" in run.stderr + run.stdout
    assert f"dataset: {out}" in run.stdout and Dataset(out).tokens("train") > 0


def test_an_eos_named_only_in_tokenizer_config_ends_every_document(
    ray_cluster, dataset, corpus, tmp_path
):
    """A model's tokenizer whose eos is set only in tokenizer_config.json (as Llama-3-Instruct's
    `<|eot_id|>`): the Ray tasks end each document with it, not with the `<|endoftext|>` the
    tokenizer also has, and the files stay with the dataset and its checkpoints."""
    from lmforge import models
    from lmforge.checkpoint import TrainerState, load_model, save_servable, seal
    from lmforge.config import load_config
    from lmforge.tokenizer import eot_id
    from tests.conftest import REPO

    tok = load_tokenizer(dataset / "tokenizer.json")
    tok.add_special_tokens(["<|eot_id|>"])
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    opts = PrepareOptions(tokenizer=model_dir / "tokenizer.json", seq_tokens=128)
    m = prepare([corpus], tmp_path / "out", opts)
    eos, fallback = tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|endoftext|>")
    ds = Dataset(tmp_path / "out")
    tokens = [
        t
        for split in ("train", "val")
        for shard in m["splits"][split]["shards"]
        for row in pq.read_table(ds.path / shard["file"]).column("tokens").to_pylist()
        for t in row
    ]
    assert tokens.count(eos) == m["documents"] == len(list(corpus.glob("*.txt")))
    assert tokens.count(fallback) == 0
    assert m["tokenizer"]["eot_id"] == eos and ds.eot_token == "<|eot_id|>"
    assert (ds.path / "tokenizer_config.json").read_text() == (
        model_dir / "tokenizer_config.json"
    ).read_text()
    cfg = load_config(
        REPO / "jobs" / "configs" / "tiny.yaml", [f"model.vocab_size={len(tok.get_vocab())}"]
    )
    ckpt = tmp_path / "ckpt"
    save_servable(
        ckpt, models.build(cfg.model).state_dict(), cfg, ds.tokenizer_path, TrainerState(1)
    )
    seal(ckpt)
    assert (ckpt / "tokenizer_config.json").is_file()
    assert eot_id(load_model(ckpt)[1]) == eos
    ds.require_tokenizer(ckpt / "tokenizer.json", "the checkpoint")
