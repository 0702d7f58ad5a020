"""Readable contrast: every visible text of every console page, with data on it, at laptop and phone widths,
meets WCAG 2.1's contrast minimum against its effective background (4.5:1, or 3:1 for large text). The check
itself (tests/console/contrast.js) runs in the browser on computed styles."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.console.conftest import LAPTOP, PHONE
from tests.console.pages_support import PagesServer
from tests.console.test_pages_edge import enrol, envelope, send

CONTRAST = Path(__file__).with_name("contrast.js").read_text()
DEVELOPER = ("usage", "requests", "keys", "playground", "finetune", "edge")
ADMIN = ("orgs", "nodes", "chips")


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PagesServer]:
    server = PagesServer(tmp_path_factory.mktemp("contrast")).start()
    yield server
    server.stop()


def failures(page: object) -> list[str]:
    results = page.evaluate(CONTRAST)  # type: ignore[attr-defined]
    assert len(results) >= 5, "the walk found almost no text: the page did not render"
    return [
        f"{r['ratio']} < {r['need']}: {r['element']} {r['text']!r} ({r.get('fg')} on {r.get('bg')}"
        f"{', ' + r['note'] if 'note' in r else ''})"
        for r in results
        if r["ratio"] < r["need"]
    ]


def show(page: object, server: PagesServer, route: str) -> None:
    page.goto(f"{server.url}/console/#/{route}")  # type: ignore[attr-defined]
    page.wait_for_selector(".page-head h1")  # type: ignore[attr-defined]
    page.wait_for_selector("section.page[aria-busy=false]")  # type: ignore[attr-defined]
    if route == "edge":
        page.wait_for_selector("td:text-is('Shelf camera')")  # type: ignore[attr-defined]


def with_data(server: PagesServer, key: str, device: str) -> None:
    """A chat (usage, request log), an enrolled device with a result, and a rollout (edge)."""
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30).is_success
    credential = enrol(server.url, key, device, "Shelf camera")  # device ids are unique across the service
    send(server.url, credential, "heartbeat", envelope(device, credential, 1, "heartbeat", {}))
    send(server.url, credential, "results", envelope(device, credential, 2, "count", {"count": 3}))
    rollout = {"name": "shelf", "version": "v2", "sha256": "a" * 64, "url": "http://models/v2"}
    assert httpx.post(f"{server.url}/v1/edge/rollouts", json=rollout, headers=headers).status_code == 201


def test_the_check_flags_low_contrast_and_passes_enough(page, console_server):
    page.goto(f"{console_server.url}/console/")
    page.wait_for_selector("#api-key")
    page.evaluate("""() => {
      const add = (id, style) => { const p = document.createElement('p'); p.id = id; p.textContent = id;
        Object.assign(p.style, style); document.body.append(p); };
      add('grey-999-fails', { color: '#999', background: '#fff' });
      add('grey-767676-passes', { color: '#767676', background: '#fff' });
      add('large-949494-passes', { color: '#949494', background: '#fff', fontSize: '24px' });
      add('faded-fails', { color: '#000', opacity: '0.3' });
    }""")  # through the CSSOM: the page's CSP refuses style attributes
    flagged = " ".join(failures(page))
    assert "grey-999-fails" in flagged and "faded-fails" in flagged
    assert "passes" not in flagged


def test_the_sign_in_page_and_its_error_are_readable(page, console_server):
    page.goto(f"{console_server.url}/console/")
    page.wait_for_selector("#api-key")
    assert failures(page) == []
    page.fill("#api-key", "sk-cumulo-wrong")
    page.click("button[type=submit]")
    page.wait_for_selector("[role=alert]")
    assert failures(page) == []


@pytest.mark.parametrize("viewport", [LAPTOP, PHONE], ids=["laptop", "phone"])
def test_every_page_is_readable_with_data(page, console_server, org_key, admin_key, signed_in, viewport):
    page.set_viewport_size(viewport)
    key = org_key(f"contrast-{viewport['width']}")
    with_data(console_server, key, f"cam-{viewport['width']}")
    found = {}
    signed_in(page, key)
    for route in DEVELOPER:
        show(page, console_server, route)
        if route == "keys":  # the new key's secret panel, shown once
            page.fill("form input[name=name]", "contrast")
            page.click("form button[type=submit]")
            page.wait_for_selector(".secret")
        found[route] = failures(page)
    page.context.clear_cookies()
    page.goto("about:blank")  # a new document: the shell asks who is signed in again
    signed_in(page, admin_key)
    for route in ADMIN:
        show(page, console_server, route)
        found[route] = failures(page)
    assert {route: bad for route, bad in found.items() if bad} == {}
