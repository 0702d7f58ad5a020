"""Images leave a device only when its organisation asks: end to end with the gateway under uvicorn, the real
broker and an agent in this process. Frames and results flow with no image bytes in any of them; a request made
over the API reaches the agent on down/requests, which answers with its latest frame as JPEG parts; the
service puts them together, and the picture is read with the organisation's key."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from cumulo.contracts.edge import DeviceRequest
from cumulo.edge.agent import Agent, AgentSettings, enroll
from cumulo.edge.sources import open_source
from tests.edge.conftest import wait_for
from tests.edge.test_fleet_end_to_end import gateway, service  # noqa: F401 (the gateway fixtures)


def test_an_image_is_sent_only_on_request_and_only_its_organisation_reads_it(
    tmp_path: Path,
    service: tuple[str, str],  # noqa: F811
    topic_root: str,
    shelf_package: Path,
) -> None:
    url, key = service
    headers = {"Authorization": f"Bearer {key}"}
    made = httpx.post(f"{url}/v1/edge/devices", json={"device_id": "eye-1"}, headers=headers).json()
    home = tmp_path / "device"
    home.mkdir()
    identity = enroll(home, url, made["enrollment_token"])
    settings = AgentSettings(
        server=url, mqtt_url="mqtt://127.0.0.1:1883", topic_root=topic_root, fps=0, heartbeat_s=3600
    )
    agent = Agent(home, identity, open_source("synthetic:shelf", 3, 3), settings, shelf_package)
    try:
        wait_for(lambda: (agent.pump(), agent.sender.mqtt.connected)[1], what="the agent's broker link")
        agent.run(max_frames=30)
        assert agent.drain(60)

        def stored() -> list[dict]:
            answer = httpx.get(f"{url}/v1/edge/results", params={"limit": 1000}, headers=headers)
            return answer.json()["data"]

        wait_for(lambda: len(stored()) >= agent.outbox.stats().next_seq - 1, what="the results")
        plain = stored()
        assert plain and {r["kind"] for r in plain} <= {"event", "summary", "status", "count"}
        text = json.dumps(plain)
        assert "jpeg" not in text and "/9j/" not in text  # no JPEG, not even in base64

        asked = httpx.post(
            f"{url}/v1/edge/devices/eye-1/requests",
            json={"kind": "image", "reason": "audit"},
            headers=headers,
        )
        assert asked.status_code == 201, asked.text
        request_id = asked.json()["id"]

        def answered() -> bool:
            agent.step()
            view = httpx.get(f"{url}/v1/edge/requests/{request_id}", headers=headers).json()
            return view["state"] == "answered"

        wait_for(answered, what="the image")
        image = httpx.get(f"{url}/v1/edge/requests/{request_id}/image", headers=headers)
        assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"
        picture = Image.open(io.BytesIO(image.content))
        assert picture.format == "JPEG" and picture.size == tuple(agent._last_frame.shape[2:0:-1])
        parts = [r for r in stored() if r["kind"] == "image"]
        assert parts and {r["body"]["request_id"] for r in parts} == {request_id}
        anonymous = httpx.get(f"{url}/v1/edge/requests/{request_id}/image")
        assert (
            anonymous.status_code == 401
        )  # another organisation gets 404: tests/service/test_edge_requests.py
    finally:
        agent.close()


def test_a_request_made_while_the_device_is_offline_is_answered_once_when_it_is_back(
    tmp_path: Path,
    gateway: tuple[str, str, Any],  # noqa: F811
    topic_root: str,
    shelf_package: Path,
) -> None:
    """The request is published while no agent is connected (a clean MQTT session: the broker keeps nothing for
    it). Once the device is heard from again, the gateway sends it again and the image arrives, once; a copy of
    the request delivered after a restart is not answered a second time."""
    url, key, app = gateway
    app.state.edge.request_resend_seconds = 1.0
    headers = {"Authorization": f"Bearer {key}"}
    made = httpx.post(f"{url}/v1/edge/devices", json={"device_id": "eye-2"}, headers=headers).json()
    home = tmp_path / "device"
    home.mkdir()
    identity = enroll(home, url, made["enrollment_token"])
    settings = AgentSettings(
        server=url, mqtt_url="mqtt://127.0.0.1:1883", topic_root=topic_root, fps=0, heartbeat_s=0.2
    )

    def view(request_id: str) -> dict[str, Any]:
        return httpx.get(f"{url}/v1/edge/requests/{request_id}", headers=headers).json()

    def image_parts() -> list[dict[str, Any]]:
        found = httpx.get(
            f"{url}/v1/edge/results", params={"kind": "image", "limit": 1000}, headers=headers
        ).json()["data"]
        return [r["body"] for r in found]

    agent = Agent(home, identity, open_source("synthetic:shelf", 4, 3), settings, shelf_package)
    wait_for(lambda: (agent.pump(), agent.sender.mqtt.connected)[1], what="the agent's broker link")
    agent.run(max_frames=3)
    assert agent.drain(60)
    agent.close()  # the camera goes offline

    asked = httpx.post(f"{url}/v1/edge/devices/eye-2/requests", json={"kind": "image"}, headers=headers)
    assert asked.status_code == 201, asked.text
    request_id = asked.json()["id"]
    wait_for(lambda: view(request_id)["state"] == "sent", what="the request published")
    first_publish = view(request_id)["published_at"]

    agent = Agent(home, identity, open_source("synthetic:shelf", 4, 3), settings, shelf_package)
    try:  # back: no frame taken yet, heartbeats every 0.2 s, and nothing else is done but pumping
        wait_for(lambda: (agent.pump(), view(request_id)["state"] == "answered")[1], what="the image")
        assert view(request_id)["published_at"] > first_publish  # sent again: the first copy was missed
        image = httpx.get(f"{url}/v1/edge/requests/{request_id}/image", headers=headers)
        assert image.status_code == 200 and Image.open(io.BytesIO(image.content)).format == "JPEG"
        assert agent.drain(60)
        parts = image_parts()
        assert parts and {p["request_id"] for p in parts} == {request_id}
        assert sorted(p["part"] for p in parts) == list(range(parts[0]["parts"]))  # one answer, no part twice
    finally:
        agent.close()

    again = Agent(home, identity, open_source("synthetic:shelf", 4, 3), settings, shelf_package)
    try:  # restarted, the same request delivered once more (QoS 1 may): nothing new is sent
        before = again.outbox.stats().next_seq
        again.answer(DeviceRequest(id=request_id, kind="image"))
        assert again.outbox.stats().next_seq == before and again.outbox.stats().pending == 0
    finally:
        again.close()
    assert len(image_parts()) == len(parts)
