"""The dashboard in a real browser: headless Chromium (Debian's) driven by Playwright.

A person's path through it: fill the launch form for a tiny config and submit, watch the
job succeed on the Jobs page, see its loss curve on the Runs page, find its versions on the
Models page and generate text from one in the Playground. A screenshot of each page goes
to $LMFORGE_SCREENSHOTS (default: test-artifacts/screenshots in the repo); the test prints
the folder.

A machine without the browser skips this test (`bash scripts/deps.sh` installs it, and
`bash scripts/test.sh` runs that first); under CI=true a missing browser fails it.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from lmforge.jobclient import JobClient
from lmforge.tracking import browse, store
from tests.conftest import REPO

CHROMIUM = os.environ.get("LMFORGE_CHROMIUM", "/usr/bin/chromium")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
NO_BROWSER = f"no Chromium at {CHROMIUM} (bash scripts/deps.sh installs it)"
EXPERIMENT = "browser-e2e"
PAGES = {"1-launch.png", "2-jobs.png", "3-runs.png", "4-models.png", "5-playground.png",
         "6-chat.png", "7-cluster.png"}  # fmt: skip
pytestmark = pytest.mark.skipif(not IN_CI and not Path(CHROMIUM).is_file(), reason=NO_BROWSER)


@pytest.fixture(scope="module")
def shots():
    d = Path(os.environ.get("LMFORGE_SCREENSHOTS", REPO / "test-artifacts" / "screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    for name in [*PAGES, "last.png"]:  # an earlier run's screenshots prove nothing
        (d / name).unlink(missing_ok=True)
    return d


@pytest.fixture(scope="session", autouse=True)
def chromium() -> str:
    """The browser, checked before the session's cluster and dashboard start (autouse goes
    first): only reached without one under CI=true, where that fails instead of skipping."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{NO_BROWSER}; under CI=true the browser test must run, not skip")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],  # fmt: skip
        )
        yield b
        b.close()


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the Streamlit selectbox labelled `label` (type to filter, click)."""
    box = page.locator('[data-testid="stSelectbox"]').filter(has_text=label)
    box.locator("input").click()
    box.locator("input").fill(option)
    page.get_by_role("option", name=option, exact=True).first.click()


def number(page, label: str, value) -> None:
    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Enter")


def nav(page, name: str) -> None:
    page.get_by_test_id("stSidebarNavLink").filter(has_text=name).click()


def settle(page) -> None:
    """Wait until Streamlit has finished re-running the script."""
    page.wait_for_timeout(300)
    page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=60_000)


def streamed(page, reply, timeout_s: float = 120) -> None:
    """Until a streaming reply has ended: its run over and its text the same 1 s later (on a
    busy machine the status widget can show after `settle` has looked for it)."""
    deadline, before = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        settle(page)
        now = reply.inner_text()
        if now == before:
            return
        before = now
        page.wait_for_timeout(1000)
    raise AssertionError(f"the reply was still changing after {timeout_s:.0f} s: {before!r}")


@pytest.fixture
def page(browser, shots):
    """A browser tab; its last state is saved as last.png (the page a failure left)."""
    tab = browser.new_page(viewport={"width": 1400, "height": 1100})
    yield tab
    tab.screenshot(path=shots / "last.png", full_page=True)
    tab.close()


def test_launch_watch_curves_models_playground_in_chromium(
    dashboard_server, page, dataset, ray_cluster, shots, capsys
):
    page.set_default_timeout(60_000)
    page.goto(dashboard_server)
    page.get_by_role("heading", name="Launch a training job").wait_for()

    choose(page, "Dataset", str(dataset))
    for label, value in [("Steps", 6), ("Evaluate every (steps)", 3),
                         ("Checkpoint every (steps)", 3), ("Warm-up steps", 1)]:  # fmt: skip
        number(page, label, value)
        settle(page)
    exp = page.get_by_label("Experiment", exact=True)
    exp.fill(EXPERIMENT)
    exp.press("Enter")
    settle(page)
    page.get_by_text("Tokens per step").wait_for()  # the live estimate
    page.get_by_role("button", name="Submit job").click()
    page.get_by_text("Submitted job").wait_for()
    page.screenshot(path=shots / "1-launch.png", full_page=True)
    sid = re.search(r"raysubmit_\w+", page.get_by_text("Submitted job").inner_text()).group(0)

    nav(page, "Jobs")
    page.get_by_role("heading", name="Jobs").wait_for()
    # The submitted job is the one shown: its log names it (the table is a canvas grid and
    # the select box keeps its value in an input, neither is visible text).
    page.get_by_text(f"Running entrypoint for job {sid}").wait_for()
    assert JobClient(ray_cluster.dashboard_url).wait(sid, timeout_s=600) == "SUCCEEDED"
    page.get_by_role("heading", name=re.compile("SUCCEEDED")).wait_for(timeout=30_000)
    page.get_by_text("checkpoint step 6").first.wait_for()  # the log tail
    page.screenshot(path=shots / "2-jobs.png", full_page=True)

    page.get_by_role("button", name="Open its curves").click()
    page.get_by_role("heading", name="Runs").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    assert page.locator(".js-plotly-plot .scatterlayer .trace").count() >= 2  # loss, val loss...
    page.screenshot(path=shots / "3-runs.png", full_page=True)

    nav(page, "Models")
    page.get_by_role("heading", name="Models").wait_for()
    choose(page, "Registered model", EXPERIMENT)
    settle(page)
    page.get_by_text(f"models:/{EXPERIMENT}/", exact=False).first.wait_for()
    page.screenshot(path=shots / "4-models.png", full_page=True)
    page.get_by_role("button", name="Generate from it").click()

    page.get_by_role("heading", name="Playground").wait_for()
    number(page, "Max new tokens", 40)
    settle(page)
    page.get_by_role("button", name="Generate").click()
    page.get_by_text("characters generated").wait_for(timeout=120_000)
    text = page.locator('[data-testid="stText"]').first.inner_text()
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    page.screenshot(path=shots / "5-playground.png", full_page=True)

    # Chat mode: two turns; each reply streams into an assistant message; the preview shows
    # the exact text of the next turn in the chat template.
    page.get_by_test_id("stRadio").get_by_text("Chat", exact=True).click()
    settle(page)
    box = page.get_by_test_id("stChatInputTextArea")
    for i, said in enumerate(["Good morrow", "And to you?"], 1):
        box.fill(said)
        box.press("Enter")
        settle(page)
        messages = page.get_by_test_id("stChatMessage")
        expect(messages).to_have_count(2 * i, timeout=120_000)  # the turn and its reply
        assert said in messages.nth(2 * i - 2).inner_text()
        streamed(page, messages.nth(2 * i - 1))  # the input is disabled until it ends
    assert messages.nth(3).inner_text().strip()  # the second reply
    page.get_by_text("Exact text the model sees (next turn)").click()
    preview = page.get_by_test_id("stCode").filter(has_text="<|user|>").last
    preview.wait_for()
    text = preview.inner_text()
    assert "Good morrow" in text and "And to you?" in text and "<|assistant|>" in text
    page.screenshot(path=shots / "6-chat.png", full_page=True)

    nav(page, "Cluster")
    page.get_by_role("heading", name="Cluster").wait_for()
    page.get_by_text(re.compile(r"1 of 1 nodes alive")).wait_for()  # the session's head
    page.screenshot(path=shots / "7-cluster.png", full_page=True)

    versions = browse.versions(store.resolve_uri(), EXPERIMENT)
    assert sorted(v.step for v in versions) == [3, 6]
    with capsys.disabled():
        print(f"\ndashboard screenshots: {shots}")
    taken = {p.name for p in shots.glob("*.png") if p.stat().st_size > 0}
    missing = PAGES - taken  # a set: every page, not a list compared element by element
    assert not missing, f"no screenshot of {sorted(missing)} in {shots}"
