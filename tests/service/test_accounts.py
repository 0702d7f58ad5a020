"""Keys, plans, tenants and the admin API: who may call what, and who sees whose usage."""

from __future__ import annotations

import time

from sqlalchemy import select

from cumulo.service import crud
from cumulo.service.db import ApiKey
from tests.service.support import auth

COMPLETION = {"model": "fake-model", "prompt": "x", "max_tokens": 3}


def test_fresh_database_has_the_default_plan(make_service):
    service = make_service()
    with service.state.sessions() as session:
        assert [p.name for p in crud.list_plans(session)] == ["default"]


def test_keys_are_prefixed_and_stored_only_as_a_keyed_hash(make_service):
    service = make_service()
    secret = service.key()
    assert secret.startswith("sk-cumulo-") and len(secret) > 40
    with service.state.sessions() as session:
        stored = session.scalars(select(ApiKey)).one()
    assert secret not in (stored.key_hash, stored.prefix) and stored.key_hash == service.state.hasher.hash(
        secret
    )
    assert stored.key_hash != __import__("hashlib").sha256(secret.encode()).hexdigest()


def test_revoked_and_expired_keys_are_refused(make_service):
    service = make_service()
    secret = service.key()
    assert service.client.post("/v1/completions", headers=auth(secret), json=COMPLETION).status_code == 200
    with service.state.sessions() as session, session.begin():
        crud.revoke_key(session, session.scalars(select(ApiKey)).one().id)
        _, expired = crud.create_key(
            session, service.state.hasher, org_name="acme", expires_at=time.time() - 1
        )
    for key in (secret, expired, "sk-cumulo-made-up", "not-a-key"):
        r = service.client.post("/v1/completions", headers=auth(key), json=COMPLETION)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_plan_restricts_models(make_service):
    service = make_service()
    key = service.key(plan="other-only", models=["other"])
    assert service.client.get("/v1/models", headers=auth(key)).json()["data"] == []
    r = service.client.post("/v1/completions", headers=auth(key), json=COMPLETION)
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


def test_a_key_sees_only_its_own_usage(make_service):
    service = make_service()
    mine, theirs = service.key("acme"), service.key("globex")
    service.client.post("/v1/completions", headers=auth(mine), json=COMPLETION)
    service.client.post("/v1/completions", headers=auth(theirs), json={**COMPLETION, "max_tokens": 5})
    body = service.client.get("/v1/usage", headers=auth(mine)).json()
    assert [row["completion_tokens"] for row in body["data"]] == [3]
    assert body["totals"]["requests"] == 1


def test_usage_is_newest_first_paginated_filterable_and_totalled(make_service):
    service = make_service()
    key = service.key(plan="priced", price_in=1.0, price_out=2.0)
    for tokens in (1, 2, 3, 4, 5):
        service.client.post("/v1/completions", headers=auth(key), json={**COMPLETION, "max_tokens": tokens})
    page = service.client.get("/v1/usage?limit=2", headers=auth(key)).json()
    assert [r["completion_tokens"] for r in page["data"]] == [5, 4] and page["has_more"]
    page2 = service.client.get(f"/v1/usage?limit=2&after={page['last_id']}", headers=auth(key)).json()
    assert [r["completion_tokens"] for r in page2["data"]] == [3, 2]
    totals = page["totals"]
    assert totals["requests"] == 5 and totals["prompt_tokens"] == 10 and totals["completion_tokens"] == 15
    assert totals["cost_nanos"] == 10 * 1000 + 15 * 2000  # USD 1 and 2 per million tokens
    future = service.client.get(f"/v1/usage?start_time={time.time() + 60}", headers=auth(key)).json()
    assert future["data"] == [] and future["totals"]["requests"] == 0


def test_admin_api_manages_plans_keys_and_sees_all_usage(make_service):
    service = make_service()
    admin = auth(service.admin_key())
    r = service.client.post("/admin/plans", headers=admin, json={"name": "pro", "rpm": 100, "price_in": 0.5})
    assert r.status_code == 201 and r.json()["rpm"] == 100
    assert service.client.post("/admin/plans", headers=admin, json={"name": "pro"}).status_code == 409
    created = service.client.post("/admin/keys", headers=admin, json={"org": "initech", "plan": "pro"}).json()
    assert created["key"].startswith("sk-cumulo-")
    assert (
        service.client.post("/v1/completions", headers=auth(created["key"]), json=COMPLETION).status_code
        == 200
    )
    usage = service.client.get("/admin/usage?org=initech", headers=admin).json()
    assert usage["totals"]["requests"] == 1
    assert "key" not in service.client.get("/admin/keys", headers=admin).json()["data"][0]
    revoked = service.client.post(f"/admin/keys/{created['id']}/revoke", headers=admin)
    assert revoked.status_code == 200
    assert (
        service.client.post("/v1/completions", headers=auth(created["key"]), json=COMPLETION).status_code
        == 401
    )
    user_key = service.key()
    assert service.client.get("/admin/plans", headers=auth(user_key)).status_code == 403


def test_plan_with_explicit_label_appends_a_visible_notice(make_service):
    service = make_service()
    key = service.key(plan="labelled", explicit_label=True)
    r = service.client.post(
        "/v1/chat/completions",
        headers=auth(key),
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    content = r.json()["choices"][0]["message"]["content"]
    assert "AI-generated" in content
    label = r.json()["choices"][0]["label"]
    assert service.client.post("/v1/labels/verify", json={"text": content, "label": label}).json()["valid"]
