"""The training modes no other test trains, each in a short real run (2 local workers, the
2-layer model, a few steps): ZeRO 0 with gradient accumulation in bf16 on the CPU, ZeRO 3
with optimizer and parameter offload keeping one checkpoint while every checkpoint is
registered in the background (the registration must not lose a checkpoint the session deletes),
and activation checkpointing (the losses of the same run without it).

Only public entry points (`run_training`, the registry, `load_model`) and what a run leaves
behind (its run dir, its MLflow run and versions) are read.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from lmforge.checkpoint import ENGINE_DIR, load_model
from lmforge.tracking import registry, store
from tests.trainer.conftest import check_golden, tiny_config, train, val_loss_of

EXPERIMENT = "it-train-modes"
WORKERS, MICRO, CONTEXT = 2, 8, 64  # tiny.yaml


def _client():
    return store.client(store.resolve_uri())


def _history(run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in _client().get_metric_history(run_id, key)}


def _versions(name: str):
    return sorted(_client().search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def assert_learned(run_id: str, steps: int) -> None:
    """One finite loss per optimizer step, lower at the end; the val loss dropped."""
    loss = _history(run_id, "loss")
    assert sorted(loss) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in loss.values()), loss
    third = steps // 3
    first = statistics.mean(loss[s] for s in range(1, third + 1))
    last = statistics.mean(loss[s] for s in range(steps - third + 1, steps + 1))
    assert last < first - 0.2, f"training loss did not go down: {loss}"
    val = _history(run_id, "val_loss")
    assert val[steps] < val[0] - 0.2, f"val loss did not drop: {val}"
    assert all(math.isfinite(v) for v in _history(run_id, "grad_norm").values())


def test_zero0_bf16_with_grad_accumulation_learns(dataset):
    steps, accum = 12, 2
    model_name = "it-zero0-bf16-accum"
    cfg = tiny_config(
        dataset, "zero0-bf16-accum", "zero.stage=0", "train.precision=bf16",
        f"train.grad_accum_steps={accum}", f"train.max_steps={steps}", "train.warmup_steps=2",
        "train.eval_every=6", f"train.checkpoint_every={steps}",
        f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={model_name}",
    )  # fmt: skip
    result = train(cfg)
    check_golden("zero0-bf16-accum", result, rel=1e-2)  # bf16: rounding differs more by CPU
    assert result.checkpoint.name == f"checkpoint_{steps:08d}"
    assert_learned(result.mlflow_run_id, steps)
    run = _client().get_run(result.mlflow_run_id)
    assert run.data.params["train.precision"] == "bf16"
    assert run.data.params["train.grad_accum_steps"] == str(accum)

    # The engine computed in bf16: the module DeepSpeed saved holds bf16 weights.
    [states] = (result.checkpoint / ENGINE_DIR).rglob("mp_rank_00_model_states.pt")
    module = torch.load(states, map_location="cpu", weights_only=False)["module"]
    assert module and {t.dtype for t in module.values()} == {torch.bfloat16}

    # An optimizer step is `accum` micro-batches on each worker.
    [version] = _versions(model_name)
    assert int(version.tags["tokens_seen"]) == steps * accum * WORKERS * MICRO * CONTEXT
    model, _, saved = load_model(registry.fetch_checkpoint(f"models:/{model_name}@latest"))
    assert (saved.zero.stage, saved.train.precision) == (0, "bf16")
    # It serves the optimizer's fp32 master weights, not the module's bf16-rounded copy.
    weights = list(model.state_dict().values())
    assert any(not torch.equal(w, w.bfloat16().float()) for w in weights)
    # The weights it serves are the trained ones (fp32 recompute vs the engine's bf16 eval).
    assert val_loss_of(model, saved, dataset) == pytest.approx(
        float(version.tags["val_loss"]), abs=0.05
    )


def test_zero3_offload_keeps_one_checkpoint_and_registers_every_one(dataset):
    steps, every = 6, 2
    model_name = "it-zero3-offload-keep1"
    cfg = tiny_config(
        dataset, "zero3-offload-keep1", "zero.stage=3", "zero.offload_optimizer=cpu",
        "zero.offload_params=cpu", "run.checkpoints_to_keep=1", f"train.max_steps={steps}",
        "train.warmup_steps=1", f"train.eval_every={every}", f"train.checkpoint_every={every}",
        f"tracking.experiment={EXPERIMENT}", f"tracking.registered_model={model_name}",
    )  # fmt: skip
    result = train(cfg)
    check_golden("zero3-offload", result)
    assert_learned(result.mlflow_run_id, steps)
    run = _client().get_run(result.mlflow_run_id)
    assert run.data.params["zero.offload_optimizer"] == run.data.params["zero.offload_params"]
    assert run.data.params["zero.offload_params"] == "cpu"

    # The session kept the newest checkpoint only; ZeRO 3 saved each worker's partition.
    left = sorted(p.name for p in result.run_dir.glob("checkpoint_*") if p.is_dir())
    assert left == [f"checkpoint_{steps:08d}"]
    engine_files = {p.name for p in (result.checkpoint / ENGINE_DIR).rglob("*_optim_states.pt")}
    assert engine_files == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}

    # Yet every checkpoint became a version, registered from its staged copy after the session had
    # deleted the folder, and each version's files are that step's weights.
    versions = _versions(model_name)
    assert [int(v.tags["step"]) for v in versions] == list(range(every, steps + 1, every))
    val = _history(result.mlflow_run_id, "val_loss")
    losses = []
    for v in versions:
        assert v.run_id == result.mlflow_run_id
        model, _, saved = load_model(registry.fetch_checkpoint(f"models:/{model_name}/{v.version}"))
        assert (saved.zero.stage, saved.zero.offload_params) == (3, "cpu")
        loss = val_loss_of(model, saved, dataset)
        assert loss == pytest.approx(float(v.tags["val_loss"]), abs=1e-4)
        assert loss == pytest.approx(val[int(v.tags["step"])], abs=1e-4)
        losses.append(loss)
    assert len(set(losses)) == len(losses), losses  # three distinct sets of weights


def test_activation_checkpointing_trains_to_the_same_losses(dataset):
    """`train.activation_checkpointing` in a real run (ZeRO 3, dropout on): every step's loss
    is the run's without it (the recomputation replays the same dropout masks)."""
    steps = 4
    common = [
        "zero.stage=3", "model.dropout=0.1", f"train.max_steps={steps}", "train.warmup_steps=1",
        f"train.eval_every={steps}", f"train.checkpoint_every={steps}",
        f"tracking.experiment={EXPERIMENT}",
    ]  # fmt: skip
    plain = train(tiny_config(dataset, "ac-off", *common))
    check_golden("zero3-dropout", plain)
    ckpt = train(tiny_config(dataset, "ac-on", *common, "train.activation_checkpointing=true"))
    run = _client().get_run(ckpt.mlflow_run_id)
    assert run.data.params["train.activation_checkpointing"] == "True"
    off, on = _history(plain.mlflow_run_id, "loss"), _history(ckpt.mlflow_run_id, "loss")
    assert sorted(on) == list(range(1, steps + 1)) and len(set(on.values())) > 1
    assert on == pytest.approx(off, rel=1e-5)
