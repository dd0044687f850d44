"""The built-in dashboard in a real browser: headless Chromium (Debian's) driven by Playwright, real app."""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.conftest import API_KEY, REPO, AppProcess

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def dash_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    cache = tmp_path_factory.mktemp("dash-clearml")
    app = AppProcess(["--offline", "--model", "demo", "--port", "0", "--api-key", API_KEY,
                      "--last-action-report-interval-sec", "1", "--idle-time-limit-hours", "0"],
                     env={"CLEARML_CACHE_DIR": str(cache)})
    app.start().wait_ready()
    yield app
    app.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "Chromium is missing: make test installs Debian's chromium package"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    yield pg
    context.close()


def test_without_the_key_only_the_status_shows(dash_app: AppProcess, page: Page) -> None:
    page.goto(dash_app.url + "/")
    expect(page.locator("#status-text")).to_have_text("idle", timeout=10_000)
    expect(page.locator("#login-panel")).to_be_visible()
    for hidden in ("#endpoint", "#charts-panel", "#log-panel"):
        expect(page.locator(hidden)).to_be_hidden()
    page.fill("#key", "not-the-key")
    page.click("#login button[type=submit]")
    expect(page.locator("#login-error")).to_be_visible()
    expect(page.locator("#endpoint")).to_be_hidden()
    assert API_KEY not in page.content()


def test_dashboard_shows_everything_with_the_key(dash_app: AppProcess, page: Page) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.goto(dash_app.url + "/dashboard")
    page.fill("#key", API_KEY)
    page.click("#login button[type=submit]")
    expect(page.locator("#endpoint")).to_be_visible(timeout=10_000)
    expect(page.locator("#api-base")).to_have_text(f"http://localhost:{dash_app.port}/v1")
    expect(page.locator("#app-url")).to_have_text(f"http://localhost:{dash_app.port}")
    expect(page.locator("#test-command")).to_contain_text("curl -s")
    # masked until revealed
    expect(page.locator("#api-key")).to_have_text("••••••••")
    expect(page.locator("#log")).to_contain_text("API key: ••••••••")
    assert API_KEY not in page.inner_text("body")  # not in the test command or the console either
    page.click("#reveal")
    expect(page.locator("#api-key")).to_have_text(API_KEY)
    expect(page.locator("#test-command")).to_contain_text(f"Bearer {API_KEY}")
    page.click("#reveal")
    expect(page.locator("#api-key")).to_have_text("••••••••")

    # a request makes it active, the next quiet interval makes it idle again
    r = httpx.post(dash_app.url + "/v1/completions", headers={"X-Api-Key": API_KEY},
                   json={"prompt": "Once upon a time", "max_tokens": 24})
    assert r.status_code == 200
    expect(page.locator("#status-text")).to_have_text("active", timeout=10_000)
    expect(page.locator("#status-text")).to_have_text("idle", timeout=10_000)

    # the charts have points, and the console tail tells the story
    requests_chart = page.locator("#charts .chart").first
    expect(requests_chart).to_have_attribute("data-points", re.compile(r"^([3-9]|\d\d+)$"),
                                             timeout=10_000)
    assert page.locator("#charts .chart").count() == 7  # no GPU here: no GPU charts
    expect(page.locator("#log")).to_contain_text("status: active")
    expect(page.locator("#idle")).not_to_have_text("–")
    page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)


def test_phone_width_has_no_sideways_scroll(dash_app: AppProcess, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2)
    pg = context.new_page()
    try:
        pg.goto(dash_app.url + "/")
        pg.fill("#key", API_KEY)
        pg.click("#login button[type=submit]")
        expect(pg.locator("#charts-panel")).to_be_visible(timeout=10_000)
        width = pg.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, width
        ARTIFACTS.mkdir(exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
    finally:
        context.close()


def idle_seconds(app: AppProcess) -> float:
    text = httpx.get(app.url + "/metrics", headers={"X-Api-Key": API_KEY}).text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("llamacpp_idle_seconds ")))


def test_dashboard_polling_is_not_activity(dash_app: AppProcess) -> None:
    before = idle_seconds(dash_app)
    time.sleep(0.5)
    for _ in range(3):
        assert httpx.get(dash_app.url + "/").status_code == 200
        assert httpx.get(dash_app.url + "/dashboard/status").status_code == 200
        assert httpx.get(dash_app.url + "/dashboard/data", headers={"X-Api-Key": API_KEY}).status_code == 200
    assert httpx.get(dash_app.url + "/dashboard/data").status_code == 401
    assert idle_seconds(dash_app) >= before + 0.5  # the idle clock kept running


def test_the_page_fetches_relative_paths_so_a_gateway_prefix_works() -> None:
    from app.api.dashboard import page

    html = page()
    assert 'fetch("dashboard/status"' in html and 'fetch("dashboard/data"' in html
    assert 'fetch("/' not in html  # an absolute path would escape a gateway route's prefix
