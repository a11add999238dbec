"""LoRA from an imported Hugging Face base, trained on 2 local workers: a random
transformers GPT-2 (the session dataset's tokenizer) imported as a version, `train.lora` at
each ZeRO stage, the adapter registered as its own small version tagged with its base, text
generated from it by `lmforge generate`, and the run resumed on 1 worker (the adapters'
optimizer state re-sharded) to step 6. (A worker killed mid-run and restarted by Ray:
tests/integration/test_resilience.py.)"""

from __future__ import annotations

import shutil

import pytest
import torch

from lmforge import checkpoint as ckpt_io
from lmforge import lora, paths
from lmforge.import_hf import import_hf
from lmforge.tracking import registry, store
from tests.integration.conftest import lmforge
from tests.trainer.conftest import check_golden, tiny_config, train

transformers = pytest.importorskip("transformers")
NAME = "it-lora-base"
STAGE = 2


@pytest.fixture(scope="module")
def imported_base(dataset, tmp_path_factory):
    """A random transformers GPT-2 on the dataset's tokenizer, imported as a version:
    (its URI, its fetched checkpoint, its weights' sha256, the tokenizer)."""
    from lmforge.tokenizer import EOT, load_tokenizer

    tok = load_tokenizer(dataset / "tokenizer.json")
    eos = tok.token_to_id(EOT)
    cfg = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=64, n_layer=2, n_head=2,
        bos_token_id=eos, eos_token_id=eos,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "gpt2-random"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    shutil.copyfile(dataset / "tokenizer.json", folder / "tokenizer.json")
    uri = f"models:/{NAME}/{import_hf(folder, NAME).version}"
    base = registry.fetch_checkpoint(uri)
    return uri, base, ckpt_io.weights_sha256(base), tok


def lora_config(dataset, name, stage, *overrides):
    return tiny_config(
        dataset, name, "train.max_steps=4", "train.checkpoint_every=2",
        "train.eval_every=2", "train.eval_steps=2", "train.warmup_steps=0", "train.lr=0.01",
        "train.lora.r=2", f"zero.stage={stage}", "scaling.num_workers=2", *overrides,
    )  # fmt: skip


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_lora_trains_at_every_zero_stage(dataset, imported_base, stage):
    """Adapters only, the base frozen, at ZeRO 0, 1 and 3 (2: the test below)."""
    uri, base, base_sha, _ = imported_base
    result = train(
        lora_config(dataset, f"lora-zero{stage}", stage, "train.max_steps=3",
                    "train.checkpoint_every=3", "tracking.enabled=false"),
        init_from=uri,
    )  # fmt: skip
    check_golden(f"lora-zero{stage}", result)
    ckpt = result.checkpoint
    assert (ckpt / ckpt_io.ADAPTER).is_file() and not (ckpt / ckpt_io.WEIGHTS).exists()
    assert ckpt_io.read_base(ckpt).sha256 == base_sha
    model, _, _ = ckpt_io.load_model(ckpt)  # the base found beside it (the run's init_from/)
    plain, _, _ = ckpt_io.load_model(base)
    kept = lora.base_state_dict(model)
    assert all(torch.equal(kept[k], v) for k, v in plain.state_dict().items())
    x = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(x)[0] - plain(x)[0]).abs().max() > 1e-4  # the adapters learned


def test_lora_from_an_imported_base_registers_generates_and_resumes(dataset, imported_base):
    base_uri, base, base_sha, tok = imported_base
    run = lora_config(
        dataset, "lora-imported", STAGE,
        f"tracking.experiment={NAME}-lora", f"tracking.registered_model={NAME}-lora",
    )  # fmt: skip
    result = train(run, init_from=base_uri)
    check_golden("lora-zero2", result)

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
    resumed = train(
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
