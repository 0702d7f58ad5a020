"""Results name their model by a short id (`mid`, a sha256 prefix); the service stores each with the full model
reference the device reported, so the bytes per result drop and every stored result still says its model."""

from __future__ import annotations

import pytest

from cumulo.contracts.edge import Envelope, ModelRef, model_id, parse_envelope
from cumulo.errors import InvalidRequest
from tests.service.support import auth
from tests.service.test_edge import enrol, envelope, fleet  # noqa: F401  (fleet is a fixture)

SHA = "c0ffee" + "1" * 58
MODEL = {"name": "shelf", "version": "3", "sha256": SHA}


def _stored(service, key: str) -> list[dict]:
    return service.client.get("/v1/edge/results", params={"device": "cam-m"}, headers=auth(key)).json()[
        "data"
    ]


def test_a_result_with_a_model_id_is_stored_with_the_reported_model(fleet):  # noqa: F811
    service, _ = fleet
    key = service.key("acme")
    credential = enrol(service, key, "cam-m")
    early = {**envelope("cam-m", credential, 1), "model": None, "mid": model_id(SHA)}
    assert service.client.post("/v1/edge/results", json=early, headers=auth(credential)).status_code == 200
    reported = {**envelope("cam-m", credential, 1, "reported", state="running"), "model": MODEL}
    answer = service.client.post("/v1/edge/reported", json=[reported], headers=auth(credential))
    assert answer.status_code == 204, answer.text
    later = {**envelope("cam-m", credential, 2), "mid": model_id(SHA)}
    del later["model"]
    old_style = {**envelope("cam-m", credential, 3), "model": {**MODEL, "version": "2", "sha256": "d" * 64}}
    posted = service.client.post("/v1/edge/results", json=[later, old_style], headers=auth(credential))
    assert [a["status"] for a in posted.json()["acks"]] == ["stored", "stored"]
    resent = service.client.post("/v1/edge/results", json=later, headers=auth(credential))
    assert resent.json()["acks"][0]["status"] == "duplicate"  # dedup by (device, seq) as before

    models = [r["model"] for r in _stored(service, key)]
    assert models == [{"mid": "c0ffee111111"}, MODEL, {**MODEL, "version": "2", "sha256": "d" * 64}]


def test_a_result_envelope_leaves_out_empty_fields_and_checks_its_model_id() -> None:
    result = Envelope(device_id="cam-1", seq=7, time="2026-01-01T00:00:00Z", kind="count", mid=model_id(SHA),
                      body={"count": 3}, auth="x" * 43)  # fmt: skip
    wire = result.to_bytes()
    assert b'"model"' not in wire and b'"mid":"c0ffee111111"' in wire
    assert parse_envelope(wire) == result
    full = result.model_copy(update={"mid": None, "model": ModelRef(**MODEL)}).to_bytes()
    assert len(full) - len(wire) > 90  # the full reference is what the short id saves
    with pytest.raises(InvalidRequest, match="mid"):
        parse_envelope({**result.wire(), "mid": "not-hex"})
