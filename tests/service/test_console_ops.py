"""The console's operator JSON (service/console/ops.py): an organisation's newest edge results and each device's
last one, never another organisation's; nodes and engines with their health, and chip predictions, for admins
only, from the providers `cumulo serve` injects (or an empty list that says why without them)."""

from __future__ import annotations

from cumulo.errors import InvalidRequest
from cumulo.service.console.ops import ChipQuery
from tests.service.fakes import FakeEngine
from tests.service.support import auth
from tests.service.test_edge import enrol, envelope


def test_recent_edge_results_are_the_callers_newest_and_each_devices_last(make_service):
    service = make_service()
    acme, globex = service.key("acme"), service.key("globex")
    cam = enrol(service, acme, "cam-1")
    door = enrol(service, acme, "door-1")
    other = enrol(service, globex, "gx-1")
    sent = [envelope("cam-1", cam, seq) for seq in (1, 2, 3)] + [envelope("door-1", door, 1)]
    for item in sent:
        credential = item["auth"]
        assert service.client.post("/v1/edge/results", json=item, headers=auth(credential)).status_code == 200
    posted = service.client.post("/v1/edge/results", json=envelope("gx-1", other, 9), headers=auth(other))
    assert posted.status_code == 200

    answer = service.client.get("/console/api/edge/recent", params={"limit": 3}, headers=auth(acme)).json()
    assert [(r["device_id"], r["seq"]) for r in answer["data"]] == [("door-1", 1), ("cam-1", 3), ("cam-1", 2)]
    assert {d: r["seq"] for d, r in answer["last_by_device"].items()} == {"cam-1": 3, "door-1": 1}
    theirs = service.client.get("/console/api/edge/recent", headers=auth(globex)).json()
    assert [r["device_id"] for r in theirs["data"]] == ["gx-1"] and list(theirs["last_by_device"]) == ["gx-1"]


def test_nodes_and_chips_need_an_admin_key(make_service):
    service = make_service()
    developer = service.key("acme")
    for path in ("/console/api/ops/nodes", "/console/api/ops/chips"):
        answer = service.client.get(path, headers=auth(developer))
        assert answer.status_code == 403
        assert answer.json()["error"]["message"] == "this endpoint needs an admin key"


def test_nodes_list_the_injected_machines_and_every_engine_with_its_health(make_service):
    down = FakeEngine("down-model")
    down.stopped = True
    service = make_service({"fake-model": FakeEngine(), "down-model": down})
    admin = service.admin_key()
    bare = service.client.get("/console/api/ops/nodes", headers=auth(admin)).json()
    assert bare["data"] == [] and "without a view of its nodes" in bare["note"]

    node = {"name": "n1", "alive": True, "kind": "cpu", "chip": "cpu-avx2-2core", "replicas": []}
    service.client.app.state.ops_nodes = lambda: [node]
    answer = service.client.get("/console/api/ops/nodes", headers=auth(admin)).json()
    assert answer["data"] == [node] and answer["note"] == ""
    engines = {e["model"]: e for e in answer["engines"]}
    assert engines["fake-model"]["ok"] is True and engines["fake-model"]["running"] == 0
    assert engines["down-model"]["ok"] is False

    def unreachable() -> list:
        raise ConnectionError("pool head gone")

    service.client.app.state.ops_nodes = unreachable
    answer = service.client.get("/console/api/ops/nodes", headers=auth(admin)).json()
    assert answer["data"] == [] and "pool head gone" in answer["note"] and len(answer["engines"]) == 2


def test_chips_answer_the_providers_predictions_for_the_asked_workload(make_service):
    service = make_service()
    admin = service.admin_key()
    bare = service.client.get("/console/api/ops/chips", headers=auth(admin)).json()
    assert bare["data"] == [] and "without the chip catalog" in bare["note"]

    asked: list[ChipQuery] = []

    def provider(query: ChipQuery) -> dict:
        asked.append(query)
        if query.model != "llama-3.1-8b":
            raise InvalidRequest(f"unknown model {query.model!r}")
        return {
            "data": [{"id": "h100-sxm", "prediction": {"decode_tok_s": 1.0}}],
            "models": [],
            "formats": [],
        }

    service.client.app.state.ops_chips = provider
    params = {"model": "llama-3.1-8b", "format": "fp8", "batch": 4, "context": 512}
    answer = service.client.get("/console/api/ops/chips", params=params, headers=auth(admin)).json()
    assert asked == [ChipQuery("llama-3.1-8b", "fp8", 4, 512)]
    assert answer["data"][0]["id"] == "h100-sxm" and answer["query"] == params
    wrong = service.client.get("/console/api/ops/chips", params={"model": "x"}, headers=auth(admin))
    assert wrong.status_code == 400 and wrong.json()["error"]["message"] == "unknown model 'x'"
    too_big = service.client.get("/console/api/ops/chips", params={"batch": 0}, headers=auth(admin))
    assert too_big.status_code == 400
