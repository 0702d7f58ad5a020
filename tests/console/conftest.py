"""The console's browser-test harness: a live gateway (fake engine, SQLite in a temp dir) per test module, and
Debian's chromium driven by Playwright, headless.

Fixtures: `console_server` (a tests/service/live.py LiveServer; `.url`), `admin_key`, `org_key(name)` (a new
organisation and key through the admin API; returns the secret), `page` (a fresh page in its own browser context,
so no cookies are shared), `signed_in(page, key)` (signs in through the UI and waits for the nav), and
`shot(page, name)` (a screenshot into docs/img/console/ when CUMULO_SCREENSHOTS=1).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import pg_database  # noqa: F401  (the same PostgreSQL fixture as tests/service)
from tests.service.live import LiveServer

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CUMULO_CHROMIUM", "/usr/bin/chromium")
VENDOR = ROOT / "cumulo/service/console/static/vendor"
SHOTS = ROOT / "docs/img/console"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One Chromium per module. Not per session: Playwright's sync API keeps an asyncio loop running in the main
    thread until it stops, and every later test that calls asyncio.run() would fail."""
    if not Path(CHROMIUM).exists() and not shutil.which(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: run `scripts/setup.sh test` (it installs Debian's chromium)")
    if not (VENDOR / "preact-htm.js").exists():
        pytest.fail("the console's vendor files are missing: run `scripts/setup.sh`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("console")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin_key(console_server: LiveServer) -> str:
    return console_server.admin_key()


@pytest.fixture(scope="module")
def org_key(console_server: LiveServer, admin_key: str) -> Callable[..., str]:
    """org_key("acme") -> the secret of a new key of organisation "acme" (created on first use)."""

    def make(org: str, name: str = "console-test") -> str:
        response = httpx.post(
            f"{console_server.url}/admin/keys",
            json={"org": org, "name": name},
            headers={"Authorization": f"Bearer {admin_key}"},
        )
        response.raise_for_status()
        return response.json()["key"]

    return make


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(viewport=LAPTOP)  # type: ignore[attr-defined]
    page = context.new_page()
    yield page
    context.close()


def sign_in(page: object, server: LiveServer, key: str) -> None:
    page.goto(f"{server.url}/console/#/usage")  # type: ignore[attr-defined]
    page.fill("#api-key", key)  # type: ignore[attr-defined]
    page.click("button[type=submit]")  # type: ignore[attr-defined]
    page.wait_for_selector("nav a[href='#/usage']", state="attached")  # type: ignore[attr-defined]


@pytest.fixture
def signed_in(console_server: LiveServer) -> Callable[[object, str], None]:
    return lambda page, key: sign_in(page, console_server, key)


def take_shot(page: object, name: str) -> None:
    if os.environ.get("CUMULO_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


@pytest.fixture
def shot() -> Callable[[object, str], None]:
    return take_shot
