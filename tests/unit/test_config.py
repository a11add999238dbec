import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.config import Config, ConfigError, load_config, parse_overrides

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load_config(path)


def test_overrides_are_typed_and_nested():
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.lr=3e-4", "model.n_layer=4", "zero.stage=3"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.n_layer == 4 and cfg.zero.stage == 3
    assert parse_overrides(["a.b.c=x"]) == {"a": {"b": {"c": "x"}}}


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.learning_rate=0.1", "train.learning_rate"),  # unknown key
        ("modle.n_layer=2", "modle"),  # unknown section
        ("train.max_steps=ten", "train.max_steps"),  # wrong type
        ("zero.stage=4", "zero.stage"),  # out of range
        ("train.precision=fp8", "train.precision"),
        ("model.n_head=3", "model.d_model"),  # 128 is not divisible by 3
        ("train.min_lr=1.0", "train.min_lr"),
        ("train.precision=fp16", "train.precision"),  # fp16 needs a GPU
        ("zero.offload_params=cpu", "zero.offload_params"),  # needs stage 3
        ("run.name=a;rm -rf", "run.name"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", [override])
    msg = str(err.value)
    assert key in msg and "\n" not in msg


def test_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError, match=r"known: .*max_steps"):
        load_config(None, ["train.steps=3"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["train.lr"])


def test_presets_derive_from_a_base(tmp_path):
    tiny = load_config(CONFIGS / "tiny.yaml")
    demo = load_config(CONFIGS / "demo.yaml")
    assert demo.model.n_layer == 4 and demo.train.max_steps == 300
    assert demo.zero == tiny.zero and demo.train.lr == tiny.train.lr  # inherited
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize(
    "override, key, fix",
    [
        ("tracking.tracking_uri=http://bob:s3cr3t@mlflow.lan:5000", "tracking.tracking_uri",
         "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
        ("tracking.tracking_uri=https://s3cr3t@mlflow.lan", "tracking.tracking_uri",
         "MLFLOW_TRACKING_USERNAME"),
        ("tracking.tracking_uri=postgresql://bob:s3cr3t@db/mlflow", "tracking.tracking_uri",
         "PGPASSWORD"),
        ("storage.endpoint_url=http://AKID:s3cr3t@minio:9000", "storage.endpoint_url",
         "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
        ("storage.endpoint_url=ftp://AKID:s3cr3t@minio:9000", "storage.endpoint_url",
         "AWS_ACCESS_KEY_ID"),
    ],
)  # fmt: skip
def test_credentials_in_urls_are_refused_without_echoing_them(override, key, fix):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    msg = str(err.value)
    assert msg.startswith(f"{key}: holds credentials") and fix in msg
    assert "s3cr3t" not in msg and "\n" not in msg


def test_urls_without_credentials_still_load():
    cfg = load_config(None, ["tracking.tracking_uri=postgresql://bob@db/mlflow"])  # PGPASSWORD
    assert cfg.tracking.tracking_uri == "postgresql://bob@db/mlflow"
    assert load_config(None, ["tracking.tracking_uri=http://127.0.0.1:5000"]).tracking
    assert load_config(None, ["storage.endpoint_url=http://127.0.0.1:9000"]).storage


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_kv_head=2", "model.n_kv_head=2 is not a setting of model.arch=gpt2; remove it"),
        ("model.arch=nope", "model.arch: Input should be 'gpt2', 'llama' or 'lstm' (got 'nope')"),
        ("model.n_kv_haed=2", "model.n_kv_haed: unknown key (known: arch, n_layer"),
    ],
)
def test_model_keys_are_those_of_the_chosen_architecture(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "tiny.yaml", [override])
    assert message in str(err.value)
    llama = load_config(CONFIGS / "tiny.yaml", ["model.arch=llama", "model.n_kv_head=1"]).model
    assert (llama.n_kv_head, llama.rope_theta, llama.tie_embeddings) == (1, 10000.0, True)


def test_a_config_of_before_with_every_architectures_keys_at_null_still_loads():
    """Configs saved before each architecture owned its keys list them all, unset (None)."""
    unset = dict.fromkeys(["n_kv_head", "ffn_hidden", "rope_theta", "norm_eps", "tie_embeddings"])
    cfg = Config.model_validate({"model": {"arch": "gpt2", **unset}})
    assert cfg.model.arch == "gpt2" and "n_kv_head" not in cfg.to_dict()["model"]
    lstm = Config.model_validate({"model": {"arch": "lstm", **unset}}).model
    assert lstm.tie_embeddings is True  # None: the architecture's default
    assert Config.model_validate(cfg.to_dict()) == cfg  # and a dump loads back


def test_the_config_schema_imports_no_torch():
    """The CLI's job commands and the dashboard's job client read configs: torch is imported
    only when a config is validated (its architecture's file)."""
    code = "import sys, lmforge.config, lmforge.jobclient; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
