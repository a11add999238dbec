"""MLflow end to end with runs on 2 local workers and a real SQLite-backed MLflow store: every run
tracked, every checkpoint a registered version, every version generates, resumes and
fine-tunes; an unreachable tracking server does not fail training."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge.tracking import registry, store
from tests.trainer.conftest import tiny_config, train

MODEL = "it-track"
STEPS = 30


def _client():
    return store.client(store.resolve_uri())


def _versions(name=MODEL):
    return sorted(_client().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=300,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tracked(dataset):
    """A 2-worker run with checkpoints (and so registrations) at steps 10, 20 and 30."""
    cfg = tiny_config(
        dataset, "tracked", f"train.max_steps={STEPS}", "train.checkpoint_every=10",
        "train.eval_every=10", "tracking.experiment=it-tracking",
        f"tracking.registered_model={MODEL}",
    )  # fmt: skip
    return cfg, train(cfg)


def test_each_checkpoint_is_a_version_with_its_tags_and_best_alias(tracked, dataset):
    cfg, result = tracked
    versions = _versions()
    assert [int(v.tags["step"]) for v in versions] == [10, 20, 30]
    manifest_sha = json.loads((result.run_dir / "checkpoint_00000030" / "trainer_state.json")
                              .read_text())["dataset"]["manifest_sha256"]  # fmt: skip
    for v in versions:
        step = int(v.tags["step"])
        assert v.run_id == v.tags["run_id"] == result.mlflow_run_id
        assert v.tags["ray_checkpoint_uri"] == str(result.run_dir / f"checkpoint_{step:08d}")
        assert int(v.tags["tokens_seen"]) == step * 2 * 8 * 64  # workers * batch * context
        assert v.tags["dataset_manifest_sha256"] == manifest_sha
        assert math.isfinite(float(v.tags["val_loss"]))
        assert f"Step {step} of run tracked" in v.description
    best = min(versions, key=lambda v: float(v.tags["val_loss"]))
    assert registry.get_version(f"models:/{MODEL}@best").version == best.version
    assert registry.get_version(f"models:/{MODEL}@latest").version == versions[-1].version
    assert registry.get_version(f"models:/{MODEL}/latest").version == versions[-1].version


def test_run_has_params_per_step_metrics_tags_and_artifacts(tracked):
    cfg, result = tracked
    # The end of a run sums up its speed (what the benchmarks read too).
    assert result.metrics["steady_tokens_per_s"] > 0 and result.metrics["steady_mfu"] > 0
    assert 0 <= result.metrics["data_wait_fraction"] < 1
    c = _client()
    run = c.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "tracked"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["scaling.num_workers"] == "2"
    assert int(run.data.params["model.n_params"]) > 0
    tags = run.data.tags
    assert tags["lmforge.run_dir"] == str(result.run_dir)
    assert "ray.job_id" not in tags  # a local run (a Ray run's: test_cli_end_to_end.py)
    assert len(tags["dataset.manifest_sha256"]) == 64
    loss = c.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))  # every step, once
    for key in ("lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_s"):
        assert len(c.get_metric_history(run.info.run_id, key)) == STEPS
    val = c.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in val) == [0, 10, 20, 30]
    ppl = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "val_perplexity")}
    assert all(math.isclose(ppl[m.step], math.exp(m.value), rel_tol=1e-6) for m in val)
    artifacts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "dataset"} <= artifacts
    config = c.download_artifacts(run.info.run_id, "config.yaml")
    assert f"max_steps: {STEPS}" in Path(config).read_text()


def test_pyfunc_generates_in_a_fresh_process(tracked, tmp_path):
    """`mlflow models predict` (a new process, another working dir) with sampling params
    generates what lmforge's sampler generates with them from the @best version's
    checkpoint: the version carries that checkpoint's weights and tokenizer, and the params
    reach the sampler."""
    from lmforge.checkpoint import load_model, resolve_checkpoint
    from lmforge.generation import complete_samples
    from lmforge.tracking.pyfunc_model import sampling_params

    params = {"max_new_tokens": 12, "seed": 3}
    request = {"inputs": ["ROMEO:"], "params": params}
    (tmp_path / "in.json").write_text(json.dumps(request))
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "predict",
         "-m", f"models:/{MODEL}@best", "-i", "in.json", "-t", "json", "--env-manager", "local"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": store.resolve_uri()},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (prediction,) = json.loads(out.stdout.strip().splitlines()[-1])["predictions"]
    best = registry.get_version(f"models:/{MODEL}@best")
    model, tok, _ = load_model(resolve_checkpoint(best.tags["ray_checkpoint_uri"]))
    ids = tok.encode("ROMEO:", add_special_tokens=False).ids
    (want,) = complete_samples(model, tok, ids, sampling_params(tok, params))
    assert 0 < len(want.tokens) <= 12 and want.text
    assert prediction == want.text


def test_generate_from_registry_matches_the_checkpoint(tracked, tmp_path):
    """From another working dir, `--model models:/...@latest` is the step-30 checkpoint."""
    _, result = tracked
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "7"]
    from_registry = _cli("generate", "--model", f"models:/{MODEL}@latest", *args, cwd=tmp_path)
    assert from_registry.returncode == 0, from_registry.stderr[-2000:]
    from_dir = _cli("generate", "--checkpoint", str(result.checkpoint), *args, cwd=tmp_path)
    assert from_dir.returncode == 0, from_dir.stderr[-2000:]
    assert from_registry.stdout.startswith("ROMEO:")
    assert len(from_registry.stdout.strip()) > len("ROMEO:")
    assert from_registry.stdout == from_dir.stdout


def test_unknown_model_is_one_line(tracked, tmp_path):
    out = _cli("generate", "--model", f"models:/{MODEL}@nope", "--prompt", "x", cwd=tmp_path)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lmforge generate: error: models:/it-track@nope: not found")


def test_evaluate_logs_to_the_versions_run(tracked, dataset, tmp_path):
    out = _cli("evaluate", "--model", f"models:/{MODEL}@best", "--data", str(dataset), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    best = registry.get_version(f"models:/{MODEL}@best")
    history = _client().get_metric_history(best.run_id, "evaluate.val_loss")
    assert [m.step for m in history] == [int(best.tags["step"])]
    assert f"val_loss {history[0].value:.4f}" in out.stdout
    # The whole val split, not the training loop's few eval batches: close, not equal.
    assert abs(history[0].value - float(best.tags["val_loss"])) < 0.5


def test_init_from_registry_starts_a_new_run_from_those_weights(tracked, dataset):
    best = registry.get_version(f"models:/{MODEL}@best")
    cfg = tiny_config(
        dataset, "finetune", "train.max_steps=2", "train.checkpoint_every=2", "train.warmup_steps=0",
        "tracking.experiment=it-tracking", "tracking.registered_model=it-finetune",
    )  # fmt: skip
    result = train(cfg, init_from=f"models:/{MODEL}@best")
    assert result.mlflow_run_id != best.run_id
    history = _client().get_metric_history(result.mlflow_run_id, "val_loss")
    at_start = next(m.value for m in history if m.step == 0)
    # Step 0 evaluates the initial weights with the same protocol as the source run.
    assert at_start == pytest.approx(float(best.tags["val_loss"]), abs=1e-4)
    run = _client().get_run(result.mlflow_run_id)
    assert run.data.tags["lmforge.init_from"] == f"models:/{MODEL}@best"
    assert [v.tags["step"] for v in _versions("it-finetune")] == ["2"]


def test_resume_from_registry_continues_the_same_mlflow_run(tracked, dataset):
    """Runs last in this module: it adds steps 31-40 to the tracked run."""
    cfg, first = tracked
    newest = _versions()[-1]
    more = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 40})})
    result = train(more, resume=f"models:/{MODEL}/{newest.version}")
    assert result.run_dir == first.run_dir
    assert result.mlflow_run_id == first.mlflow_run_id
    loss = _client().get_metric_history(first.mlflow_run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 41))
    assert [int(v.tags["step"]) for v in _versions()] == [10, 20, 30, 40]
    run = _client().get_run(first.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert "train.max_steps" in run.data.tags["lmforge.resumed_with_changes"]


def test_unreachable_tracking_server_does_not_fail_training(dataset):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tiny_config(
        dataset, "no-mlflow", "train.max_steps=4", "train.checkpoint_every=4", "train.warmup_steps=0",
        f"tracking.tracking_uri=http://127.0.0.1:{port}",
    )  # fmt: skip
    assert cfg.tracking.outage_wait_s == 600  # the default: for a server that went away
    t0 = time.monotonic()
    result = train(cfg)
    # A server never reached is not waited for at the end (it took 600 s more before).
    assert time.monotonic() - t0 < 300
    assert result.checkpoint is not None and result.checkpoint.name == "checkpoint_00000004"
    assert result.mlflow_run_id is None
    from lmforge.checkpoint import load_model

    load_model(result.checkpoint)  # the checkpoint is whole


def test_export_hf_from_the_registry_loads_in_transformers(tracked, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import torch

    from lmforge.checkpoint import load_model

    out = _cli("export-hf", "--model", f"models:/{MODEL}@best", "--output", "hf", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, _, _ = load_model(registry.fetch_checkpoint(f"models:/{MODEL}@best"))
    x = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-4, rtol=0)
