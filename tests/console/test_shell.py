"""The console's shell in a real browser: sign in and out, the nav, and a page module that does not exist yet."""

from __future__ import annotations


def test_sign_in_shows_the_nav_and_sign_out_returns_to_the_form(
    page, console_server, org_key, signed_in, shot
):
    page.goto(f"{console_server.url}/console/")
    page.wait_for_selector("#api-key")
    shot(page, "signin")
    signed_in(page, org_key("shell-org"))
    assert page.inner_text(".who") == "shell-org"
    assert page.locator("nav a").all_inner_texts()[:3] == ["Usage", "Requests", "Keys"]
    assert page.locator("nav a[href='#/orgs']").count() == 0  # admin pages are hidden from a developer key
    page.click("button.signout")
    page.wait_for_selector("#api-key")
    page.reload()
    page.wait_for_selector("#api-key")  # the cookie is gone, not just the screen


def test_a_wrong_key_is_refused_with_the_api_message(page, console_server):
    page.goto(f"{console_server.url}/console/")
    page.fill("#api-key", "sk-cumulo-not-a-real-key")
    page.click("button[type=submit]")
    assert "invalid API key" in page.inner_text("[role=alert]")


def test_an_unknown_page_shows_the_error_state(page, console_server, org_key, signed_in):
    signed_in(page, org_key("shell-org"))
    page.goto(f"{console_server.url}/console/#/no-such-page")
    assert "No console page named 'no-such-page'" in page.inner_text("[role=alert]")
