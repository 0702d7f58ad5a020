"""GET /v1/edge/results/stream: a subscriber receives each new result of its organisation once, as a
server-sent event, filtered by device; re-sends and other organisations' results never reach it."""

from __future__ import annotations

import json
import threading

from tests.service.support import auth
from tests.service.test_edge import enrol, envelope


def test_the_stream_carries_each_new_result_of_the_organisation_once(make_service):
    service = make_service()
    key, other_key = service.key("acme"), service.key("globex")
    credential = enrol(service, key, "st-cam")
    other_cam = enrol(service, key, "st-cam-2")
    foreign = enrol(service, other_key, "st-foreign")

    def post(device_id: str, secret: str, seq: int) -> None:
        service.client.post("/v1/edge/results", json=envelope(device_id, secret, seq), headers=auth(secret))

    def send() -> None:
        post("st-foreign", foreign, 1)
        post("st-cam-2", other_cam, 1)  # same organisation, filtered out by ?device=
        post("st-cam", credential, 1)
        post("st-cam", credential, 1)  # a re-send: no second event
        post("st-cam", credential, 2)

    events = []
    with service.client.stream(
        "GET", "/v1/edge/results/stream", params={"device": "st-cam"}, headers=auth(key)
    ) as stream:
        sender = None
        for line in stream.iter_lines():
            if line == ": subscribed":
                sender = threading.Thread(target=send)
                sender.start()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if events[-1]["seq"] == 2:
                    break
        sender.join()
    assert [(e["device_id"], e["seq"]) for e in events] == [("st-cam", 1), ("st-cam", 2)]
    assert (
        service.client.get(
            "/v1/edge/results/stream", params={"device": "st-foreign"}, headers=auth(key)
        ).status_code
        == 404
    )
