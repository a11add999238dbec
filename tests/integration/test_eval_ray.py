"""Evaluation of every checkpoint as Ray Train's checkpoint validation (issue 26), on the
session's Ray cluster: a tiny run with `eval.tasks` and `run.checkpoints_to_keep=1` (Ray
deletes each checkpoint once the next is reported, maybe before its evaluation's turn)
succeeds; every checkpoint evaluated in time has its scores on its version and on the run
at its step; a deleted one is skipped, never a failure; Ray Train keeps the scores with the
checkpoint it returns; `on_eval_scores` (what a sweep on a score hands Tune) gets each
checkpoint's scores from the validation task, through a Ray queue. The run's driver is a Ray
task inside a placement group of 0.01 CPU that captures its children, as a sweep trial's
runner is under Tune: the validation tasks (eval.cpus) run outside it."""

from __future__ import annotations

from lmforge.sweeps.trial import EvalToTune
from lmforge.tracking import store
from lmforge.training.launch import run_training
from tests.trainer.conftest import tiny_config
from tests.unit import evaltasks

MODEL = "it-eval-ray"


def test_checkpoints_are_validated_by_ray_train_beside_training(
    ray_cluster, dataset, tmp_path, plain_main
):
    rows = [{"prompt": "ROMEO:", "completion": " Is the day so young?"}] * 6
    data = evaltasks.write_rows(tmp_path / "rows.jsonl", rows)
    task = evaltasks.generative(tmp_path, "romeo", data, max_gen=6, metrics=("exact_match", "chrf"))
    cfg = tiny_config(
        dataset, "eval-ray", "train.max_steps=12", "train.checkpoint_every=4",
        "train.eval_every=4", "run.checkpoints_to_keep=1", "tracking.experiment=it-eval-ray",
        f"tracking.registered_model={MODEL}", f"eval.tasks=[{task}]", "eval.limit=3",
        "eval.cpus=0.5",
    )  # fmt: skip
    # A sweep on a score hands each checkpoint's scores to its Tune trial through a Ray
    # queue (EvalToTune, run_training's on_eval_scores): here an unbounded one, read below.
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.queue import Queue
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    queue = Queue()
    pg = placement_group([{"CPU": 0.01}])  # what Tune reserves a trial's runner (DRIVER_CPUS)
    ray.get(pg.ready(), timeout=60)
    in_trial = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    driver = ray.remote(run_training).options(num_cpus=0.01, scheduling_strategy=in_trial)
    try:
        result = ray.get(
            driver.remote(
                cfg, on_eval_scores=EvalToTune(queue, "eval.romeo.chrf", "max"), outlived=True
            )
        )  # fmt: skip
    finally:
        remove_placement_group(pg)
    c = store.client(store.resolve_uri())
    versions = sorted(c.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    assert [int(v.tags["step"]) for v in versions] == [4, 8, 12]
    handed = [queue.get(timeout=30) for _ in range(queue.qsize())]
    assert {r["step"]: r["eval.romeo.chrf"] for r in handed} == {
        int(v.tags["step"]): float(v.tags["eval.romeo.chrf"]) for v in versions
    }
    assert all("eval.romeo.chrf" in v.tags and "eval.warning" not in v.tags for v in versions)
    curve = {m.step: m.value for m in c.get_metric_history(result.mlflow_run_id, "eval/romeo/chrf")}
    assert curve == {int(v.tags["step"]): float(v.tags["eval.romeo.chrf"]) for v in versions}
    kept = sorted(p.name for p in result.run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_00000012"], kept  # the others deleted once validated
