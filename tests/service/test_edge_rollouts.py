"""Rollouts the way a fleet lives them, over HTTP on SQLite and PostgreSQL with an injected clock: an old error
delivered late from a device's backlog never rolls a newer rollout back, each device goes back to its own last
good model, a device enrolled mid-rollout gets the model of the stage it joins, and a finished rollout's history
names every step and device."""

from __future__ import annotations

import pytest

from tests.service.support import auth
from tests.service.test_edge import Clock, beat, desired_version, enrol, envelope, start_rollout

SHA = {v: c * 64 for v, c in (("1", "a"), ("2", "b"), ("3", "c"))}


@pytest.fixture
def acme(make_service):
    service, clock = make_service(), Clock()
    service.client.app.state.edge.clock = clock
    return service, clock, service.key("acme"), service.client.app.state.edge


def rollout_view(service, key: str, rollout_id: int) -> dict:
    return service.client.get(f"/v1/edge/rollouts/{rollout_id}", headers=auth(key)).json()


def post_status(service, device_id: str, credential: str, seq: int, **body: object) -> None:
    result = envelope(device_id, credential, seq, "status", **body)
    answer = service.client.post("/v1/edge/results", json=result, headers=auth(credential))
    assert answer.status_code == 200, answer.text


def healthy_window(service, edge, clock, cams: dict[str, str], seconds: int, seq: int) -> None:
    """Every device heartbeats every 10 s for `seconds`, with a pass after each."""
    for step in range(seconds // 10):
        clock.now += 10
        for name, credential in cams.items():
            beat(service, name, credential, seq + step)
        edge.tick()


def test_a_late_error_of_an_earlier_rollout_does_not_roll_back_the_current_one(acme):
    service, clock, key, edge = acme
    cams = {f"cam-{i}": enrol(service, key, f"cam-{i}") for i in range(2)}
    first = start_rollout(
        service, key, SHA["1"], "1", canary_share=0.5, window_seconds=30, silence_seconds=25
    )
    healthy_window(service, edge, clock, cams, 30, seq=1)
    assert rollout_view(service, key, first["id"])["state"] == "completed"

    second = start_rollout(
        service, key, SHA["2"], "2", canary_share=1.0, window_seconds=30, silence_seconds=25
    )
    # cam-1 could not install the first model; its status waited in its outbox and arrives only now.
    post_status(service, "cam-1", cams["cam-1"], 10, ok=False, error="bad sha256", rollout_id=first["id"])
    edge.tick()
    assert rollout_view(service, key, second["id"])["state"] == "canary"
    # An error without the rollout it belongs to says nothing about this rollout either.
    post_status(service, "cam-1", cams["cam-1"], 11, ok=False, error="camera glitch")
    healthy_window(service, edge, clock, cams, 30, seq=20)
    assert rollout_view(service, key, second["id"])["state"] == "completed"
    assert [desired_version(service, c) for c in cams.values()] == ["2", "2"]
    late = [h for h in rollout_view(service, key, first["id"])["history"] if h["event"] == "failed"]
    assert [h["detail"]["device"] for h in late] == ["cam-1"]

    third = start_rollout(
        service, key, SHA["3"], "3", canary_share=0.5, window_seconds=30, silence_seconds=25
    )
    post_status(service, "cam-0", cams["cam-0"], 30, ok=False, error="no memory", rollout_id=third["id"])
    edge.tick()
    rolled = rollout_view(service, key, third["id"])
    assert (
        rolled["state"] == "rolled_back" and "cam-0" in rolled["reason"] and "no memory" in rolled["reason"]
    )
    assert [desired_version(service, c) for c in cams.values()] == ["2", "2"]


def test_devices_go_back_to_their_own_good_model_and_late_enrolments_join_the_current_stage(acme):
    service, clock, key, edge = acme
    cams = {f"cam-{i}": enrol(service, key, f"cam-{i}") for i in range(2)}
    first = start_rollout(
        service, key, SHA["1"], "1", canary_share=0.5, window_seconds=30, silence_seconds=25
    )
    healthy_window(service, edge, clock, cams, 30, seq=1)

    second = start_rollout(
        service, key, SHA["2"], "2", canary_share=0.5, window_seconds=30, silence_seconds=25
    )
    assert second["canaries"] == ["cam-0"]
    post_status(service, "cam-0", cams["cam-0"], 10, ok=True, rollout_id=second["id"])
    cams["cam-2"] = enrol(
        service, key, "cam-2"
    )  # during the canary stage: the fleet's model, not the canary's
    assert desired_version(service, cams["cam-2"]) == "1"
    healthy_window(service, edge, clock, cams, 30, seq=20)
    done = rollout_view(service, key, second["id"])
    assert done["state"] == "completed" and done["rest"] == ["cam-1", "cam-2"]
    assert [desired_version(service, c) for c in cams.values()] == ["2", "2", "2"]

    # cam-2 cannot run version 2 (reported after the rollout completed): it alone goes back to version 1.
    post_status(service, "cam-2", cams["cam-2"], 40, ok=False, error="too big", rollout_id=second["id"])
    assert [desired_version(service, c) for c in cams.values()] == ["2", "2", "1"]
    cams["cam-3"] = enrol(service, key, "cam-3")  # after it completed: the completed model
    assert desired_version(service, cams["cam-3"]) == "2"

    history = rollout_view(service, key, second["id"])["history"]
    steps = [(h["event"], h["detail"].get("device")) for h in history]
    assert steps == [
        ("canaries", None),
        ("installed", "cam-0"),
        ("joined", "cam-2"),
        ("completed", None),
        ("failed", "cam-2"),
        ("device_rolled_back", "cam-2"),
        ("joined", "cam-3"),
    ]
    assert history[0]["detail"]["devices"] == ["cam-0"]
    assert history[3]["detail"]["devices"] == ["cam-1", "cam-2"]
    assert history[5]["detail"]["to"] == "1"

    third = start_rollout(
        service, key, SHA["3"], "3", canary_share=1.0, window_seconds=30, silence_seconds=25
    )
    assert [desired_version(service, c) for c in cams.values()] == ["3", "3", "3", "3"]
    post_status(service, "cam-3", cams["cam-3"], 50, ok=False, error="crash", rollout_id=third["id"])
    edge.tick()
    rolled = rollout_view(service, key, third["id"])
    assert rolled["history"][-1]["detail"]["devices"] == {
        "cam-0": "2",
        "cam-1": "2",
        "cam-2": "1",
        "cam-3": "2",
    }
    assert [desired_version(service, c) for c in cams.values()] == ["2", "2", "1", "2"]
    assert rollout_view(service, key, first["id"])["state"] == "completed"


def test_a_first_rollout_that_fails_sends_its_canaries_back_to_their_factory_model(acme):
    """No rollout ever completed, so no device has a good model to go back to: the rollback is explicit, a new
    desired state with no model (the agent stops the failed model and runs its own) and the history says so."""
    service, clock, key, edge = acme
    cams = {f"cam-{i}": enrol(service, key, f"cam-{i}") for i in range(3)}
    before = service.client.get("/v1/edge/desired", headers=auth(cams["cam-0"])).json()["revision"]
    first = start_rollout(
        service, key, SHA["1"], "1", canary_share=0.5, window_seconds=30, silence_seconds=25
    )
    assert first["canaries"] == ["cam-0", "cam-1"] and desired_version(service, cams["cam-0"]) == "1"
    post_status(service, "cam-0", cams["cam-0"], 1, ok=True, rollout_id=first["id"])  # installed, then:
    post_status(service, "cam-1", cams["cam-1"], 1, ok=False, error="crash", rollout_id=first["id"])
    edge.tick()

    rolled = rollout_view(service, key, first["id"])
    assert rolled["state"] == "rolled_back" and "cam-1" in rolled["reason"]
    last = rolled["history"][-1]
    assert last["event"] == "rolled_back"
    assert last["detail"]["devices"] == {"cam-0": "factory", "cam-1": "factory"}
    assert last["detail"]["factory"] == ["cam-0", "cam-1"]
    for name in ("cam-0", "cam-1"):
        desired = service.client.get("/v1/edge/desired", headers=auth(cams[name])).json()
        assert desired["model"] is None and desired["rollout_id"] is None
        assert desired["revision"] == before + 2  # the rollout's, then the rollback's: the device acts on it
    untouched = service.client.get("/v1/edge/desired", headers=auth(cams["cam-2"])).json()
    assert untouched["revision"] == before and untouched["model"] is None
