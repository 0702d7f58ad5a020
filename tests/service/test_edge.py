"""The edge fleet over HTTP, on SQLite and PostgreSQL: enrolment, results stored once per (device, seq) and
metered once, queries by device, kind and time, cross-organisation isolation, bad input and wrong credentials,
and a rollout whose canary fails rolling back by itself on an injected clock."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from tests.service.support import auth

SHA_A, SHA_B = "a" * 64, "b" * 64


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def envelope(device_id: str, credential: str, seq: int, kind: str = "count", **body: object) -> dict:
    return {
        "v": 1,
        "device_id": device_id,
        "seq": seq,
        "time": datetime.fromtimestamp(1_800_000_000 + seq, UTC).isoformat(),
        "kind": kind,
        "model": None,
        "body": body or {"count": seq},
        "auth": credential,
    }


@pytest.fixture
def fleet(make_service):
    service = make_service()
    clock = Clock()
    service.client.app.state.edge.clock = clock
    return service, clock


def enrol(service, key: str, device_id: str) -> str:
    made = service.client.post("/v1/edge/devices", json={"device_id": device_id}, headers=auth(key))
    assert made.status_code == 201, made.text
    token = made.json()["enrollment_token"]
    answer = service.client.post("/v1/edge/enroll", json={"token": token})
    assert answer.status_code == 200, answer.text
    assert answer.json()["device_id"] == device_id
    again = service.client.post("/v1/edge/enroll", json={"token": token})
    assert again.status_code == 401  # one-time
    return answer.json()["credential"]


def test_a_resent_result_is_acknowledged_and_stored_and_metered_once(fleet):
    service, _ = fleet
    key = service.key("acme")
    credential = enrol(service, key, "cam-1")
    first = envelope("cam-1", credential, 1)
    posted = service.client.post(
        "/v1/edge/results", json=[first, envelope("cam-1", credential, 2)], headers=auth(credential)
    )
    assert [a["status"] for a in posted.json()["acks"]] == ["stored", "stored"]
    resent = service.client.post("/v1/edge/results", json=first, headers=auth(credential))
    assert resent.json()["acks"] == [{"device_id": "cam-1", "seq": 1, "status": "duplicate"}]

    stored = service.client.get("/v1/edge/results", params={"device": "cam-1"}, headers=auth(key)).json()[
        "data"
    ]
    assert [(r["seq"], r["body"]) for r in stored] == [(1, {"count": 1}), (2, {"count": 2})]
    usage = service.client.get("/v1/edge/usage", headers=auth(key)).json()["data"]
    sizes = len(json.dumps(first, separators=(",", ":"))) + len(
        json.dumps(envelope("cam-1", credential, 2), separators=(",", ":"))
    )
    assert [(u["device_id"], u["messages"], u["bytes"]) for u in usage] == [("cam-1", 2, sizes)]


def test_results_are_queried_by_kind_and_device_time(fleet):
    service, _ = fleet
    key = service.key("acme")
    credential = enrol(service, key, "cam-q")
    batch = [envelope("cam-q", credential, s, "event" if s % 2 else "count") for s in range(1, 7)]
    service.client.post("/v1/edge/results", json=batch, headers=auth(credential))
    events = service.client.get("/v1/edge/results", params={"kind": "event"}, headers=auth(key)).json()[
        "data"
    ]
    assert [r["seq"] for r in events] == [1, 3, 5]
    window = {"since": 1_800_000_002, "until": 1_800_000_005}
    ranged = service.client.get("/v1/edge/results", params=window, headers=auth(key)).json()["data"]
    assert [r["seq"] for r in ranged] == [2, 3, 4]
    misspelt = service.client.get("/v1/edge/results", params={"from": 1}, headers=auth(key))
    assert misspelt.status_code == 400


def test_wrong_credentials_and_malformed_envelopes_are_refused_and_nothing_is_stored(fleet):
    service, _ = fleet
    key = service.key("acme")
    credential = enrol(service, key, "cam-w")
    other = enrol(service, key, "cam-x")
    client, fleet_state = service.client, service.client.app.state.edge
    cases = [
        (envelope("cam-w", "cumulo-device-forged", 1), "cumulo-device-forged", 401),
        (envelope("cam-w", other, 1), other, 401),  # a real credential of another device
        (envelope("cam-w", credential, 1), other, 401),  # envelope auth differs from the bearer
        ({**envelope("cam-w", credential, 1), "seq": -1}, credential, 400),
        ({**envelope("cam-w", credential, 1), "extra": 1}, credential, 400),
        ({**envelope("cam-w", credential, 1), "time": "yesterday"}, credential, 400),
    ]
    for body, bearer, status in cases:
        answer = client.post("/v1/edge/results", json=body, headers=auth(bearer))
        assert answer.status_code == status, (body, answer.text)
        assert "\n" not in answer.json()["error"]["message"]
    answer = client.post("/v1/edge/results", content=b"{not json", headers=auth(credential))
    assert answer.status_code == 400
    assert client.post("/v1/edge/results", json=envelope("cam-w", credential, 1)).status_code == 401
    assert client.get("/v1/edge/results", headers=auth(key)).json()["data"] == []
    assert fleet_state.rejected["unauthorized"] == 3 and fleet_state.rejected["malformed"] == 3

    client.post("/v1/edge/devices/cam-w/revoke", headers=auth(key))
    revoked = client.post("/v1/edge/results", json=envelope("cam-w", credential, 2), headers=auth(credential))
    assert revoked.status_code == 401
    assert client.get("/v1/edge/desired", headers=auth(credential)).status_code == 401


def test_one_organisation_never_sees_another_organisations_devices_results_or_rollouts(fleet):
    service, _ = fleet
    acme, globex = service.key("acme"), service.key("globex")
    credential = enrol(service, acme, "acme-cam")
    service.client.post(
        "/v1/edge/results", json=envelope("acme-cam", credential, 1), headers=auth(credential)
    )
    rollout = service.client.post(
        "/v1/edge/rollouts",
        json={"name": "shelf", "version": "1", "sha256": SHA_A, "url": "http://m/1"},
        headers=auth(acme),
    )
    assert rollout.status_code == 201, rollout.text
    client = service.client
    assert client.get("/v1/edge/devices", headers=auth(globex)).json()["data"] == []
    assert client.get("/v1/edge/results", headers=auth(globex)).json()["data"] == []
    assert client.get("/v1/edge/rollouts", headers=auth(globex)).json()["data"] == []
    assert client.get("/v1/edge/usage", headers=auth(globex)).json()["data"] == []
    for path in ("/v1/edge/devices/acme-cam", f"/v1/edge/rollouts/{rollout.json()['id']}"):
        assert client.get(path, headers=auth(globex)).status_code == 404
    assert (
        client.get("/v1/edge/results", params={"device": "acme-cam"}, headers=auth(globex)).status_code == 404
    )
    assert client.post("/v1/edge/devices/acme-cam/revoke", headers=auth(globex)).status_code == 404
    assert client.get("/v1/edge/devices/acme-cam", headers=auth(acme)).json()["state"] == "enrolled"


def beat(service, device_id: str, credential: str, seq: int) -> None:
    answer = service.client.post(
        "/v1/edge/heartbeat", json=envelope(device_id, credential, seq, "heartbeat"), headers=auth(credential)
    )
    assert answer.status_code == 204, answer.text


def start_rollout(service, key: str, sha: str, version: str, **stages: float) -> dict:
    body = {"name": "shelf", "version": version, "sha256": sha, "url": f"http://models/{version}", **stages}
    answer = service.client.post("/v1/edge/rollouts", json=body, headers=auth(key))
    assert answer.status_code == 201, answer.text
    return answer.json()


def desired_version(service, credential: str) -> str | None:
    model = service.client.get("/v1/edge/desired", headers=auth(credential)).json()["model"]
    return model["version"] if model else None


def test_a_rollout_promotes_after_a_healthy_window_and_rolls_back_when_a_canary_reports_an_error(fleet):
    service, clock = fleet
    key = service.key("acme")
    cams = {f"cam-{i}": enrol(service, key, f"cam-{i}") for i in range(4)}
    edge = service.client.app.state.edge
    first = start_rollout(service, key, SHA_A, "1", canary_share=0.25, window_seconds=60, silence_seconds=30)
    assert first["canaries"] == ["cam-0"] and first["state"] == "canary"
    assert [desired_version(service, c) for c in cams.values()] == ["1", None, None, None]
    for step in range(1, 5):  # canary heartbeats every 15 s for 60 s
        clock.now += 15
        beat(service, "cam-0", cams["cam-0"], step)
        edge.tick()
    assert (
        service.client.get(f"/v1/edge/rollouts/{first['id']}", headers=auth(key)).json()["state"]
        == "completed"
    )
    assert [desired_version(service, c) for c in cams.values()] == ["1", "1", "1", "1"]

    second = start_rollout(service, key, SHA_B, "2", canary_share=0.5, window_seconds=60, silence_seconds=30)
    assert second["canaries"] == ["cam-0", "cam-1"]
    assert [desired_version(service, c) for c in cams.values()] == ["2", "2", "1", "1"]
    clock.now += 10
    edge.tick()
    assert (
        service.client.get(f"/v1/edge/rollouts/{second['id']}", headers=auth(key)).json()["state"] == "canary"
    )
    failing = envelope(
        "cam-1", cams["cam-1"], 100, "status", ok=False, error="model failed to load", rollout_id=second["id"]
    )
    service.client.post("/v1/edge/results", json=failing, headers=auth(cams["cam-1"]))
    edge.tick()
    rolled = service.client.get(f"/v1/edge/rollouts/{second['id']}", headers=auth(key)).json()
    assert rolled["state"] == "rolled_back" and "cam-1" in rolled["reason"]
    assert [h["event"] for h in rolled["history"]] == ["canaries", "failed", "rolled_back"]
    assert [desired_version(service, c) for c in cams.values()] == ["1", "1", "1", "1"]


def test_a_canary_that_stops_heartbeating_rolls_the_rollout_back(fleet):
    service, clock = fleet
    key = service.key("acme")
    cams = {f"cam-{i}": enrol(service, key, f"cam-{i}") for i in range(2)}
    edge = service.client.app.state.edge
    rollout = start_rollout(
        service, key, SHA_A, "1", canary_share=0.5, window_seconds=300, silence_seconds=30
    )
    clock.now += 20
    beat(service, "cam-0", cams["cam-0"], 1)
    edge.tick()
    assert (
        service.client.get(f"/v1/edge/rollouts/{rollout['id']}", headers=auth(key)).json()["state"]
        == "canary"
    )
    clock.now += 31  # 31 s since its last heartbeat
    edge.tick()
    rolled = service.client.get(f"/v1/edge/rollouts/{rollout['id']}", headers=auth(key)).json()
    assert rolled["state"] == "rolled_back" and "silent" in rolled["reason"]
    assert desired_version(service, cams["cam-0"]) is None  # back to no model: there was no good one before
    assert service.client.get("/v1/edge/rollouts", headers=auth(key)).json()["data"][0]["id"] == rollout["id"]


def test_an_enrolment_token_expires_and_a_second_rollout_waits_for_the_first(fleet):
    service, clock = fleet
    key = service.key("acme")
    made = service.client.post("/v1/edge/devices", json={"device_id": "late"}, headers=auth(key)).json()
    clock.now += 86401
    expired = service.client.post("/v1/edge/enroll", json={"token": made["enrollment_token"]})
    assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]
    taken = service.client.post(
        "/v1/edge/devices", json={"device_id": "late"}, headers=auth(service.key("other"))
    )
    assert taken.status_code == 409
    enrol(service, key, "cam-9")
    start_rollout(service, key, SHA_A, "1")
    again = service.client.post(
        "/v1/edge/rollouts",
        json={"name": "s", "version": "2", "sha256": SHA_B, "url": "u"},
        headers=auth(key),
    )
    assert again.status_code == 409
