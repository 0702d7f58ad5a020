"""Rate limits, concurrency, monthly quota and idempotency: refused with the right error, billed exactly once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select

from cumulo.errors import QuotaExceeded, RateLimited
from cumulo.service import limits, metering
from cumulo.service.db import ApiKey, Usage
from tests.service.fakes import FakeEngine
from tests.service.support import auth

COMPLETION = {"model": "fake-model", "prompt": "x", "max_tokens": 3}  # 2 prompt tokens (BOS + "x")


def test_requests_per_minute_answer_429_with_retry_after(make_service):
    service = make_service()
    key = service.key(plan="slow", rpm=2)
    codes = [
        service.client.post("/v1/completions", headers=auth(key), json=COMPLETION).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 429]
    r = service.client.post("/v1/completions", headers=auth(key), json=COMPLETION)
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and int(r.headers["Retry-After"]) >= 1


def test_tokens_per_minute_cut_max_tokens_then_refuse(make_service):
    service = make_service()
    key = service.key(plan="tpm", tpm=12)
    first = service.client.post("/v1/completions", headers=auth(key), json={**COMPLETION, "max_tokens": 8})
    assert first.json()["usage"]["total_tokens"] == 10
    second = service.client.post("/v1/completions", headers=auth(key), json={**COMPLETION, "max_tokens": 8})
    assert second.status_code == 429 and second.json()["error"]["code"] == "rate_limit_exceeded"


def test_monthly_quota_is_never_exceeded(make_service):
    service = make_service()
    key = service.key(plan="small", monthly_tokens=11)
    first = service.client.post("/v1/completions", headers=auth(key), json=COMPLETION)  # 2 + 3 = 5
    cut = service.client.post("/v1/completions", headers=auth(key), json={**COMPLETION, "max_tokens": 50})
    assert (
        cut.json()["usage"]["completion_tokens"] == 4
        and cut.json()["choices"][0]["finish_reason"] == "length"
    )
    refused = service.client.post("/v1/completions", headers=auth(key), json=COMPLETION)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "insufficient_quota"
    assert first.json()["usage"]["total_tokens"] + cut.json()["usage"]["total_tokens"] == 11
    with service.state.sessions() as session:
        assert session.scalars(select(ApiKey)).one().month_tokens == 11


def test_concurrency_limit_refuses_the_extra_request_and_frees_the_slot(make_service):
    engine = FakeEngine(delay=0.02)
    service = make_service(engines={"fake-model": engine})
    key = service.key(plan="one-at-a-time", concurrency=1)

    async def both() -> list[int]:
        transport = httpx.ASGITransport(app=service.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            slow = asyncio.create_task(
                client.post("/v1/completions", headers=auth(key), json={**COMPLETION, "max_tokens": 20})
            )
            while engine.active == 0:
                await asyncio.sleep(0.005)
            fast = await client.post("/v1/completions", headers=auth(key), json=COMPLETION)
            return [(await slow).status_code, fast.status_code]

    assert asyncio.run(both()) == [200, 429]
    assert service.client.post("/v1/completions", headers=auth(key), json=COMPLETION).status_code == 200


def test_idempotency_key_replays_without_billing_twice(make_service):
    service = make_service()
    key = service.key()
    headers = {**auth(key), "Idempotency-Key": "order-42"}
    first = service.client.post("/v1/completions", headers=headers, json=COMPLETION)
    again = service.client.post("/v1/completions", headers=headers, json=COMPLETION)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    with service.client.stream(
        "POST", "/v1/completions", headers=headers, json={**COMPLETION, "stream": True}
    ) as r:
        replayed = "".join(r.iter_text())
    assert first.json()["choices"][0]["text"] in replayed and replayed.rstrip().endswith("[DONE]")
    usage = service.client.get("/v1/usage", headers=auth(key)).json()
    assert usage["totals"]["requests"] == 1


def test_every_request_leaves_one_settled_usage_row(make_service):
    service = make_service()
    key = service.key(plan="two", rpm=2)
    for _ in range(3):
        service.client.post("/v1/completions", headers=auth(key), json=COMPLETION)
    with service.state.sessions() as session:
        rows = list(session.scalars(select(Usage).order_by(Usage.id)))
    assert [r.status for r in rows] == ["completed", "completed", "rejected"]
    assert all(r.seal and r.device == "cpu" and r.total_time is not None for r in rows[:2])
    assert rows[2].error_code == "rate_limit_exceeded"


def _spec(n: int, max_tokens: int = 3) -> limits.RequestSpec:
    return limits.RequestSpec(
        request_id=f"r-{n}",
        endpoint="completions",
        model="fake-model",
        seal="s",
        device="cpu",
        gateway="test",
        prompt_tokens=2,
        num_seqs=1,
        max_tokens=max_tokens,
    )


def test_the_rpm_window_slides_and_the_month_rolls_over(make_service):
    service = make_service()
    service.key(plan="tiny", rpm=1, monthly_tokens=5)
    with service.state.sessions() as session:
        key_id = session.scalars(select(ApiKey.id)).one()
    july = datetime(2026, 7, 31, 23, 58, 0, tzinfo=UTC).timestamp()
    db = service.state.db
    first = limits.admit(db, key_id, _spec(1), now=july)
    assert first.max_tokens == 3
    with pytest.raises(RateLimited) as refused:
        limits.admit(db, key_id, _spec(2), now=july + 30)
    assert refused.value.retry_after == 30
    metering.settle(db, first, metering.Outcome("completed", 2, 3), now=july + 1)
    with pytest.raises(QuotaExceeded):  # 5 of 5 tokens used in July, and the window has moved on
        limits.admit(db, key_id, _spec(3), now=july + 61)
    august = limits.admit(db, key_id, _spec(4), now=july + 121)  # 00:00:01 in August: a new month
    assert august.month == "2026-08" and august.max_tokens == 3
