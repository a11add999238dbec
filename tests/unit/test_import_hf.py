"""`lmforge import-hf`: a random transformers GPT-2, saved with `save_pretrained`, imported
gives transformers' logits and greedy tokens; bad folders are refused in one line before
anything is written; the imported version registers in a real SQLite MLflow store and
loads back. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge import checkpoint as ckpt_io  # noqa: E402
from lmforge.cli import main  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.generation import SamplingParams, generate_tokens  # noqa: E402
from lmforge.import_hf import HfImportError, import_hf, read_folder, write_checkpoint  # noqa: E402
from lmforge.tokenizer import eot_id, load_tokenizer, train_tokenizer  # noqa: E402
from lmforge.tracking import registry, store  # noqa: E402

TEXT = ["to be or not to be, that is the question; whether tis nobler in the mind"] * 30
SIZES = {"n_positions": 128, "n_embd": 32, "n_layer": 2, "n_head": 4}


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(TEXT, vocab_size=300).save(str(d / "tokenizer.json"))
    return d / "tokenizer.json"


def hf_folder(out: Path, tokenizer: Path | None, shard: str | None = None, **config):
    """A random GPT2LMHeadModel saved to `out` (safetensors), with `tokenizer` beside it."""
    tok = load_tokenizer(tokenizer) if tokenizer else None
    eot = eot_id(tok) if tok else 0
    kwargs = {"vocab_size": tok.get_vocab_size() if tok else 300, **SIZES, **config}
    cfg = transformers.GPT2Config(bos_token_id=eot, eos_token_id=eot, **kwargs)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # biases and LayerNorms away from their init, so a mixup shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    if tokenizer:
        shutil.copyfile(tokenizer, out / "tokenizer.json")
        config_json = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
        (out / "tokenizer_config.json").write_text(json.dumps(config_json))
    return model


def imported(folder: Path, into: Path):
    write_checkpoint(read_folder(folder), into, "unit")
    return ckpt_io.load_model(into)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_imported_gpt2_gives_transformers_logits_and_greedy_tokens(tmp_path, tokenizer_file, shard):
    hf = hf_folder(tmp_path / "hf", tokenizer_file, shard=shard)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
        assert not (tmp_path / "hf" / "model.safetensors").exists()
    model, tok, cfg = imported(tmp_path / "hf", tmp_path / "ckpt")
    assert (cfg.model.arch, cfg.model.context_length, cfg.model.d_model) == ("gpt2", 128, 32)
    ids = torch.randint(
        0, cfg.model.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-5

    prompt = ids[0, :70].tolist()  # longer than half the context
    greedy = SamplingParams(max_new_tokens=30, temperature=0.0, top_k=None)
    got = list(generate_tokens(model, prompt, greedy))
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(30):
            seq = torch.cat([seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got == seq[0, 70:].tolist()
    assert eot_id(tok) == tok.token_to_id("<|endoftext|>")
    # The tokenizer's own files travel with the checkpoint.
    assert json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())["eos_token"]
    assert ckpt_io.is_complete(tmp_path / "ckpt")


def _refused(folder: Path, match: str) -> str:
    with pytest.raises(LmforgeError, match=match) as info:
        read_folder(folder)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_bad_folders_are_refused_in_one_line_naming_the_culprit(tmp_path, tokenizer_file):
    bad = tmp_path / "arch"
    hf_folder(bad, tokenizer_file)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    assert "GPT2LMHeadModel" in _refused(bad, "architectures='BertModel' is not supported")

    hf_folder(tmp_path / "notok", None)
    _refused(tmp_path / "notok", "no tokenizer.json")

    sizes = tmp_path / "sizes"
    hf_folder(sizes, tokenizer_file)
    (sizes / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    _refused(sizes, r"does not match the weights: tensor \S+ has shape \[")
    (sizes / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    _refused(sizes, "does not match the weights: tensor h.2.")

    small = tmp_path / "small"
    hf_folder(small, tokenizer_file, vocab_size=100)
    _refused(small, r"tokenizer.json: \d+ tokens, more than the model's vocab_size=100")

    for key, value in (
        ("activation_function", "relu"),
        ("n_inner", 48),
        ("layer_norm_epsilon", 1e-6),
        ("scale_attn_by_inverse_layer_idx", True),
        ("reorder_and_upcast_attn", True),
        ("tie_word_embeddings", False),
    ):
        (sizes / "config.json").write_text(json.dumps({**config, key: value}))
        _refused(sizes, f"config.json {key}=")


def test_pickled_weights_only_are_refused(tmp_path, tokenizer_file):
    folder = tmp_path / "bin"
    hf_folder(folder, tokenizer_file)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    assert "safetensors" in _refused(folder, "only pickled weights").split("lmforge does not")[1]


def test_a_refused_import_writes_nothing(tracking_uri, tmp_path, tokenizer_file):
    folder = tmp_path / "hf"
    hf_folder(folder, tokenizer_file, vocab_size=100)
    uri = tracking_uri
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(HfImportError):
        import_hf(folder, "unit", tracking_uri=uri)
    assert sorted(tmp_path.rglob("*")) == before  # no store, no checkpoint


def test_an_import_registers_a_version_that_loads(tracking_uri, tmp_path, tokenizer_file, capsys):
    hf = hf_folder(tmp_path / "my-gpt2", tokenizer_file)
    uri = tracking_uri
    before = os.environ.get("MLFLOW_TRACKING_URI")
    version = import_hf(tmp_path / "my-gpt2", "unit", tracking_uri=uri)
    assert str(version.version) == "1"
    # MLflow's fluent API set MLFLOW_TRACKING_URI for the registration only: left set, it
    # would be every later lmforge call's store in this process.
    assert os.environ.get("MLFLOW_TRACKING_URI") == before
    assert version.tags["source"] == str((tmp_path / "my-gpt2").resolve())
    assert version.tags["arch"] == "gpt2" and version.tags["hf_architecture"] == "GPT2LMHeadModel"
    assert version.tags["n_params"] == str(sum(p.numel() for p in hf.parameters()))
    c = store.client(uri)
    run = c.get_run(version.run_id)
    assert run.info.run_name == "import-my-gpt2" and run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "32"
    assert c.get_experiment(run.info.experiment_id).name == "unit"

    ckpt = registry.fetch_checkpoint("models:/unit/1", uri)
    assert (ckpt / "tokenizer_config.json").is_file()
    model, tok, cfg = ckpt_io.load_model(ckpt)
    ids = torch.arange(20).view(1, 20)
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() < 1e-5
    assert ckpt_io.read_state(ckpt).step == 0
    # `lmforge prepare --tokenizer models:/unit/1` tokenizes with the version's own tokenizer;
    # a folder (the HF model's, the checkpoint's) means the tokenizer.json in it.
    from lmforge.cli import tokenizer_file

    assert tokenizer_file("models:/unit/1", uri) == ckpt / "tokenizer.json"
    assert tokenizer_file(str(tmp_path / "my-gpt2")) == tmp_path / "my-gpt2" / "tokenizer.json"
    # A second import, from the command line, is a second version.
    assert main(["import-hf", "--input", str(tmp_path / "my-gpt2"), "--model", "unit",
                 "--tracking-uri", uri]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip().endswith("registered models:/unit/2")
    (tmp_path / "my-gpt2" / "model.safetensors").rename(tmp_path / "my-gpt2" / "pytorch_model.bin")
    assert main(["import-hf", "--input", str(tmp_path / "my-gpt2"), "--model", "unit",
                 "--tracking-uri", uri]) == 2  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmforge import-hf: error: ") and "pytorch_model.bin" in err
    assert "\n" not in err
    assert len(store.client(uri).search_model_versions("name='unit'")) == 2


def test_a_tokenizer_without_endoftext_uses_the_models_eos(tmp_path):
    """A Llama-style tokenizer (`</s>`, no `<|endoftext|>`): its eos from the folder's files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate("abcdef ")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    assert eot_id(load_tokenizer(tmp_path / "tokenizer.json")) == 2  # a known end token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>"}))
    assert eot_id(load_tokenizer(tmp_path / "tokenizer.json")) == 1  # the configured one wins
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eot>"}))
    with pytest.raises(LmforgeError, match="eos_token '<eot>' is not in"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_a_llama_folder_imports_through_the_same_path_with_its_own_eos(tmp_path):
    """Generic over `Architecture.from_hf`: a Llama (grouped-query, untied) whose end token
    is neither `<|endoftext|>` nor `</s>` but config.json's eos_token_id imports, matches
    transformers, and its checkpoint's tokenizer ends text with that token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lmforge.import_hf import supported

    if "LlamaForCausalLM" not in supported():
        pytest.skip("lmforge.models.llama maps no LlamaForCausalLM yet")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|eot|>": 3}
    vocab.update({c: i + 4 for i, c in enumerate("abcdefgh ")})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "hf" / "tokenizer.json"))  # no tokenizer_config.json: config.json's eos
    model, tok, got = imported(tmp_path / "hf", tmp_path / "ckpt")
    assert (got.model.arch, got.model.n_kv_head, got.model.tie_embeddings) == ("llama", 2, False)
    assert eot_id(tok) == 3  # config.json's eos_token_id, not the `</s>` it also has
    assert json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text()) == {
        "eos_token": "<|eot|>"
    }
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max().item() < 1e-5
