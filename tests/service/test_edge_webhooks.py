"""Webhooks against a local HTTP receiver, on SQLite and PostgreSQL with an injected clock: results of the kinds
asked for are POSTed signed with HMAC-SHA256, retried with growing backoff until the receiver takes them, at
least once with the (device_id, seq) id so the receiver can deduplicate; a re-sent result owes nothing more;
another organisation cannot see or delete the webhook. Also: refused messages are counted per device and in
Prometheus."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.service.support import auth
from tests.service.test_edge import Clock, enrol, envelope

SECRET = "s3cret-of-the-receiver"


class Receiver:
    """Answers 500 to the first `failures` POSTs, 200 after; keeps every (headers, body) it was sent."""

    def __init__(self, failures: int) -> None:
        self.failures, self.seen = failures, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.seen.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.seen) <= receiver.failures else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def setup(make_service):
    service, clock = make_service(), Clock()
    edge = service.client.app.state.edge
    edge.clock, edge.background_deliveries = clock, False  # this test drives delivery rounds itself
    receiver = Receiver(failures=2)
    yield service, clock, edge, receiver
    receiver.server.shutdown()


def test_results_are_posted_signed_retried_with_backoff_and_carry_an_id_to_deduplicate(setup):
    service, clock, edge, receiver = setup
    key = service.key("acme")
    credential = enrol(service, key, "cam-h")
    made = service.client.post(
        "/v1/edge/webhooks",
        json={"url": receiver.url, "secret": SECRET, "kinds": ["event"]},
        headers=auth(key),
    )
    assert made.status_code == 201, made.text
    hook = made.json()
    batch = [
        envelope("cam-h", credential, 1, "event", type="slot_empty", slot=4),
        envelope("cam-h", credential, 2),
    ]
    service.client.post("/v1/edge/results", json=batch, headers=auth(credential))
    service.client.post("/v1/edge/results", json=batch[0], headers=auth(credential))  # a re-send: stored once

    with httpx.Client(timeout=10) as client:
        rounds = []
        for advance in (0, 0.5, 0.6, 1.5, 0.6, 100):  # due at +0, then 1 s and 2 s after each failure
            clock.now += advance
            outcome = edge.deliver_webhooks(client)
            rounds.append((outcome.delivered, outcome.retried))
    assert rounds == [(0, 1), (0, 0), (0, 1), (0, 0), (1, 0), (0, 0)]
    assert len(receiver.seen) == 3
    for headers, body in receiver.seen:
        assert headers["X-Cumulo-Delivery"] == "cam-h:1"
        stamp, signature = (part.split("=", 1)[1] for part in headers["X-Cumulo-Signature"].split(","))
        expected = hmac.new(SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature, expected)
        item = json.loads(body)
        assert (item["id"], item["kind"], item["body"]) == (
            "cam-h:1",
            "event",
            {"type": "slot_empty", "slot": 4},
        )
    forged = hmac.new(b"another secret", b"x", hashlib.sha256).hexdigest()
    assert forged not in receiver.seen[0][0]["X-Cumulo-Signature"]

    listed = service.client.get("/v1/edge/webhooks", headers=auth(key)).json()["data"]
    assert [(h["id"], h["delivered"], h["pending"], h["failed"]) for h in listed] == [(hook["id"], 1, 0, 0)]
    assert "secret" not in listed[0]
    other = service.key("globex")
    assert service.client.get("/v1/edge/webhooks", headers=auth(other)).json()["data"] == []
    assert service.client.delete(f"/v1/edge/webhooks/{hook['id']}", headers=auth(other)).status_code == 404
    assert service.client.delete(f"/v1/edge/webhooks/{hook['id']}", headers=auth(key)).status_code == 200
    service.client.post(
        "/v1/edge/results", json=envelope("cam-h", credential, 3, "event"), headers=auth(credential)
    )
    with httpx.Client(timeout=10) as client:
        assert edge.deliver_webhooks(client).delivered == 0
    assert len(receiver.seen) == 3


def test_a_webhook_needs_an_http_url_and_a_real_secret(setup):
    service, *_ = setup
    key = service.key("acme")
    for body in (
        {"url": "file:///etc/passwd"},
        {"url": "http://x/h", "secret": "short"},
        {"url": "u", "kinds": ["A"]},
    ):
        answer = service.client.post("/v1/edge/webhooks", json=body, headers=auth(key))
        assert answer.status_code == 400, body
        assert "\n" not in answer.json()["error"]["message"]
    made = service.client.post("/v1/edge/webhooks", json={"url": "https://example.com/h"}, headers=auth(key))
    assert made.json()["secret"].startswith("whsec_") and made.json()["kinds"] == []


def test_refused_messages_are_counted_per_device_and_in_prometheus(setup):
    service, _, edge, _ = setup
    key = service.key("acme")
    credential = enrol(service, key, "cam-r")
    forged = envelope("cam-r", "cumulo-device-forged", 1)
    for _ in range(3):
        assert (
            service.client.post(
                "/v1/edge/results", json=forged, headers=auth("cumulo-device-forged")
            ).status_code
            == 401
        )
    good = service.client.post(
        "/v1/edge/results", json=envelope("cam-r", credential, 1), headers=auth(credential)
    )
    assert good.status_code == 200
    edge.tick()
    device = service.client.get("/v1/edge/devices/cam-r", headers=auth(key)).json()
    assert device["refused"] == {"unauthorized": 3}
    metrics = service.client.get("/metrics").text
    assert 'cumulo_edge_messages_refused_total{reason="unauthorized"} 3.0' in metrics
