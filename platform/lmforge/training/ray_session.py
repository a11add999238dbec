"""`RaySession`: the session port over Ray Train, the product's way to run the loop.

Ray Train started this worker and set up its process group; `report` is
`ray.train.report` (Ray copies a checkpoint dir into the run dir, records it once every
rank's copy finished, and keeps `run.checkpoints_to_keep` of them); the restore point is
the checkpoint Ray hands a (re)started worker group (`ray.train.get_checkpoint()`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge import checkpoint as ckpt_io
from lmforge import dist, raycompat
from lmforge.training.session import ResumePoint, WorkerPlan


class RaySession:
    def __init__(self, run_dir: str, use_gpu: bool, validate: bool = False) -> None:
        raycompat.check_version()
        raycompat.quiet_train_reports()
        self.run_dir = run_dir
        # Each checkpoint is evaluated by Ray Train's checkpoint validation (the launcher's
        # `validation_config`, `eval.*`): a Ray task beside the workers, not in them.
        self.validate = validate
        device = None
        if use_gpu:
            # Ray shares the node's GPUs among its workers through CUDA_VISIBLE_DEVICES; which
            # index is this worker's follows Ray's GPU assignment, not LOCAL_RANK order.
            from ray.train.torch import get_device

            device = get_device()
        self.info = dist.setup(use_gpu, device)

    @contextlib.contextmanager
    def restore_point(self) -> Iterator[ResumePoint | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()  # set when Ray restarts or resumes the run
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:  # S3: downloaded for the block's length
            yield ResumePoint.open(Path(d), ckpt_io.in_run(self.run_dir, checkpoint.path))

    def report(self, metrics: dict[str, Any], checkpoint: Path | None = None) -> None:
        import ray.train

        if checkpoint is None:
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(str(checkpoint)),
            checkpoint_dir_name=checkpoint.name, validation=self.validate,
        )  # fmt: skip

    def node(self) -> dict[str, str]:
        import ray

        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "address": ray.util.get_node_ip_address(),
        }


def train_loop(plan: WorkerPlan) -> None:
    """A Ray Train worker's run (`launch.train_loop` hands it the launcher's plan)."""
    session = RaySession(
        plan.run_dir, plan.config.scaling.use_gpu, plan.config.eval.enabled
    )  # before DeepSpeed loads
    from lmforge.training.loop import run_worker

    run_worker(plan, session)
