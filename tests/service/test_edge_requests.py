"""Image requests on the fleet side, on SQLite and PostgreSQL: a request is published once on the device's
down/requests topic (never retained), the image parts the device answers with make one JPEG that only the
organisation that asked can read, and parts nobody asked for complete nothing."""

from __future__ import annotations

import base64
import json

import pytest

from tests.service.support import auth
from tests.service.test_edge import Clock, beat, enrol, envelope

JPEG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 40 + b"\xff\xd9"


@pytest.fixture
def published(make_service):
    service = make_service()
    sent: list[tuple[str, bytes, bool]] = []
    service.client.app.state.edge.publisher = lambda topic, payload, retain: sent.append(
        (topic, payload, retain)
    )
    return service, sent


def image_parts(device_id: str, credential: str, request_id: str, first_seq: int, parts: int) -> list[dict]:
    data = base64.b64encode(JPEG).decode()
    step = -(-len(data) // parts)
    return [
        envelope(
            device_id,
            credential,
            first_seq + i,
            "image",
            request_id=request_id,
            part=i,
            parts=parts,
            jpeg_b64=data[i * step : (i + 1) * step],
        )
        for i in range(parts)
    ]


def test_an_image_request_is_published_once_and_its_answer_is_the_organisations_only(published):
    service, sent = published
    key, other = service.key("acme"), service.key("globex")
    credential = enrol(service, key, "cam-i")
    asked = service.client.post("/v1/edge/devices/cam-i/requests", json={"kind": "image"}, headers=auth(key))
    assert asked.status_code == 201, asked.text
    request = asked.json()
    assert request["state"] == "sent"
    desired = [s for s in sent if s[0].endswith("/down/requests")]
    assert [(t, r) for t, _, r in desired] == [("cumulo/v1/devices/cam-i/down/requests", False)]
    assert json.loads(desired[0][1]) == {"v": 1, "id": request["id"], "kind": "image", "reason": None}
    service.client.app.state.edge.tick()
    assert len([s for s in sent if s[0].endswith("/down/requests")]) == 1  # not again on the next pass

    path = f"/v1/edge/requests/{request['id']}"
    assert service.client.get(path + "/image", headers=auth(key)).status_code == 404  # not answered yet
    stray = image_parts("cam-i", credential, "req_0000", 1, 1)  # nobody asked for this one
    parts = image_parts("cam-i", credential, request["id"], 2, 3)
    for batch in (stray, parts[:2], parts[2:], parts[:1]):
        answer = service.client.post("/v1/edge/results", json=batch, headers=auth(credential))
        assert answer.status_code == 200, answer.text
    assert service.client.get(path, headers=auth(key)).json()["state"] == "answered"
    image = service.client.get(path + "/image", headers=auth(key))
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == JPEG
    for url in (path, path + "/image"):
        assert service.client.get(url, headers=auth(other)).status_code == 404
    assert (
        service.client.post("/v1/edge/devices/cam-i/requests", json={"kind": "image"}, headers=auth(other))
    ).status_code == 404
    bad = service.client.post("/v1/edge/devices/cam-i/requests", json={"kind": "video"}, headers=auth(key))
    assert bad.status_code == 400 and "\n" not in bad.json()["error"]["message"]


def test_a_request_the_device_missed_is_sent_again_once_it_is_heard_from_until_answered(published):
    service, sent = published
    clock = Clock()
    edge = service.client.app.state.edge
    edge.clock = clock
    key = service.key("acme")
    credential = enrol(service, key, "cam-o")
    asked = service.client.post("/v1/edge/devices/cam-o/requests", json={"kind": "image"}, headers=auth(key))
    request_id = asked.json()["id"]

    def sends() -> int:
        return len([s for s in sent if s[0].endswith("/cam-o/down/requests")])

    assert sends() == 1
    clock.now += 100
    edge.tick()
    assert sends() == 1  # offline: not heard from since, so not sent into the void again
    beat(service, "cam-o", credential, 1)  # back
    edge.tick()
    assert sends() == 2  # heard from after the publish, 100 s later: it missed it
    clock.now += 5
    beat(service, "cam-o", credential, 2)
    edge.tick()
    assert sends() == 2  # within resend_seconds of the last send: give the device time to answer
    clock.now += 30
    beat(service, "cam-o", credential, 3)
    edge.tick()
    assert sends() == 3
    for part in image_parts("cam-o", credential, request_id, 10, 2):
        assert service.client.post("/v1/edge/results", json=part, headers=auth(credential)).status_code == 200
    assert (
        service.client.get(f"/v1/edge/requests/{request_id}", headers=auth(key)).json()["state"] == "answered"
    )
    clock.now += 100
    beat(service, "cam-o", credential, 20)
    edge.tick()
    assert sends() == 3  # answered: never again
