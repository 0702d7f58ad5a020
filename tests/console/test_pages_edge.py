"""The edge page in a real browser: an enrolled device with its health, heartbeat and last result, a rollout
with its state, and a result that arrives while the page is open shown from the live stream."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from tests.console.pages_support import PagesServer, open_page
from tests.service.support import auth


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PagesServer]:
    server = PagesServer(tmp_path_factory.mktemp("pages")).start()
    yield server
    server.stop()


def envelope(device_id: str, credential: str, seq: int, kind: str, body: dict) -> dict:
    now = datetime.now(UTC).isoformat()
    return {"v": 1, "device_id": device_id, "seq": seq, "time": now, "kind": kind, "model": None, "body": body,
            "auth": credential}  # fmt: skip


def enrol(url: str, key: str, device_id: str, name: str) -> str:
    made = httpx.post(
        f"{url}/v1/edge/devices", json={"device_id": device_id, "name": name}, headers=auth(key)
    )
    assert made.status_code == 201, made.text
    answer = httpx.post(f"{url}/v1/edge/enroll", json={"token": made.json()["enrollment_token"]})
    assert answer.status_code == 200, answer.text
    return answer.json()["credential"]


def send(url: str, credential: str, path: str, item: dict) -> None:
    answer = httpx.post(f"{url}/v1/edge/{path}", json=item, headers=auth(credential))
    assert answer.status_code in (200, 204), answer.text


def test_the_fleet_shows_a_device_its_results_live_and_a_rollout(
    page, console_server, org_key, signed_in, shot
):
    url, key = console_server.url, org_key("edge-org")
    credential = enrol(url, key, "cam-1", "Shelf camera")
    send(url, credential, "heartbeat", envelope("cam-1", credential, 1, "heartbeat", {}))
    send(url, credential, "results", envelope("cam-1", credential, 2, "count", {"count": 3}))
    rollout = {"name": "shelf", "version": "v2", "sha256": "a" * 64, "url": "http://models/v2"}
    assert httpx.post(f"{url}/v1/edge/rollouts", json=rollout, headers=auth(key)).status_code == 201

    signed_in(page, key)
    open_page(page, console_server, "edge", "Edge fleet")
    page.wait_for_selector("td:text-is('{\"count\":3}')")  # the results table
    device = page.locator("tr:has(td:text-is('cam-1'))").first.inner_text()
    assert "Shelf camera" in device and "online" in device and 'count {"count":3}' in device
    rollout_row = page.locator("tr:has(td:text-is('shelf v2'))")
    assert rollout_row.locator("td").nth(2).inner_text() == "canary"  # its one device is the canary
    assert rollout_row.locator("td").nth(4).inner_text() == "cam-1"

    page.wait_for_selector("[data-test=stream-state]:text-is('live')")
    send(url, credential, "results", envelope("cam-1", credential, 3, "count", {"count": 7}))
    page.wait_for_selector("td:text-is('{\"count\":7}')")  # from the stream: the page was not reloaded
    device = page.locator("tr:has(td:text-is('cam-1'))").first.inner_text()
    assert 'count {"count":7}' in device
    shot(page, "edge")


def test_a_device_enrolled_from_the_page_gets_a_one_time_token_that_works(
    page, console_server, org_key, signed_in
):
    signed_in(page, org_key("edge-org-2"))
    open_page(page, console_server, "edge", "Edge fleet")
    assert page.inner_text("p.empty >> nth=0") == "No device yet: enrol one below."
    form = page.locator("form[aria-label='enrol a device']")
    form.locator("input[name=device_id]").fill("door-2")
    form.locator("input[name=name]").fill("Back door")
    form.locator("button[type=submit]").click()
    token = page.inner_text("[data-test=enrolment] code")
    assert "pending" in page.locator("tr:has(td:text-is('door-2'))").inner_text()
    answer = httpx.post(f"{console_server.url}/v1/edge/enroll", json={"token": token})
    assert answer.status_code == 200 and answer.json()["device_id"] == "door-2"
