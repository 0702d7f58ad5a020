"""The edge fleet through the real Mosquitto broker on 127.0.0.1:1883: results published over MQTT land once
(a re-sent seq too), wrong credentials and malformed messages are refused without harm to the bridge, and a
rollout's desired state reaches the device as a retained message. Each test uses its own topic root and
client ids, so runs in parallel never see each other's messages."""

from __future__ import annotations

import json
import queue
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from cumulo.contracts.edge import DOWN_DESIRED, UP_HEARTBEAT, UP_RESULTS, topic_for
from tests.service.support import auth
from tests.service.test_edge import SHA_A, enrol, envelope

BROKER = "mqtt://127.0.0.1:1883"


def wait_for(condition, what: str, limit: float = 20.0):
    """Polls until `condition()` is truthy; the limit only ends a hung test, it measures nothing."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def bridged(make_service):
    root = f"cumulo-test/{uuid.uuid4().hex[:10]}/devices"
    service = make_service(
        edge_mqtt_url=BROKER,
        edge_topic_root=root,
        edge_mqtt_client_id=f"cumulo-bridge-{uuid.uuid4().hex[:8]}",
        edge_session_expiry_seconds=60,
        edge_check_seconds=0.2,
    )
    assert service.client.app.state.edge_bridge.connected.wait(20)
    return service, root


@pytest.fixture
def device_client():
    clients = []

    def make() -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"dev-{uuid.uuid4().hex[:8]}")
        client.connect("127.0.0.1", 1883)
        client.loop_start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.disconnect()
        client.loop_stop()


def publish(client: mqtt.Client, topic: str, payload: bytes) -> None:
    client.publish(topic, payload, qos=1).wait_for_publish(10)


def seqs(service, key: str) -> list[int]:
    return [r["seq"] for r in service.client.get("/v1/edge/results", headers=auth(key)).json()["data"]]


def test_results_published_over_mqtt_land_once_and_bad_messages_do_no_harm(bridged, device_client):
    service, root = bridged
    key = service.key("acme")
    credential = enrol(service, key, "mq-cam")
    other = enrol(service, key, "mq-other")
    device = device_client()
    results = topic_for("mq-cam", UP_RESULTS, root)

    def send(body: dict, topic: str = results) -> None:
        publish(device, topic, json.dumps(body).encode())

    send(envelope("mq-cam", credential, 1))
    send(envelope("mq-cam", credential, 1))  # a re-send, as after a lost PUBACK
    publish(device, results, b"\xff not json")
    send(envelope("mq-cam", "cumulo-device-forged", 7))
    send(envelope("mq-cam", other, 8))  # another device's real credential
    send(envelope("mq-other", other, 9))  # a valid envelope on the wrong device's topic
    publish(device, f"{root}/mq-cam/up/nonsense", b"{}")
    send(envelope("mq-cam", credential, 2))
    wait_for(lambda: 2 in seqs(service, key), "seq 2 to land")
    assert seqs(service, key) == [1, 2]
    usage = service.client.get("/v1/edge/usage", headers=auth(key)).json()["data"]
    assert [(u["device_id"], u["messages"]) for u in usage] == [("mq-cam", 2)]
    rejected = service.client.app.state.edge.rejected
    assert (rejected["malformed"], rejected["unauthorized"], rejected["topic"]) == (1, 3, 1)

    before = service.client.get("/v1/edge/devices/mq-cam", headers=auth(key)).json()["last_seen"]
    service.client.app.state.edge.clock = lambda: before + 100
    send(envelope("mq-cam", credential, 3, "heartbeat"), topic_for("mq-cam", UP_HEARTBEAT, root))
    wait_for(
        lambda: (
            service.client.get("/v1/edge/devices/mq-cam", headers=auth(key)).json()["last_seen"]
            == before + 100
        ),
        "the heartbeat to move last_seen",
    )
    assert seqs(service, key) == [1, 2]  # heartbeats are not results


def test_a_rollout_reaches_the_device_as_its_retained_desired_state(bridged, device_client):
    service, root = bridged
    key = service.key("acme")
    credential = enrol(service, key, "mq-shelf")
    body = {"name": "shelf", "version": "7", "sha256": SHA_A, "url": "http://models/7", "canary_share": 1.0}
    assert service.client.post("/v1/edge/rollouts", json=body, headers=auth(key)).status_code == 201

    received: queue.Queue = queue.Queue()
    device = device_client()  # subscribes only after the publish: the retained message must still arrive
    device.on_message = lambda _c, _u, message: received.put((message.retain, json.loads(message.payload)))
    device.subscribe(topic_for("mq-shelf", DOWN_DESIRED, root), qos=1)
    retained, state = received.get(timeout=20)
    assert retained and state["model"]["version"] == "7" and state["device_id"] == "mq-shelf"
    assert state == service.client.get("/v1/edge/desired", headers=auth(credential)).json()
