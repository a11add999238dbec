"""LoRA from an imported Hugging Face base on the real local Ray: a random transformers
GPT-2 (the session dataset's tokenizer) imported as a version, 4 steps of `train.lora` on
2 workers, the adapter registered as its own small version tagged with its base, text
generated from it by `lmforge generate`, a worker SIGKILLed mid-run recovered from, and the
run resumed on 1 worker (the adapters'
optimizer state re-sharded) to step 6."""

from __future__ import annotations

import shutil

import pytest
import torch

from lmforge import checkpoint as ckpt_io
from lmforge import lora, paths
from lmforge.import_hf import import_hf
from lmforge.tracking import registry, store
from lmforge.training.launch import run_training
from tests.integration.conftest import lmforge, tiny_config

transformers = pytest.importorskip("transformers")
NAME = "it-lora-base"
STAGE = 2


def test_lora_from_an_imported_base_registers_generates_and_resumes(
    ray_cluster, dataset, tmp_path, monkeypatch
):
    from lmforge.tokenizer import EOT, load_tokenizer

    tok = load_tokenizer(dataset / "tokenizer.json")
    eos = tok.token_to_id(EOT)
    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "gpt2-random"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    shutil.copyfile(dataset / "tokenizer.json", folder / "tokenizer.json")
    base_uri = f"models:/{NAME}/{import_hf(folder, NAME).version}"
    base = registry.fetch_checkpoint(base_uri)
    base_sha = ckpt_io.weights_sha256(base)

    run = tiny_config(
        dataset, "lora-imported", "train.max_steps=4", "train.checkpoint_every=2",
        "train.eval_every=2", "train.eval_steps=2", "train.warmup_steps=0", "train.lr=0.01",
        "train.lora.r=2", f"zero.stage={STAGE}", "scaling.num_workers=2",
        f"tracking.experiment={NAME}-lora", f"tracking.registered_model={NAME}-lora",
        "run.max_failures=1",
    )  # fmt: skip
    # Rank 1 SIGKILLed after step 3: Ray restarts both workers from the step-2 checkpoint.
    monkeypatch.setenv("LMFORGE_FAULT", "step:3:1")
    monkeypatch.setenv("LMFORGE_FAULT_ONCE", str(tmp_path / "fault"))
    result = run_training(run, init_from=base_uri)
    monkeypatch.delenv("LMFORGE_FAULT")
    assert (tmp_path / "fault.step-3-1").exists()  # it fired, and the run recovered
    ckpt = result.checkpoint
    assert (ckpt / ckpt_io.ADAPTER).is_file() and not (ckpt / ckpt_io.WEIGHTS).exists()
    base_bytes = (base / ckpt_io.WEIGHTS).stat().st_size
    assert (ckpt / ckpt_io.ADAPTER).stat().st_size < 0.05 * base_bytes
    engine_bytes = sum(f.stat().st_size for f in (ckpt / ckpt_io.ENGINE_DIR).rglob("*"))
    assert engine_bytes < base_bytes  # the adapters' optimizer state, not the base's
    # The base the workers read is the version's, bit for bit, and the adapter records it.
    assert ckpt_io.weights_sha256(result.run_dir / "init_from") == base_sha
    assert ckpt_io.read_base(ckpt) == ckpt_io.BaseRef(
        base_uri, str(result.run_dir / "init_from"), base_sha
    )

    c = store.client(store.resolve_uri())
    versions = c.search_model_versions(f"name='{NAME}-lora'")
    assert sorted(int(v.tags["step"]) for v in versions) == [2, 4]
    assert {(v.tags["base_version"], v.tags["adapter"]) for v in versions} == {(base_uri, "lora")}
    newest = max(versions, key=lambda v: int(v.version))
    uri = f"models:/{NAME}-lora/{newest.version}"

    # Loaded through its version: base + adapter; the base's weights untouched.
    fetched = registry.fetch_checkpoint(uri)
    assert ckpt_io.weights_sha256(fetched / ckpt_io.BASE_DIR) == base_sha
    model, _, _ = ckpt_io.load_model(fetched)
    plain, _, _ = ckpt_io.load_model(base)
    kept = lora.base_state_dict(model)
    assert all(torch.equal(kept[k], v) for k, v in plain.state_dict().items())
    x = torch.randint(0, tok.get_vocab_size(), (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x)[0] - plain(x)[0]).abs().max() > 1e-4  # the adapters learned

    out = lmforge(paths.home(), "generate", "--model", uri, "--prompt", "ROMEO:",
                  "--max-new-tokens", 8, "--seed", 0)  # fmt: skip
    assert out.stdout.startswith("ROMEO:") and len(out.stdout.strip()) > len("ROMEO:")

    saved = ckpt_io.read_config(ckpt)  # the base's model shape, as the run resolved it
    resumed = run_training(
        saved.model_copy(
            update={
                "train": saved.train.model_copy(update={"max_steps": 6}),
                "scaling": saved.scaling.model_copy(update={"num_workers": 1}),
            }
        ),
        resume=str(result.run_dir),
    )
    state = ckpt_io.read_state(resumed.checkpoint)
    assert state.step == 6 and state.world_size == 1
    assert ckpt_io.read_base(resumed.checkpoint).sha256 == base_sha
    steps = sorted(int(v.tags["step"]) for v in c.search_model_versions(f"name='{NAME}-lora'"))
    assert steps == [2, 4, 6]
