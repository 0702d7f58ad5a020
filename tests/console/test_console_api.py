"""The console's server side over plain HTTP: the session cookie, CSRF, the security headers, organisation
scoping of /console/api/..., and the static files staying inside their folder."""

from __future__ import annotations

import httpx
import pytest

from cumulo.service.console import sessions


def chat(server, key: str, text: str = "hello") -> dict:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": server.model, "messages": [{"role": "user", "content": text}], "max_tokens": 5},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def signed_client(server, key: str) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=server.url, timeout=30)
    response = client.post("/console/session", json={"api_key": key})
    assert response.status_code == 200, response.text
    return client, response.json()["csrf"]


def test_sign_in_sets_an_httponly_strict_cookie_without_the_key(console_server, org_key):
    key = org_key("api-org")
    response = httpx.post(f"{console_server.url}/console/session", json={"api_key": key})
    cookie = response.headers["set-cookie"]
    assert response.json()["org"] == "api-org" and response.json()["is_admin"] is False
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert key not in cookie and key[len("sk-cumulo-") :] not in cookie


def test_a_wrong_key_or_a_forged_cookie_is_refused_with_openai_json(console_server):
    wrong = httpx.post(f"{console_server.url}/console/session", json={"api_key": "sk-cumulo-nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    forged = httpx.get(
        f"{console_server.url}/console/api/keys", cookies={sessions.COOKIE: "1.9999999999.x.00"}
    )
    assert forged.status_code == 401 and "not valid" in forged.json()["error"]["message"]


def test_a_cross_site_sign_in_is_refused(console_server, org_key):
    response = httpx.post(
        f"{console_server.url}/console/session",
        json={"api_key": org_key("api-org")},
        headers={"Origin": "https://evil.example"},
    )
    assert response.status_code == 403 and "set-cookie" not in response.headers


def test_writes_with_the_cookie_need_the_csrf_header(console_server, org_key):
    client, csrf = signed_client(console_server, org_key("api-org"))
    refused = client.post("/console/api/keys", json={"name": "no-csrf"})
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    wrong = client.post("/console/api/keys", json={"name": "bad"}, headers={"X-CSRF-Token": "0" * 32})
    assert wrong.status_code == 403
    made = client.post("/console/api/keys", json={"name": "with-csrf"}, headers={"X-CSRF-Token": csrf})
    assert made.status_code == 201 and made.json()["key"].startswith("sk-cumulo-")
    names = [k["name"] for k in client.get("/console/api/keys").json()["data"]]
    assert "with-csrf" in names and "no-csrf" not in names and "bad" not in names


def test_the_existing_api_accepts_the_cookie(console_server, org_key):
    client, csrf = signed_client(console_server, org_key("api-org"))
    assert client.get("/v1/models").json()["data"][0]["id"] == console_server.model
    body = {"model": console_server.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert client.post("/v1/chat/completions", json=body).status_code == 403
    answer = client.post("/v1/chat/completions", json=body, headers={"X-CSRF-Token": csrf})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]


def test_revoking_the_key_ends_its_session_at_once(console_server, org_key):
    key = org_key("api-org")
    client, csrf = signed_client(console_server, key)
    me = [k for k in client.get("/console/api/keys").json()["data"] if k["current"]][0]
    revoked = client.post(f"/console/api/keys/{me['id']}/revoke", headers={"X-CSRF-Token": csrf})
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    after = client.get("/console/api/keys")
    assert after.status_code == 401 and "revoked" in after.json()["error"]["message"]
    assert client.get("/console/session").status_code == 401


def test_sign_out_clears_the_cookie(console_server, org_key):
    client, _ = signed_client(console_server, org_key("api-org"))
    assert client.delete("/console/session").json() == {"signed_out": True}
    assert client.get("/console/session").status_code == 401


@pytest.mark.parametrize("via", ["bearer", "cookie"])
def test_one_organisation_cannot_reach_another_by_id(console_server, org_key, via):
    mine, theirs = org_key("org-mine"), org_key("org-theirs")
    chat(console_server, theirs, "their secret prompt")
    their_keys = httpx.get(
        f"{console_server.url}/console/api/keys", headers={"Authorization": f"Bearer {theirs}"}
    ).json()["data"]
    their_id = their_keys[0]["id"]
    if via == "bearer":
        client, headers = httpx.Client(base_url=console_server.url), {"Authorization": f"Bearer {mine}"}
    else:
        client, csrf = signed_client(console_server, mine)
        headers = {"X-CSRF-Token": csrf}
    revoke = client.post(f"/console/api/keys/{their_id}/revoke", headers=headers)
    assert revoke.status_code == 404 and revoke.json()["error"]["message"] == f"no key with id {their_id}"
    assert chat(console_server, theirs)["choices"]  # still works
    log = client.get(f"/console/api/requests?key_id={their_id}", headers=headers).json()
    assert log["data"] == []
    keys = client.get("/console/api/keys", headers=headers).json()["data"]
    assert their_id not in [k["id"] for k in keys] and {k["org"] for k in keys} == {"org-mine"}
    usage = client.get("/console/api/usage", headers=headers).json()
    assert usage["models"] == []  # their requests are not counted in my usage
    assert client.get("/admin/keys", headers=headers).status_code == 403


def test_usage_and_request_log_count_a_request(console_server, org_key):
    key = org_key("counted-org")
    headers = {"Authorization": f"Bearer {key}"}
    before = httpx.get(f"{console_server.url}/console/api/usage", headers=headers).json()
    answer = chat(console_server, key)
    after = httpx.get(f"{console_server.url}/console/api/usage", headers=headers).json()
    tokens = answer["usage"]["prompt_tokens"] + answer["usage"]["completion_tokens"]
    assert after["days"][-1]["tokens"] - before["days"][-1]["tokens"] == tokens
    assert after["tokens_by_model"][console_server.model][-1] >= tokens
    assert after["quota"]["month_tokens_used"] - before["quota"]["month_tokens_used"] == tokens
    log = httpx.get(f"{console_server.url}/console/api/requests?status=completed", headers=headers).json()
    row = log["data"][0]
    assert row["request_id"] == answer["id"]
    assert row["seal"] == answer["system_fingerprint"] and row["seal"].startswith("sha256:")
    assert row["ttft"] is not None and row["total_time"] >= row["ttft"]
    assert row["label_id"] == answer["choices"][0]["label"]["content_id"]
    assert (
        httpx.get(f"{console_server.url}/console/api/requests?status=error", headers=headers).json()["data"]
        == []
    )
    bad = httpx.get(f"{console_server.url}/console/api/requests?status=nope", headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"


def test_static_files_have_the_csp_and_stay_in_their_folder(console_server):
    index = httpx.get(f"{console_server.url}/console/")
    assert index.headers["content-security-policy"].startswith("default-src 'self'; script-src 'self'")
    assert index.headers["x-content-type-options"] == "nosniff" and "<script" in index.text
    assert "<script>" not in index.text and "style=" not in index.text  # no inline script or style
    assert (
        httpx.get(f"{console_server.url}/console/app.js")
        .headers["content-type"]
        .startswith("text/javascript")
    )
    for path in ("../routes.py", "%2e%2e/routes.py", "..%2froutes.py", "sessions.py", "static/../../app.py"):
        assert httpx.get(f"{console_server.url}/console/{path}").status_code == 404, path
    assert httpx.get(f"{console_server.url}/console", follow_redirects=False).status_code == 308
    etag = index.headers["etag"]
    again = httpx.get(f"{console_server.url}/console/", headers={"If-None-Match": etag})
    assert (
        again.status_code == 304
        and again.content == b""
        and "script-src" in again.headers["content-security-policy"]
    )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server_and_url(request, console_server, org_key):
    """(server, its database URL, org_key) on SQLite (the module's gateway) or on a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield console_server, f"sqlite:///{console_server.data_dir / 'cumulo.db'}", org_key
        return
    from tests.service.conftest import fresh_pg_schema
    from tests.service.live import LiveServer

    url = fresh_pg_schema(request.getfixturevalue("pg_database"))
    server = LiveServer(request.getfixturevalue("tmp_path") / "pg", database_url=url).start()

    def make(org: str) -> str:
        response = httpx.post(
            f"{server.url}/admin/keys",
            json={"org": org},
            headers={"Authorization": f"Bearer {server.admin_key()}"},
        )
        return response.raise_for_status().json()["key"]

    yield server, url, make
    server.stop()


def test_usage_puts_each_request_on_its_utc_day(server_and_url):
    """Rows written straight into the gateway's database at both sides of midnight UTC, with costs."""
    import datetime as dt

    from sqlalchemy.orm import Session

    from cumulo.service.db import Usage, open_database

    console_server, url, org_key = server_and_url
    key = org_key("days-org")
    headers = {"Authorization": f"Bearer {key}"}
    me = httpx.get(f"{console_server.url}/console/api/keys", headers=headers).json()["data"][0]
    org_id = httpx.post(f"{console_server.url}/console/session", json={"api_key": key}).json()["org_id"]
    midnight = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    rows = [  # (started_at, model, tokens, cost in nano-dollars, status)
        (midnight - 0.5, "m-a", 10, 1_000, "completed"),  # yesterday, half a second before midnight
        (midnight, "m-a", 20, 2_000, "completed"),  # today, at midnight exactly
        (midnight + 1, "m-b", 40, 4_000, "error"),  # today; failed requests still count what they used
        (midnight + 2, "m-b", 99, 9_000, "rejected"),  # refused before it ran: not usage
        (midnight - 3 * 86400, "m-a", 80, 8_000, "completed"),  # three days ago: outside days=2
    ]
    database = open_database(url)
    with Session(database) as session, session.begin():
        for i, (started, model, tokens, nanos, status) in enumerate(rows):
            session.add(
                Usage(
                    request_id=f"days-{i}", key_id=me["id"], org_id=org_id, endpoint="chat", model=model,
                    month="", status=status, prompt_tokens=tokens, completion_tokens=0, cost_nanos=nanos,
                    started_at=started,
                )
            )  # fmt: skip
    database.dispose()
    two = httpx.get(f"{console_server.url}/console/api/usage?days=2", headers=headers).json()
    assert [(d["requests"], d["tokens"]) for d in two["days"]] == [(1, 10), (2, 60)]
    assert [round(d["cost"] * 1e9) for d in two["days"]] == [1_000, 6_000]
    assert two["tokens_by_model"] == {"m-a": [10, 20], "m-b": [0, 40]}
    assert [(m["model"], m["requests"], m["tokens"]) for m in two["models"]] == [
        ("m-b", 1, 40),
        ("m-a", 2, 30),
    ]
    one = httpx.get(f"{console_server.url}/console/api/usage?days=1", headers=headers).json()
    assert [(d["requests"], d["tokens"]) for d in one["days"]] == [(2, 60)]
    five = httpx.get(f"{console_server.url}/console/api/usage?days=5", headers=headers).json()
    assert [d["tokens"] for d in five["days"]] == [0, 80, 0, 10, 60]


def test_a_cookie_copied_before_sign_out_is_refused_after_it(server_and_url):
    server, _, make_key = server_and_url
    client, _ = signed_client(server, make_key("signout-org"))
    copied = client.cookies[sessions.COOKIE]
    other, _ = signed_client(server, make_key("signout-org"))  # another session, not signed out
    assert client.delete("/console/session").json() == {"signed_out": True}
    for path in ("/console/session", "/console/api/keys", "/v1/models"):
        answer = httpx.get(f"{server.url}{path}", cookies={sessions.COOKIE: copied})
        assert answer.status_code == 401, path
        assert answer.json()["error"]["message"] == "console session has ended (signed out); sign in again"
    assert other.get("/console/api/keys").status_code == 200


def test_the_admin_revoke_refuses_the_key_at_once_on_this_gateway(console_server, org_key, admin_key):
    key = org_key("admin-revoke-org")
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{console_server.url}/v1/models", headers=headers).status_code == 200  # now cached
    key_id = httpx.get(f"{console_server.url}/console/api/keys", headers=headers).json()["data"][0]["id"]
    revoked = httpx.post(
        f"{console_server.url}/admin/keys/{key_id}/revoke", headers={"Authorization": f"Bearer {admin_key}"}
    )
    assert revoked.status_code == 200 and revoked.json()["id"] == key_id
    after = httpx.get(f"{console_server.url}/v1/models", headers=headers)
    assert after.status_code == 401 and "revoked" in after.json()["error"]["message"]
