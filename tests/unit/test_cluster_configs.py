"""The cluster configs in cluster/ are known to be valid: `ray up`'s by Ray's own schema (the
installed ray package's `prepare_config` + `validate_config`, what `ray up` runs first), the
KubeRay RayJob by KubeRay's CRD schema (cluster/schemas/, strict about unknown fields) and
its entrypoint by lmforge's own argument parser and config checks, and both against the
pins in constraints.txt."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from lmforge.cli import add_train_args
from lmforge.config import load_config
from lmforge.training.launch import check_cluster

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def pin(package: str) -> str:
    text = (REPO / "constraints.txt").read_text()
    return re.search(rf"^{re.escape(package)}==(\S+)$", text, re.M).group(1)


def ray_up_valid(cfg: dict) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(cfg)))


@pytest.fixture(scope="module")
def ray_up():
    return yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())


@pytest.fixture(scope="module")
def rayjob():
    return yaml.safe_load((CLUSTER / "kuberay-rayjob.yaml").read_text())


def test_ray_up_config_passes_rays_own_schema(ray_up):
    ray_up_valid(ray_up)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(max_workerz=2),  # a misspelt key
        lambda c: c["available_node_types"]["gpu_worker"].update(max_workers="two"),
        lambda c: c.update(head_node_type="no_such_type"),
    ],
    ids=["misspelt key", "wrong type", "unknown head type"],
)
def test_the_schema_check_catches_mistakes(ray_up, break_it):
    from jsonschema import ValidationError

    broken = copy.deepcopy(ray_up)
    break_it(broken)
    with pytest.raises((ValidationError, ValueError)):
        ray_up_valid(broken)


def test_ray_up_image_is_the_pinned_ray(ray_up):
    assert ray_up["docker"]["image"].startswith(f"rayproject/ray:{pin('ray')}-py311")


def strict(schema):
    """The schema as `kubectl apply --validate=strict` reads it: an object with declared
    properties takes no others (Kubernetes would drop them silently), unless it says
    x-kubernetes-preserve-unknown-fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayjob_schema():
    """KubeRay's RayJob CRD schema, kept in the repo (source and version: its $comment and
    cluster/schemas/README.md)."""
    import json

    from jsonschema import Draft7Validator

    schema = json.loads((CLUSTER / "schemas" / "kuberay-rayjob-v1.schema.json").read_text())
    assert "ray-project/kuberay" in schema["$comment"] and "v1.7.0" in schema["$comment"]
    Draft7Validator.check_schema(schema)
    return Draft7Validator(strict(schema))


def test_rayjob_passes_the_kuberay_crd_schema(rayjob, rayjob_schema):
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")  # the schema's
    errors = [f"{e.json_path}: {e.message}" for e in rayjob_schema.iter_errors(rayjob)]
    assert errors == []


def _workers(c):
    return c["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]


@pytest.mark.parametrize(
    "break_it, where",
    [
        (lambda c: _workers(c).update(replicas="two"), "$.spec.rayClusterSpec.workerGroupSpecs[0]"),
        (lambda c: c["spec"].update(shutdownAfterJobFinish=True), "$.spec"),  # misspelt
        (
            lambda c: _workers(c)["template"]["spec"]["containers"][0]["resources"]["limits"]
            .update(cpu="sixty-four"),
            "$.spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources",
        ),
        (lambda c: c["spec"]["rayClusterSpec"]["headGroupSpec"].pop("template"),
         "$.spec.rayClusterSpec.headGroupSpec"),
    ],
    ids=["wrong type", "misspelt key", "bad quantity", "missing required"],
)  # fmt: skip
def test_the_crd_schema_catches_mistakes(rayjob, rayjob_schema, break_it, where):
    broken = copy.deepcopy(rayjob)
    break_it(broken)
    errors = list(rayjob_schema.iter_errors(broken))
    assert errors and all(e.json_path.startswith(where) for e in errors), [
        (e.json_path, e.message) for e in errors
    ]


def entrypoint_args(rayjob) -> list[str]:
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    assert (REPO / argv[1]).is_file()
    return argv[2:]


def test_rayjob_entrypoint_parses_with_jobs_train_arguments(rayjob):
    import argparse

    parser = argparse.ArgumentParser()
    add_train_args(parser)  # what jobs/train.py parses
    args = parser.parse_args(entrypoint_args(rayjob))
    cfg = load_config(REPO / args.config, args.overrides)  # every override is a known key
    # 2 GPU nodes beside a 0-CPU head (its rayStartParams): the run passes the cluster checks
    # (its storage is declared shared: a ReadWriteMany volume).
    spec = rayjob["spec"]["rayClusterSpec"]
    head = {"CPU": float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])}
    (group,) = spec["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpu_node = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
    nodes = [head] + [gpu_node] * group["replicas"]
    check_cluster(cfg, nodes)
    workers_fit = sum(
        int(min(n["CPU"] // cfg.scaling.cpus_per_worker, n.get("GPU", 0))) for n in nodes
    )
    assert cfg.scaling.num_workers <= workers_fit


def test_rayjob_images_and_ray_version_are_the_pins(rayjob):
    spec = rayjob["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == pin("ray")
    pods = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    images = {c["image"] for p in pods for c in p["template"]["spec"]["containers"]}
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert images == {f"ghcr.io/lmforge/lmforge:{version}-ray{pin('ray')}-cuda"}
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert env["py_modules"] == ["/app/lmforge/platform/lmforge"]  # `import lmforge` everywhere
    for p in pods:  # token auth on every node
        (c,) = p["template"]["spec"]["containers"]
        assert {"name": "RAY_AUTH_MODE", "value": "token"} in c["env"]
