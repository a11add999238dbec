"""The HF export loads offline as GPT-2 and gives our logits and our token ids."""

import subprocess
import sys

import pytest
import torch

from lmforge import models
from lmforge.checkpoint import CheckpointError, TrainerState, save_servable, seal
from lmforge.config import Config, ModelConfig
from lmforge.export_hf import export_hf
from lmforge.tokenizer import EOT, eot_id, train_tokenizer

transformers = pytest.importorskip("transformers")

TEXT = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
] * 3
SAMPLE = "To be, or not to be: the slings of fortune! Ünïcode too."


@pytest.fixture
def checkpoint(tmp_path):
    tok = train_tokenizer(TEXT, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = Config(
        model=ModelConfig(
            n_layer=2, n_head=2, d_model=32, context_length=32, vocab_size=tok.get_vocab_size()
        )
    )
    torch.manual_seed(0)
    model = models.build(cfg.model).eval()
    ckpt = tmp_path / "checkpoint_00000001"
    save_servable(ckpt, model.state_dict(), cfg, tmp_path / "tokenizer.json", TrainerState(1))
    seal(ckpt)
    return ckpt, model, tok


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_model_loads_as_gpt2_with_our_logits(checkpoint, tmp_path, offline):
    ckpt, model, _ = checkpoint
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, transformers.GPT2LMHeadModel)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # still tied
    x = torch.randint(0, model.cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(x)
        theirs = hf(x).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_tokenizer_gives_our_ids(checkpoint, tmp_path, offline):
    ckpt, model, tok = checkpoint
    hf_tok = transformers.AutoTokenizer.from_pretrained(export_hf(ckpt, tmp_path / "hf"))
    ids = tok.encode(SAMPLE).ids
    assert hf_tok.encode(SAMPLE) == ids
    assert hf_tok.decode(ids) == SAMPLE
    assert hf_tok.eos_token == EOT
    assert hf_tok.eos_token_id == eot_id(tok)
    assert hf_tok.model_max_length == model.cfg.context_length


def test_refuses_non_empty_output_unless_overwrite(checkpoint, tmp_path):
    ckpt, _, _ = checkpoint
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="hf: output dir is not empty"):
        export_hf(ckpt, out)
    assert (out / "notes.txt").exists()
    export_hf(ckpt, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: checkpoint dir not found"):
        export_hf(tmp_path / "nowhere", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_does_not_import_transformers():
    code = "import sys, lmforge.export_hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
