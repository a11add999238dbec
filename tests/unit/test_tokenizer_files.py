"""The tokenizer's transformers files travel with the data: an eos named only in
`tokenizer_config.json` (as Llama-3-Instruct's `<|eot_id|>`) ends every document a prepare
task tokenizes, stays in the dataset dir, its checkpoints and their registered copy, and is
part of the tokenizer identity the launch plan checks. A padded model vocabulary (larger than
the tokenizer's) fine-tunes; a smaller one is refused naming both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from lmforge import checkpoint as ckpt_io
from lmforge import models
from lmforge.config import ConfigError, load_config
from lmforge.data.dataset import Dataset, DatasetError
from lmforge.data.prepare import PrepareOptions, _tokenize_batch, split_and_write
from lmforge.tokenizer import (
    EOT,
    copy_tokenizer,
    eot_id,
    load_tokenizer,
    read_tokenizer_files,
    train_tokenizer,
)
from lmforge.tracking.registry import stage_servable
from lmforge.training.plan import build_plan, check_fits_dataset
from tests.conftest import REPO

EOS = "<|eot_id|>"
TEXT = ["to be or not to be, that is the question", "whether tis nobler in the mind to suffer"]


@pytest.fixture
def hf_tok(tmp_path) -> Path:
    """A tokenizer folder whose eos is named only in tokenizer_config.json; it also has
    `<|endoftext|>`, the end token lmforge falls back to without that file."""
    tok = train_tokenizer(TEXT * 20, vocab_size=300)
    tok.add_special_tokens([EOS])
    folder = tmp_path / "hf"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": EOS}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": EOS}))
    return folder / "tokenizer.json"


def dataset_from(tok_file: Path, out: Path, corpus: Path) -> Dataset:
    """A dataset dir as prepare writes it, the tokenize task run in this process."""
    out.mkdir()
    copy_tokenizer(tok_file, out)
    table = _tokenize_batch(pa.table({"path": [str(corpus)]}), read_tokenizer_files(tok_file))
    docs = [np.asarray(x, dtype=np.int32) for x in table.column("ids").to_pylist()]
    opts = PrepareOptions(seq_tokens=32, rows_per_group=2)
    split_and_write(iter(docs), out, load_tokenizer(out / "tokenizer.json"), opts, sources=[])
    return Dataset(out)


@pytest.fixture
def corpus(tmp_path) -> Path:
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"text": TEXT[i % 2] * 3}) for i in range(40)))
    return f


def test_a_configured_eos_ends_every_document_of_a_prepare_task(hf_tok, corpus):
    tok = load_tokenizer(hf_tok)
    eos, fallback = tok.token_to_id(EOS), tok.token_to_id(EOT)
    assert eot_id(tok) == eos != fallback
    table = _tokenize_batch(pa.table({"path": [str(corpus)]}), read_tokenizer_files(hf_tok))
    docs = table.column("ids").to_pylist()
    assert len(docs) == 40
    assert all(d[-1] == eos and eos not in d[:-1] and fallback not in d for d in docs)
    # Without the file the fallback ends them: the file is what the task was given.
    bare = {"tokenizer.json": hf_tok.read_text()}
    other = _tokenize_batch(pa.table({"path": [str(corpus)]}), bare).column("ids").to_pylist()
    assert all(d[-1] == fallback for d in other)


def test_the_eos_survives_into_the_dataset_checkpoints_and_versions(hf_tok, corpus, tmp_path):
    ds = dataset_from(hf_tok, tmp_path / "ds", corpus)
    tok = load_tokenizer(ds.tokenizer_path)
    eos = tok.token_to_id(EOS)
    assert ds.eot_token == EOS and ds.manifest["tokenizer"]["eot_id"] == eos
    assert ds.manifest["tokenizer"]["eot_token"] == EOS
    assert ds.manifest["tokenizer"]["files"] == [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"
    ]  # fmt: skip
    stored = np.concatenate(
        [np.asarray(r) for u in ds.units("train") + ds.units("val") for r in _rows(u)]
    )
    assert (stored == eos).sum() == ds.manifest["documents"] == 40
    assert (stored == tok.token_to_id(EOT)).sum() == 0

    # A checkpoint of a run on it (the trainer saves with the dataset's tokenizer path) and
    # the copy the registry logs keep the files: the model ends text with the same eos.
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", ["model.vocab_size=320"])
    ckpt = tmp_path / "run" / "checkpoint_00000001"
    state = ckpt_io.TrainerState(step=1)
    ckpt_io.save_servable(ckpt, models.build(cfg.model).state_dict(), cfg, ds.tokenizer_path, state)
    ckpt_io.seal(ckpt)
    staged = stage_servable(ckpt, tmp_path / "staged")
    for where in (ckpt, staged):
        assert (where / "tokenizer_config.json").read_text() == hf_tok.with_name(
            "tokenizer_config.json"
        ).read_text()
        assert (where / "special_tokens_map.json").is_file()
        assert eot_id(ckpt_io.load_model(where)[1]) == eos
        ds.require_tokenizer(where / "tokenizer.json", str(where))  # the same identity
    assert ckpt_io.incomplete(staged) is None


def test_a_tokenizer_that_differs_only_in_its_eos_is_refused_naming_both(hf_tok, corpus, tmp_path):
    ds = dataset_from(hf_tok, tmp_path / "ds", corpus)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes(hf_tok.read_bytes())  # same ids, no config file
    with pytest.raises(DatasetError) as err:
        ds.require_tokenizer(bare / "tokenizer.json", "--init-from models:/m/1")
    msg = str(err.value)
    assert f"its documents end with {EOS!r}" in msg and f"{EOT!r}" in msg
    assert "--init-from models:/m/1" in msg and "\n" not in msg
    # A dataset whose listed tokenizer_config.json went missing is refused on open.
    (ds.path / "tokenizer_config.json").unlink()
    with pytest.raises(DatasetError, match="tokenizer_config.json: tokenizer file listed"):
        Dataset(ds.path)


def _rows(unit):
    import pyarrow.parquet as pq

    with pq.ParquetFile(unit.file) as pf:
        return pf.read_row_group(unit.row_group).column("tokens").to_pylist()


def test_a_padded_model_vocab_fine_tunes_and_a_smaller_one_is_refused(hf_tok, corpus, tmp_path):
    """A Llama whose embedding is padded past its tokenizer (as Qwen2's and GPT-NeoX's are),
    imported, then `train --init-from` on a dataset prepared with its tokenizer."""
    transformers = pytest.importorskip("transformers")
    import torch

    from lmforge.import_hf import read_folder, write_checkpoint

    n_tok = load_tokenizer(hf_tok).get_vocab_size()
    padded = -(-n_tok // 64) * 64 + 64  # rounded up past the tokenizer, as a padded model is
    hf_cfg = transformers.LlamaConfig(
        vocab_size=padded, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = hf_tok.parent
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(folder)
    ckpt = tmp_path / "imported"
    write_checkpoint(read_folder(folder), ckpt, "padded")
    ds = dataset_from(ckpt / "tokenizer.json", tmp_path / "ds", corpus)
    assert ds.vocab_size == n_tok < padded

    overrides = [f"run.storage_path={tmp_path / 'runs'}", f"data.path={ds.path}",
                 "tracking.enabled=false", "scaling.num_workers=2"]  # fmt: skip
    cfg = load_config(REPO / "jobs" / "configs" / "tiny.yaml", overrides)
    plan = build_plan(cfg, init_from=str(ckpt))
    assert plan.config.model.vocab_size == padded and plan.config.model.arch == "llama"

    small = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": 100})})
    with pytest.raises(ConfigError) as err:
        check_fits_dataset(small, ds)
    msg = str(err.value)
    assert msg.startswith(f"model.vocab_size=100 but the dataset's tokenizer has {n_tok} tokens")
    assert "\n" not in msg
