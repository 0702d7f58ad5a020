"""Stored deployments: what an operator deploys is kept whole, undeploys stay visible to pollers, every change
moves the generation, bad specs are refused with a clear message; and the same through /admin/deployments."""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest

from cumulo.errors import ChipNotFound, InvalidRequest, NotFound
from cumulo.service import deployments
from cumulo.service.db import open_database, session_factory
from cumulo.service.migrate import upgrade
from tests.service.support import auth


@pytest.fixture
def sessions(database_url):
    database = open_database(database_url)
    upgrade(database)
    yield session_factory(database)
    database.dispose()


def _write(sessions, wanted, check=None):
    with sessions() as session, session.begin():
        row, created = deployments.create_or_update(session, wanted, check)
        return deployments.as_dict(row), created


def _generation(sessions):
    with sessions() as session:
        return deployments.current_generation(session)


# -- crud, on SQLite and PostgreSQL ------------------------------------------------------------------------
def test_a_deployment_round_trips_and_a_redeploy_replaces_it_whole(sessions):
    assert _generation(sessions) == 0
    first, created = _write(
        sessions, deployments.spec("m", "smollm2-135m", replicas=2, chip="h100-sxm", ttft_slo_ms=500)
    )
    assert created and first["generation"] == 1 and first["state"] == "active"
    assert (first["replicas"], first["min_replicas"], first["max_replicas"]) == (2, 2, 2)
    second, created = _write(sessions, deployments.spec("m", "smollm2-135m", min_replicas=1, max_replicas=4))
    assert not created and second["generation"] == 2 and second["created_at"] == first["created_at"]
    with sessions() as session:
        row = deployments.get(session, "m")
    # The whole deployment is what the second call said: the chip and SLO it left out are gone.
    assert (row.replicas, row.min_replicas, row.max_replicas, row.chip, row.ttft_slo_ms) == (
        1,
        1,
        4,
        None,
        None,
    )


def test_deploying_the_same_spec_again_changes_nothing(sessions):
    wanted = deployments.spec("m", replicas=3, tpot_slo_ms=40.0)
    first, _ = _write(sessions, wanted)
    again, created = _write(sessions, wanted)
    assert not created and again == first and _generation(sessions) == 1


def test_undeploy_stays_visible_to_pollers_and_a_redeploy_creates_it_again(sessions):
    _write(sessions, deployments.spec("a"))
    _write(sessions, deployments.spec("b"))
    seen = _generation(sessions)
    with sessions() as session, session.begin():
        deployments.delete(session, "a")
    with sessions() as session:
        assert [r.model for r in deployments.list_deployments(session)] == ["b"]
        changed = deployments.changed_since(session, seen)
        assert [(r.model, r.state, r.generation) for r in changed] == [("a", "deleted", seen + 1)]
        with pytest.raises(NotFound, match="no deployment named 'a'"):
            deployments.get(session, "a")
    with sessions() as session, session.begin(), pytest.raises(NotFound):
        deployments.delete(session, "a")
    again, created = _write(sessions, deployments.spec("a", replicas=2))
    assert created and again["state"] == "active" and again["generation"] == seen + 2


def test_concurrent_writers_never_share_a_generation(sessions):
    errors: list[BaseException] = []

    def deploy(i: int) -> None:
        try:
            _write(sessions, deployments.spec(f"m{i}", replicas=1 + i % 3))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=deploy, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with sessions() as session:
        generations = sorted(r.generation for r in deployments.list_deployments(session))
    assert generations == list(range(1, 9))


def test_a_check_canonicalizes_names_and_refuses_unknown_ones(sessions):
    def check(wanted):
        if wanted.chip not in (None, "H100-SXM"):
            raise ChipNotFound(f"unknown chip {wanted.chip!r}")
        return replace(wanted, chip=wanted.chip and wanted.chip.lower())

    row, _ = _write(sessions, deployments.spec("m", chip="H100-SXM"), check)
    assert row["chip"] == "h100-sxm"
    with pytest.raises(ChipNotFound):
        _write(sessions, deployments.spec("n", chip="tpu-v9"), check)
    with sessions() as session:
        assert [r.model for r in deployments.list_deployments(session)] == ["m"]


# -- validation --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"replicas": 0}, "replicas must be between 1 and"),
        ({"replicas": 2, "min_replicas": 1, "max_replicas": 3}, "either replicas or min_replicas"),
        ({"min_replicas": 1}, "go together"),
        ({"max_replicas": 2}, "go together"),
        ({"min_replicas": 3, "max_replicas": 2}, "1 <= min_replicas <= max_replicas"),
        ({"min_replicas": 0, "max_replicas": 2}, "1 <= min_replicas <= max_replicas"),
        ({"replicas": deployments.MAX_REPLICAS + 1}, "replicas must be between 1 and"),
        ({"ttft_slo_ms": 0}, "ttft_slo_ms must be a positive"),
        ({"tpot_slo_ms": -5}, "tpot_slo_ms must be a positive"),
        ({"tpot_slo_ms": float("nan")}, "tpot_slo_ms must be a positive"),
        ({"chip": ""}, "chip must be 1 to"),
        ({"format": "x\n"}, "format must not contain control characters"),
    ],
)
def test_bad_specs_are_refused_with_a_message_naming_the_field(kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        deployments.spec("m", **kwargs)


def test_a_range_starts_at_its_minimum_and_no_count_means_one_replica():
    ranged = deployments.spec("m", min_replicas=2, max_replicas=5)
    assert (ranged.replicas, ranged.min_replicas, ranged.max_replicas) == (2, 2, 5)
    plain = deployments.spec("m")
    assert (plain.source, plain.replicas, plain.min_replicas, plain.max_replicas) == ("m", 1, 1, 1)


# -- the admin API -----------------------------------------------------------------------------------------
def test_admin_deployments_need_an_admin_key(make_service):
    service = make_service()
    tenant = auth(service.key())
    for method, path in (("get", ""), ("get", "/m"), ("delete", "/m")):
        response = service.client.request(method.upper(), f"/admin/deployments{path}", headers=tenant)
        assert response.status_code == 403 and response.json()["error"]["code"] == "permission_denied"
    response = service.client.post("/admin/deployments", json={"model": "m"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_admin_deployments_round_trip(make_service):
    service = make_service()
    admin = auth(service.admin_key())
    body = {
        "model": "org/m",
        "source": "smollm2-135m",
        "min_replicas": 1,
        "max_replicas": 3,
        "ttft_slo_ms": 800,
    }
    created = service.client.post("/admin/deployments", headers=admin, json=body)
    assert created.status_code == 201
    view = created.json()
    assert view["object"] == "deployment" and view["replicas_status"] == []
    assert (view["model"], view["replicas"], view["max_replicas"], view["ttft_slo_ms"]) == (
        "org/m",
        1,
        3,
        800,
    )
    same = service.client.post("/admin/deployments", headers=admin, json=body)
    assert same.status_code == 200 and same.json()["generation"] == view["generation"]
    scaled = service.client.post("/admin/deployments", headers=admin, json={**body, "max_replicas": 5})
    assert scaled.status_code == 200 and scaled.json()["generation"] == view["generation"] + 1

    listing = service.client.get("/admin/deployments", headers=admin).json()
    assert listing["object"] == "list" and [d["model"] for d in listing["data"]] == ["org/m"]
    one = service.client.get("/admin/deployments/org/m", headers=admin)
    assert one.status_code == 200 and one.json()["max_replicas"] == 5

    gone = service.client.delete("/admin/deployments/org/m", headers=admin)
    assert gone.status_code == 200 and gone.json()["state"] == "deleted"
    for response in (
        service.client.get("/admin/deployments/org/m", headers=admin),
        service.client.delete("/admin/deployments/org/m", headers=admin),
    ):
        assert response.status_code == 404
        assert response.json()["error"] == {
            "message": "no deployment named 'org/m'",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    assert service.client.get("/admin/deployments", headers=admin).json()["data"] == []


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m", "replicas": 0}, "replicas must be between 1 and"),
        ({"model": "m", "replicas": 2, "max_replicas": 3}, "either replicas or min_replicas"),
        ({"model": "m", "min_replicas": 4, "max_replicas": 2}, "1 <= min_replicas <= max_replicas"),
        ({"model": "m", "tpot_slo_ms": -1}, "tpot_slo_ms must be a positive"),
        ({"model": "m", "replica": 3}, "replica"),  # a misspelt field is refused, not ignored
        ({"model": "", "replicas": 1}, "model"),
        ({"replicas": 1}, "missing required parameter: model"),
    ],
)
def test_admin_deployments_refuse_bad_bodies_with_400(make_service, body, message):
    service = make_service()
    response = service.client.post("/admin/deployments", headers=auth(service.admin_key()), json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and message in error["message"]
    assert service.client.get("/admin/deployments", headers=auth(service.admin_key())).json()["data"] == []


def test_admin_deployments_use_the_check_and_the_status_provider_from_app_state(make_service):
    service = make_service()
    admin = auth(service.admin_key())
    app = service.client.app

    def check(wanted):
        if wanted.chip != "h20":
            raise ChipNotFound(f"unknown chip {wanted.chip!r}; known: h20")
        return wanted

    app.state.deployment_check = check
    refused = service.client.post("/admin/deployments", headers=admin, json={"model": "m", "chip": "h30"})
    assert refused.status_code == 404 and refused.json()["error"]["code"] == "chip_not_found"
    assert service.client.post(
        "/admin/deployments", headers=admin, json={"model": "m", "chip": "h20"}
    ).is_success

    app.state.deployment_status = lambda model: [{"model": model, "node": "n1", "state": "ready"}]
    listing = service.client.get("/admin/deployments", headers=admin).json()
    assert listing["data"][0]["replicas_status"] == [{"model": "m", "node": "n1", "state": "ready"}]

    def unreachable(model):
        raise ConnectionError("no pool")

    app.state.deployment_status = unreachable
    one = service.client.get("/admin/deployments/m", headers=admin)
    assert one.status_code == 200 and one.json()["replicas_status"] == [] and one.json()["chip"] == "h20"
