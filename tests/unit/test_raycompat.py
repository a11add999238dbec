"""Ray's internals are reached from one module, which refuses another Ray in one line."""

from __future__ import annotations

import re

import pytest

from lmforge import raycompat
from tests.conftest import REPO

PRIVATE = re.compile(r"^\s*(from|import)\s+ray\.(_private|_raylet|[\w.]*\._internal)\b", re.M)


def test_only_raycompat_imports_ray_internals():
    users = [
        p.relative_to(REPO).as_posix()
        for p in (REPO / "platform" / "lmforge").rglob("*.py")
        if PRIVATE.search(p.read_text())
    ]
    assert users == ["platform/lmforge/raycompat.py"]


def test_another_ray_minor_version_is_refused_in_one_line():
    raycompat.check_version("2.60.3")  # a patch release of the same minor: fine
    with pytest.raises(raycompat.RayVersionError) as err:
        raycompat.check_version("2.61.0")
    assert "ray==2.61.0 is installed" in str(err.value) and "\n" not in str(err.value)


def test_the_installed_ray_is_the_one_written_for():
    raycompat.check_version()


def test_the_torch_trainer_starts_no_dataset_manager_without_datasets():
    """lmforge's runs pass no Ray datasets: Ray Train's DatasetsCallback (which starts a
    DatasetManager actor process) is left out; with datasets it stays. The placement group
    cleaner (another actor process) only runs for a driver that outlives the run (a sweep's
    trial runner)."""
    import ray.train
    from ray.train.v2._internal.callbacks import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    from lmforge import raycompat

    scaling = ray.train.ScalingConfig(num_workers=2)

    def kinds(outlived=False, **kw):
        trainer_cls = raycompat.torch_trainer_class(outlived)
        trainer = trainer_cls(lambda: None, scaling_config=scaling, **kw)
        return {type(c) for c in trainer._create_default_callbacks()}

    assert not {DatasetsCallback, PlacementGroupCleanerCallback} & kinds()
    assert PlacementGroupCleanerCallback in kinds(outlived=True)
    assert DatasetsCallback in kinds(datasets={"train": lambda: None})
