"""A device's class (a chip id, what the rollouts API checks a package against): given when the device is made,
replaced by the one its reported state names, refused when it is not a plain id."""

from __future__ import annotations

from tests.service.support import auth
from tests.service.test_edge import envelope, fleet  # noqa: F401  (fleet is a fixture)


def test_a_device_class_is_stored_at_creation_and_updated_by_reported_state(fleet):  # noqa: F811
    service, _ = fleet
    key = service.key("acme")
    bad = service.client.post("/v1/edge/devices", json={"device_id": "cam-b", "device_class": "IMX/500"},
                              headers=auth(key))  # fmt: skip
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    made = service.client.post("/v1/edge/devices", json={"device_id": "cam-c", "device_class": "imx500"},
                               headers=auth(key))  # fmt: skip
    assert made.status_code == 201 and made.json()["device_class"] == "imx500"
    token = made.json()["enrollment_token"]
    credential = service.client.post("/v1/edge/enroll", json={"token": token}).json()["credential"]
    for named in ("rpi5", "not a chip/id"):  # the second is ignored: the class stays rpi5
        reported = envelope("cam-c", credential, 1, "reported", state="running", device_class=named)
        assert (
            service.client.post("/v1/edge/reported", json=[reported], headers=auth(credential)).status_code
            == 204
        )
        device = service.client.get("/v1/edge/devices/cam-c", headers=auth(key)).json()
        assert device["device_class"] == "rpi5"


def test_a_heartbeat_names_the_class_too_and_a_result_cannot(fleet):  # noqa: F811
    service, _ = fleet
    key = service.key("acme")
    made = service.client.post("/v1/edge/devices", json={"device_id": "cam-h"}, headers=auth(key)).json()
    assert made["device_class"] is None
    credential = service.client.post("/v1/edge/enroll", json={"token": made["enrollment_token"]}).json()[
        "credential"
    ]

    def send(leaf: str, message: dict) -> str | None:
        assert (
            service.client.post(f"/v1/edge/{leaf}", json=[message], headers=auth(credential)).status_code
            < 300
        )
        return service.client.get("/v1/edge/devices/cam-h", headers=auth(key)).json()["device_class"]

    assert (
        send("heartbeat", envelope("cam-h", credential, 1, "heartbeat", uptime_s=1.0, device_class="imx500"))
        == "imx500"
    )
    assert (
        send("results", envelope("cam-h", credential, 2, "count", count=1, device_class="rpi5")) == "imx500"
    )
    assert send("heartbeat", envelope("cam-h", credential, 2, "heartbeat", uptime_s=2.0)) == "imx500"  # kept
