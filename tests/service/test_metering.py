"""Metering: disconnects abort and bill what was generated, streams checkpoint what they delivered, dead
gateways' requests get settled with it (here or on another host, by heartbeat), prices apply per model, an
Idempotency-Key in flight is not run twice."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
from sqlalchemy import select, text

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


def _key_id(service) -> int:  # noqa: ANN001
    with service.state.sessions() as session:
        return session.scalars(select(ApiKey.id)).one()


def _admit(service, gateway: str, request_id: str, prompt: int = 5, max_tokens: int = 100, **kw):  # noqa: ANN001, ANN201
    spec = limits.RequestSpec(
        request_id=request_id,
        endpoint="completions",
        model="fake-model",
        seal="s",
        device="cpu",
        gateway=gateway,
        prompt_tokens=prompt,
        num_seqs=1,
        max_tokens=max_tokens,
    )
    return limits.admit(service.state.db, _key_id(service), spec, **kw)


def _age_heartbeat(service, gateway: str, seconds: float) -> None:  # noqa: ANN001
    with service.state.db.begin() as conn:
        conn.execute(
            text("UPDATE gateways SET last_seen = last_seen - :s WHERE id = :g"), {"s": seconds, "g": gateway}
        )


def _gateways(service) -> set[str]:  # noqa: ANN001
    with service.state.db.connect() as conn:
        return {r[0] for r in conn.execute(text("SELECT id FROM gateways"))}


def test_a_live_gateways_requests_are_left_running_however_old(make_service):
    service = make_service()
    service.key()
    _admit(service, service.state.gateway, "cmpl-running", now=time.time() - 7200)
    assert metering.settle_interrupted(service.state.db, stale_after=3600) == 0  # its heartbeat is fresh
    assert metering.settle_interrupted(service.state.db, stale_after=3600, now=time.time() + 7200) == 1


def test_a_gateway_on_another_host_is_dead_once_its_heartbeat_is_stale_and_its_delivered_tokens_are_billed(
    make_service,
):
    service = make_service()
    service.key(plan="paid", price_in=1.0, price_out=2.0)
    elsewhere = "other-host/1:4242:0"  # its pid means nothing here: only the heartbeat tells
    admitted = _admit(service, elsewhere, "cmpl-elsewhere", prompt=5, max_tokens=100)
    metering.beat(service.state.db, elsewhere, {admitted.usage_id: 40})
    assert metering.settle_interrupted(service.state.db, stale_after=3600, heartbeat_stale=30) == 0
    with service.state.sessions() as session:
        row = session.scalars(select(Usage)).one()
        assert (row.status, row.completion_tokens, row.billed_tokens) == ("in_progress", 40, 105)
    _age_heartbeat(service, elsewhere, 31)
    assert metering.settle_interrupted(service.state.db, stale_after=3600, heartbeat_stale=30) == 1
    assert metering.settle_interrupted(service.state.db, stale_after=3600, heartbeat_stale=30) == 0
    metering.beat(service.state.db, elsewhere, {admitted.usage_id: 99})  # a late checkpoint changes nothing
    with service.state.sessions() as session:
        row = session.scalars(select(Usage)).one()
        month_tokens = session.scalars(select(ApiKey)).one().month_tokens
    assert (row.status, row.error_code) == ("interrupted", "gateway_lost")
    assert (row.prompt_tokens, row.completion_tokens, row.billed_tokens) == (5, 40, 45)
    assert row.cost_nanos == metering.cost_nanos(1.0, 2.0, 5, 40)
    assert month_tokens == 45  # the quota agrees with the ledger: the unused reservation came back


def test_a_dead_gateways_heartbeat_row_goes_once_its_rows_are_settled(make_service):
    service = make_service()
    service.key()
    gone = "other-host/1:7:0"
    _admit(service, gone, "cmpl-gone")
    metering.beat(service.state.db, gone, {})
    _age_heartbeat(service, gone, 100)
    assert _gateways(service) == {service.state.gateway, gone}
    assert metering.settle_interrupted(service.state.db, stale_after=3600, heartbeat_stale=30) == 1
    assert _gateways(service) == {service.state.gateway}


def test_rows_of_a_gateway_without_heartbeat_wait_for_the_request_time_limit(make_service):
    service = make_service()
    service.key()
    _admit(service, "old-host:99:0", "cmpl-old-version")
    assert metering.settle_interrupted(service.state.db, stale_after=3600) == 0
    assert metering.settle_interrupted(service.state.db, stale_after=3600, now=time.time() + 7200) == 1


def test_a_stream_checkpoints_the_tokens_it_delivered(make_service):
    engine = FakeEngine(delay=0.005)
    # No periodic write here: the test writes the checkpoint itself, at a known point of the stream.
    service = make_service(
        engines={"fake-model": engine}, checkpoint_seconds=1000.0, gateway_stale_seconds=2000.0
    )
    key = service.key()
    body = json.dumps({"model": "fake-model", "prompt": "x", "max_tokens": 100, "stream": True}).encode()
    received: list[str] = []
    seen: list[tuple[str, int]] = []

    async def scenario() -> None:
        gone = asyncio.Event()
        asked = False

        async def receive() -> dict:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] != "http.response.body" or not message.get("body"):
                return
            for line in message["body"].decode().splitlines():
                if line.startswith("data: {"):
                    received.append(json.loads(line[6:])["choices"][0]["text"])
            if len(received) == 21 and not gone.is_set():
                # 20 chunks went out before this one (which is not sent until this returns).
                await service.state.write_checkpoints()
                with service.state.db.connect() as conn:
                    seen.append(
                        tuple(conn.execute(text("SELECT status, completion_tokens FROM usage")).one())
                    )
                gone.set()

        await service.client.app(_scope("/v1/completions", key), receive, send)

    asyncio.run(scenario())
    assert seen == [("in_progress", 20)]
    assert all(len(t) == 1 for t in received[:21])  # one token per chunk from the fake engine
    with service.state.sessions() as session:
        row = session.scalars(select(Usage)).one()
    assert row.status == "aborted" and row.completion_tokens >= 21  # settled with the final count
    assert service.state.checkpoints.delivered == {}  # a settled request is no longer checkpointed


def test_a_whole_response_has_no_checkpoint_before_its_settlement(make_service):
    engine = FakeEngine(delay=0.002)
    service = make_service(engines={"fake-model": engine})
    key = service.key()
    r = service.client.post(
        "/v1/completions", headers=auth(key), json={"model": "fake-model", "prompt": "x", "max_tokens": 30}
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 30
    assert service.state.checkpoints.delivered == {} and service.state.checkpoints.written == {}


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
