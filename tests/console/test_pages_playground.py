"""The playground in a real browser: a chat streamed over SSE with its label and seal, the request as curl and
Python, model output that tries to run script staying inert text, and the page at phone width."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.console.conftest import PHONE
from tests.console.pages_server import XSS
from tests.console.pages_support import PagesServer, open_page
from tests.service.fakes import PHRASE


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PagesServer]:
    server = PagesServer(tmp_path_factory.mktemp("pages")).start()
    yield server
    server.stop()


def ask(page: object, model: str, message: str, max_tokens: int) -> None:
    page.select_option("select[name=model]", model)
    page.fill("input[name=max_tokens]", str(max_tokens))
    page.fill("input[name=seed]", "0")
    page.fill("textarea[name=message]", message)
    page.click("form.ask button[type=submit]")
    page.wait_for_selector("[data-test=finish]")


def test_a_chat_streams_and_shows_its_signed_label_and_the_request_as_code(
    page, console_server, org_key, signed_in, shot
):
    signed_in(page, org_key("play-org"))
    open_page(page, console_server, "playground", "Playground")
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("textarea[name=system]", "Be brief.")
    ask(page, "fake-model", "Hello", 30)

    answer = page.locator(".turn.assistant pre").last.inner_text()
    assert answer == PHRASE[:30]  # 30 one-character deltas put back together
    body = json.loads(sent[0].post_data)
    assert body["stream"] is True and body["max_tokens"] == 30 and body["seed"] == 0
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]
    assert sent[0].response().headers["content-type"].startswith("text/event-stream")
    assert "finish: length" in page.inner_text("[data-test=finish]")
    assert page.inner_text("[data-test=seal]") == "sha256:" + "ab" * 32

    page.click("text=Verify label")  # the label came with the last chunk; the API checks it against the text
    assert "unaltered" in page.inner_text("[data-test=verify]")

    page.fill("textarea[name=message]", "Again")  # the code shows the next request, history included
    curl = page.inner_text("[data-test=curl]")
    python = page.inner_text("[data-test=python]")
    assert curl.startswith(f"curl {console_server.url}/v1/chat/completions")
    assert json.loads(curl.split("-d '", 1)[1].rstrip("'"))["messages"][2] == {
        "role": "assistant",
        "content": PHRASE[:30],
    }
    assert f'base_url="{console_server.url}/v1"' in python and "stream=True" in python
    shot(page, "playground")


def test_markup_in_model_output_is_shown_as_text_and_never_runs(page, console_server, org_key, signed_in):
    signed_in(page, org_key("play-org"))
    open_page(page, console_server, "playground", "Playground")
    ask(page, "xss-model", "Say something", 200)
    assert page.locator(".turn.assistant pre").last.inner_text() == XSS
    assert page.locator(".turn img, .turn script").count() == 0
    assert page.evaluate("[typeof window.__x, typeof window.__y]") == ["undefined", "undefined"]


def test_ctrl_enter_sends_from_the_keyboard_and_the_page_fits_a_phone(
    page, console_server, org_key, signed_in, shot
):
    signed_in(page, org_key("play-org"))  # at laptop width: the harness waits for the nav, a menu on phones
    page.set_viewport_size(PHONE)
    open_page(page, console_server, "playground", "Playground")
    page.select_option("select[name=model]", "fake-model")
    page.fill("input[name=max_tokens]", "5")
    page.focus("textarea[name=message]")
    page.keyboard.type("Hi")
    page.keyboard.press("Control+Enter")
    page.wait_for_selector("[data-test=finish]")
    assert page.locator(".turn.assistant pre").last.inner_text() == PHRASE[:5]
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    shot(page, "playground-phone")


def test_stop_ends_a_stream_at_once_and_keeps_what_came(page, console_server, org_key, signed_in):
    signed_in(page, org_key("play-org"))
    open_page(page, console_server, "playground", "Playground")
    page.select_option("select[name=model]", "slow-model")
    page.fill("input[name=max_tokens]", "200")
    page.fill("textarea[name=message]", "Talk")
    page.click("form.ask button[type=submit]")
    page.wait_for_function(
        "() => (document.querySelector('[data-test=streaming]')?.textContent.length || 0) >= 2"
    )
    page.click("button:text-is('Stop')")
    assert page.inner_text("[data-test=finish]").startswith("finish: stopped")
    kept = page.locator(".turn.assistant pre").last.inner_text()
    assert 2 <= len(kept) < 200 and (PHRASE * 5).startswith(kept)
    logged = "() => fetch('/console/api/requests?model=slow-model').then(r => r.json()).then(b => b.data[0])"
    for _ in range(100):  # the gateway settles the request once it sees the connection close
        row = page.evaluate(logged)
        if row["status"] != "in_progress":
            break
        page.wait_for_timeout(100)
    assert row["status"] == "aborted" and row["completion_tokens"] < 200


def test_a_key_whose_plan_has_no_served_model_sees_the_empty_state(
    page, console_server, admin_key, signed_in
):
    headers = {"Authorization": f"Bearer {admin_key}"}
    plan = {"name": "nothing-served", "models": ["not-served-here"]}
    assert httpx.post(f"{console_server.url}/admin/plans", json=plan, headers=headers).status_code == 201
    made = httpx.post(
        f"{console_server.url}/admin/keys",
        json={"org": "empty-org", "plan": "nothing-served"},
        headers=headers,
    )
    signed_in(page, made.json()["key"])
    open_page(page, console_server, "playground", "Playground")
    assert page.inner_text("section.page p.state.empty") == "No model is available to this key."
