"""The console at laptop and phone widths (nothing wider than the screen), from the keyboard, and its empty,
loading and error states."""

from __future__ import annotations

import json

import pytest

from tests.console.conftest import LAPTOP, PHONE
from tests.console.test_console_api import chat

PAGES = ("usage", "requests", "keys")


@pytest.mark.parametrize("size", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_no_horizontal_overflow(page, console_server, org_key, signed_in, shot, size):
    key = org_key("layout-org")
    chat(console_server, key)
    page.set_viewport_size(size)
    signed_in(page, key)
    for name in PAGES:
        page.goto(f"{console_server.url}/console/#/{name}")
        page.wait_for_selector("[aria-busy=false]")
        page.wait_for_timeout(100)  # charts lay out on the next frame
        width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], (name, width)
        if size is PHONE:
            shot(page, f"{name}-phone")
    if size is PHONE:
        assert not page.is_visible("nav a[href='#/keys']")  # folded behind the menu button
        page.click("button.menu")
        page.click("nav a[href='#/keys']")
        page.wait_for_selector("h1:text('Keys of layout-org')")


def focused(page) -> str:
    return page.evaluate(
        "() => (document.activeElement.getAttribute('href') || document.activeElement.textContent).trim()"
    )


def test_tab_reaches_the_nav_and_the_main_buttons(page, console_server, org_key, signed_in):
    signed_in(page, org_key("keyboard-org"))
    page.goto(f"{console_server.url}/console/#/keys")
    page.wait_for_selector("[aria-busy=false]")
    page.locator("body").focus()
    reached = []
    for _ in range(30):
        page.keyboard.press("Tab")
        reached.append(focused(page))
    for target in ("Sign out", "#/usage", "#/requests", "#/keys", "Create key", "Revoke"):
        assert target in reached, (target, reached)
    page.focus("nav a[href='#/requests']")
    page.keyboard.press("Enter")
    page.wait_for_selector("h1:text('Requests')")


def test_empty_loading_and_error_states(page, console_server, org_key, signed_in, shot):
    signed_in(page, org_key("states-org"))
    held = []
    page.route("**/console/api/requests*", lambda route: held.append(route))
    page.goto(f"{console_server.url}/console/#/requests")
    for _ in range(
        600
    ):  # up to 30 s, until the page's request reaches the route (the page module loads first)
        if held:
            break
        page.wait_for_timeout(50)
    assert page.inner_text("[role=status]") == "Loading…"  # the request is held: loading shows
    held[0].continue_()
    page.wait_for_selector("text=No requests match.")  # a new organisation has none
    page.unroute("**/console/api/requests*")
    error = {
        "error": {"message": "the database is away", "type": "server_error", "param": None, "code": None}
    }
    page.route(
        "**/console/api/usage*",
        lambda route: route.fulfill(status=503, content_type="application/json", body=json.dumps(error)),
    )
    page.goto(f"{console_server.url}/console/#/usage")
    assert page.inner_text("[role=alert]") == "the database is away (503)"
    shot(page, "error-state")
