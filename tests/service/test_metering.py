"""Metering: disconnects abort and bill what was generated, dead gateways' requests get settled, prices apply
per model, an Idempotency-Key in flight is not run twice."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
from sqlalchemy import select

from cumulo.service import limits, metering
from cumulo.service.db import ApiKey, Usage
from tests.service.fakes import FakeEngine
from tests.service.support import auth


def _scope(path: str, key: str) -> dict:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("127.0.0.1", 5000),
        "server": ("test", 80),
        "headers": [
            (b"host", b"test"),
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {key}".encode()),
        ],
    }


def test_disconnect_mid_stream_aborts_the_engine_and_bills_what_was_generated(make_service):
    engine = FakeEngine(delay=0.01)
    service = make_service(engines={"fake-model": engine})
    key = service.key()
    body = json.dumps({"model": "fake-model", "prompt": "x", "max_tokens": 100, "stream": True}).encode()
    chunks: list[bytes] = []

    async def scenario() -> None:
        gone = asyncio.Event()
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                chunks.append(message["body"])
                if len(chunks) == 3:
                    gone.set()

        await service.client.app(_scope("/v1/completions", key), receive, send)

    asyncio.run(scenario())
    assert len(engine.aborted) == 1 and engine.active == 0
    with service.state.sessions() as session:
        row = session.scalars(select(Usage)).one()
        month_tokens = session.scalars(select(ApiKey)).one().month_tokens
    assert row.status == "aborted"
    assert 3 <= row.completion_tokens < 100
    assert month_tokens == row.prompt_tokens + row.completion_tokens  # the reservation was refunded


def test_requests_of_a_dead_gateway_are_settled_as_interrupted_at_start(make_service):
    service = make_service()
    key = service.key()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with service.state.sessions() as session:
        key_id = session.scalars(select(ApiKey.id)).one()
    spec = limits.RequestSpec(
        request_id="cmpl-lost",
        endpoint="completions",
        model="fake-model",
        seal="s",
        device="cpu",
        gateway=f"{metering.gateway_id(0).split(':')[0]}:{dead.pid}:0",
        prompt_tokens=7,
        num_seqs=1,
        max_tokens=50,
    )
    limits.admit(service.state.db, key_id, spec)
    assert metering.settle_interrupted(service.state.db, stale_after=3600) == 1
    with service.state.sessions() as session:
        row = session.scalars(select(Usage)).one()
        assert (row.status, row.prompt_tokens, row.completion_tokens) == ("interrupted", 7, 0)
        assert session.scalars(select(ApiKey)).one().month_tokens == 7
    usage = service.client.get("/v1/usage", headers=auth(key)).json()
    assert usage["data"][0]["status"] == "interrupted"


def test_a_live_gateways_requests_are_left_running(make_service):
    service = make_service()
    service.key()
    with service.state.sessions() as session:
        key_id = session.scalars(select(ApiKey.id)).one()
    spec = limits.RequestSpec(
        request_id="cmpl-running",
        endpoint="completions",
        model="fake-model",
        seal="s",
        device="cpu",
        gateway=service.state.gateway,
        prompt_tokens=1,
        num_seqs=1,
        max_tokens=5,
    )
    limits.admit(service.state.db, key_id, spec)
    assert metering.settle_interrupted(service.state.db, stale_after=3600) == 0
    assert metering.settle_interrupted(service.state.db, stale_after=3600, now=time.time() + 7200) == 1


def test_per_model_price_overrides_the_plan_price(make_service):
    service = make_service()
    key = service.key(plan="mixed", price_in=1.0, price_out=1.0, model_prices={"fake-model": [10.0, 20.0]})
    r = service.client.post(
        "/v1/completions", headers=auth(key), json={"model": "fake-model", "prompt": "x", "max_tokens": 3}
    )
    assert r.status_code == 200
    row = service.client.get("/v1/usage", headers=auth(key)).json()["data"][0]
    assert row["cost"] == (2 * 10.0 + 3 * 20.0) / 1e6


def test_idempotency_key_in_flight_is_refused_not_run_twice(make_service):
    engine = FakeEngine(delay=0.02)
    service = make_service(engines={"fake-model": engine})
    key = service.key()
    headers = {**auth(key), "Idempotency-Key": "same"}
    body = {"model": "fake-model", "prompt": "x", "max_tokens": 15}

    async def twice() -> list[int]:
        transport = httpx.ASGITransport(app=service.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            first = asyncio.create_task(client.post("/v1/completions", headers=headers, json=body))
            while engine.active == 0:
                await asyncio.sleep(0.005)
            second = await client.post("/v1/completions", headers=headers, json=body)
            return [(await first).status_code, second.status_code]

    assert asyncio.run(twice()) == [200, 409]
    assert len(engine.started) == 1
