"""Image requests on the fleet side, on SQLite and PostgreSQL: a request is published once on the device's
down/requests topic (never retained), the image parts the device answers with make one JPEG that only the
organisation that asked can read, and parts nobody asked for complete nothing."""

from __future__ import annotations

import base64
import json

import pytest

from tests.service.support import auth
from tests.service.test_edge import enrol, envelope

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
