"""A new architecture is one file: a copy of models/gpt2.py under another name, and nothing
else, validates from a config, builds, trains, generates and shows on the Launch page.

The copy lies in a temporary folder added to the `lmforge.models` package's search path
(its `__path__`). The registry finds it there exactly as it finds a file of
platform/lmforge/models/ (pkgutil and importlib search every folder of a package's path), and
nothing in the repository changes: a test run beside this one never sees the copy, and a
killed run leaves nothing behind.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from lmforge import models
from lmforge.config import ConfigError, ModelConfig, load_config
from lmforge.estimate import estimate
from lmforge.generation import SamplingParams, generate_tokens
from tests.conftest import REPO

NAME = "gpt2twin"
GPT2 = Path(models.__file__).parent / "gpt2.py"
TINY = REPO / "jobs" / "configs" / "tiny.yaml"
# One setting of the copy's own, added to its `Settings` (the file is still the only change).
OWN = """
    twin_scale: float = Field(
        2.0, gt=0, title="Twin scale", description="A setting only this architecture has."
    )
"""


def install(folder: Path, monkeypatch, text: str) -> None:
    (folder / f"{NAME}.py").write_text(text)
    monkeypatch.setattr(models, "__path__", [*models.__path__, str(folder)])
    importlib.invalidate_caches()
    models.get.cache_clear()


@pytest.fixture
def twin(tmp_path, monkeypatch):
    """models/gpt2.py copied, byte for byte, as models/gpt2twin.py."""
    install(tmp_path, monkeypatch, GPT2.read_text())
    yield
    sys.modules.pop(f"{models.__name__}.{NAME}", None)
    models.get.cache_clear()


@pytest.fixture
def twin_with_a_setting(tmp_path, monkeypatch):
    """The copy, with a setting of its own in its `Settings`."""
    text = GPT2.read_text().replace(
        "from torch import nn\n", "from pydantic import Field\nfrom torch import nn\n"
    )
    head, doc, rest = text.partition("class Settings(ModelConfig):\n")
    end = rest.index('"""\n', rest.index('"""') + 3) + 4  # the end of its docstring
    install(tmp_path, monkeypatch, head + doc + rest[:end] + OWN + rest[end:])
    yield
    sys.modules.pop(f"{models.__name__}.{NAME}", None)
    models.get.cache_clear()


def launch_page(tmp_path, monkeypatch) -> AppTest:
    monkeypatch.syspath_prepend(str(REPO / "dashboard"))
    monkeypatch.setenv("LMFORGE_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("RAY_JOBS_ADDRESS", "http://127.0.0.1:9")  # nothing listens there
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=30)
    at.run()
    assert not at.exception, at.exception
    return at


def by_label(widgets, label):
    (w,) = [w for w in widgets if w.label == label]
    return w


def test_the_copy_validates_builds_trains_and_generates(twin):
    assert NAME in models.names()
    cfg = load_config(TINY, [f"model.arch={NAME}", "model.vocab_size=64", "model.n_layer=1"])
    assert type(cfg.model).__module__ == f"{models.__name__}.{NAME}"  # the copy's Settings
    with pytest.raises(
        ConfigError, match=f"model.n_kv_head=2 is not a setting of model.arch={NAME}"
    ):
        load_config(TINY, [f"model.arch={NAME}", "model.n_kv_head=2"])
    torch.manual_seed(0)
    model = models.build(cfg.model)
    assert models.of(model).name == NAME
    gpt2 = models.build(ModelConfig(**{**cfg.model.model_dump(), "arch": "gpt2"}))
    gpt2.load_state_dict(model.state_dict())  # the same file: the same model
    data = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    x, y = data[:, :-1], data[:, 1:]
    torch.testing.assert_close(model(x)[0], gpt2(x)[0], rtol=0, atol=0)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):  # a few optimizer steps on one batch: the loss falls
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses

    model.eval()
    greedy = SamplingParams(max_new_tokens=8, temperature=0)
    tokens = list(generate_tokens(model, [1, 2, 3], greedy))
    assert len(tokens) == 8 and all(0 <= t < 64 for t in tokens)
    assert tokens == list(generate_tokens(model, [1, 2, 3], greedy, use_cache=False))


def test_the_launch_page_offers_the_copy(twin, tmp_path, monkeypatch):
    app = launch_page(tmp_path, monkeypatch)
    assert NAME in by_label(app.selectbox, "Architecture").options
    by_label(app.selectbox, "Architecture").set_value(NAME)
    app.run()
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]
    labels = {w.label for w in app.number_input}
    assert {"Layers", "Heads", "Width (d_model)", "Context"} <= labels
    cfg = load_config(TINY, [f"model.arch={NAME}"])  # the tiny preset, the form's start
    n = estimate(cfg, vocab_size=8192).n_params  # no dataset yet: the form assumes 8192
    assert {m.label: m.value for m in app.metric}["Parameters"] == f"{n / 1e6:,.2f} M"


def test_a_setting_of_the_copys_own_is_in_the_config_and_on_the_launch_page(
    twin_with_a_setting, tmp_path, monkeypatch
):
    cfg = load_config(TINY, [f"model.arch={NAME}", "model.twin_scale=3"])
    assert (
        cfg.model.twin_scale == 3.0
        and load_config(TINY, [f"model.arch={NAME}"]).model.twin_scale == 2.0
    )
    with pytest.raises(ConfigError, match="model.twin_scale=3 is not a setting of model.arch=gpt2"):
        load_config(TINY, ["model.twin_scale=3"])
    with pytest.raises(ConfigError, match="model.twin_scale: Input should be greater than 0"):
        load_config(TINY, [f"model.arch={NAME}", "model.twin_scale=0"])

    app = launch_page(tmp_path, monkeypatch)
    assert "Twin scale" not in {w.label for w in app.number_input}  # gpt2: not its setting
    by_label(app.selectbox, "Architecture").set_value(NAME)
    app.run()
    assert not app.exception, app.exception
    own = by_label(app.number_input, "Twin scale")
    assert (own.value, own.help) == (2.0, "A setting only this architecture has.")
    own.set_value(0.0)
    app.run()
    errors = [e.value for e in app.error]
    assert any(e.startswith("`model.twin_scale`") and "greater than 0" in e for e in errors)
