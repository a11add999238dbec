"""`model.arch=lstm` through the same job as the Transformer: 2 local workers, each a
DeepSpeed ZeRO 2 engine, tracked in MLflow, a registered version per checkpoint, and the
checkpoint generates by carrying its recurrent state."""

import math

import pytest

from lmforge import models
from lmforge.checkpoint import load_model, read_state
from lmforge.generation import SamplingParams, generate_tokens
from lmforge.tracking import store
from tests.trainer.conftest import check_golden, tiny_config, train

MODEL = "it-lstm"
STEPS = 16


def test_an_lstm_trains_is_tracked_registered_and_generates(dataset):
    cfg = tiny_config(
        dataset, "lstm", "model.arch=lstm", "zero.stage=2", f"train.max_steps={STEPS}",
        "train.eval_every=8", "train.checkpoint_every=8", "tracking.experiment=it-lstm",
        f"tracking.registered_model={MODEL}",
    )  # fmt: skip
    result = train(cfg)
    check_golden("lstm-zero2", result)
    state = read_state(result.checkpoint)
    assert state.step == STEPS and state.world_size == 2
    evals = {e["step"]: e["val_loss"] for e in state.evals}
    assert sorted(evals) == [0, 8, 16]
    assert evals[0] == pytest.approx(math.log(512), abs=0.3)  # an untrained model
    assert evals[16] < evals[0] - 0.5, f"val loss did not drop: {evals}"

    c = store.client(store.resolve_uri())
    run = c.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["model.arch"] == "lstm"
    assert int(run.data.params["model.n_params"]) == models.get("lstm").n_params(
        cfg.model.model_copy(update={"vocab_size": 512})
    )
    ppl = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "val_perplexity")}
    assert sorted(ppl) == [0, 8, 16]
    assert all(math.isclose(ppl[s], math.exp(v), rel_tol=1e-6) for s, v in evals.items())
    versions = c.search_model_versions(f"name='{MODEL}'")
    assert sorted(int(v.tags["step"]) for v in versions) == [8, 16]
    assert all(v.run_id == result.mlflow_run_id for v in versions)

    model, tok, saved_cfg = load_model(result.checkpoint)
    assert saved_cfg.model.arch == "lstm" and models.of(model).name == "lstm"
    prompt = tok.encode("DUKE. " * 40).ids  # longer than the 64-token context: fed whole
    assert len(prompt) > saved_cfg.model.context_length
    sample = list(generate_tokens(model, prompt, SamplingParams(20, seed=0)))
    assert 0 < len(sample) <= 20 and all(0 <= t < 512 for t in sample)
    assert tok.decode(sample).strip()


def test_zero_3_partitions_an_lstm_across_two_workers(dataset):
    """ZeRO 3 splits each nn.LSTM weight between the 2 workers and gathers it in forward;
    the run learns and its consolidated weights are the engine's (same val loss)."""
    from tests.trainer.conftest import val_loss_of

    cfg = tiny_config(dataset, "lstm-zero3", "model.arch=lstm", "zero.stage=3",
                      f"train.max_steps={STEPS}", "train.eval_every=8",
                      "train.checkpoint_every=16")  # fmt: skip
    result = train(cfg)
    check_golden("lstm-zero3", result)
    evals = {e["step"]: e["val_loss"] for e in read_state(result.checkpoint).evals}
    assert evals[16] < evals[0] - 0.5, f"val loss did not drop: {evals}"
    model, _, saved_cfg = load_model(result.checkpoint)
    assert saved_cfg.zero.stage == 3
    assert val_loss_of(model, saved_cfg, dataset) == pytest.approx(evals[16], abs=1e-4)
