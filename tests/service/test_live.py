"""A live gateway process driven over real HTTP: the official `openai` client, bad input, disconnects, many
concurrent clients, kill -9, and two gateways sharing one PostgreSQL database."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.service.conftest import fresh_pg_schema
from tests.service.live import FAKE, MODEL, LiveServer
from tests.service.support import auth


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(
        tmp_path_factory.mktemp("live"), env={"CUMULO_FAKE_DELAY": "0.002", "CUMULO_FAKE_MAX_MODEL_LEN": "64"}
    ).start()
    yield live
    live.stop()


def new_key(server: LiveServer, org: str, plan: str | None = None, **terms: object) -> str:
    admin = auth(server.admin_key())
    if plan and terms:
        r = httpx.post(f"{server.url}/admin/plans", headers=admin, json={"name": plan, **terms})
        assert r.status_code in (201, 409), r.text
    r = httpx.post(f"{server.url}/admin/keys", headers=admin, json={"org": org, "plan": plan or "default"})
    assert r.status_code == 201, r.text
    return r.json()["key"]


def too_long_prompt(server: LiveServer, key: str) -> str:
    """A prompt over the served model's context, whatever the model (one token per ' x' or more)."""
    card = httpx.get(f"{server.url}/v1/models/{MODEL}", headers=auth(key)).json()
    return " x" * (card["max_model_len"] + 8)


def wait_until(predicate, timeout: float = 30.0):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_openai_client_chat_and_completions_streaming_and_not(server: LiveServer):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=new_key(server, "openai-users"))
    assert [m.id for m in client.models.list().data] == [MODEL]
    # Greedy with a seed: the streamed answer must be the same text as the whole one, whatever the model.
    ask = {"model": MODEL, "max_tokens": 6, "temperature": 0, "seed": 1, "extra_body": {"ignore_eos": True}}
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(messages=messages, user="u1", **ask)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 6
    chunks = list(
        client.chat.completions.create(
            messages=messages, stream=True, stream_options={"include_usage": True}, **ask
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert (
        chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    )
    text = client.completions.create(prompt="abc", **ask)
    parts = list(client.completions.create(prompt="abc", stream=True, **ask))
    assert "".join(p.choices[0].text for p in parts if p.choices) == text.choices[0].text
    if FAKE:  # the fake engine's text is known exactly
        assert chat.choices[0].message.content == "he qui" and text.choices[0].text == "he qui"
        assert text.usage.prompt_tokens == 4


def test_openai_client_sees_typed_errors(server: LiveServer):
    key = new_key(server, "errs", "one-rpm", rpm=1)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=MODEL, prompt=too_long_prompt(server, key), max_tokens=1)
    assert exc.value.code == "context_length_exceeded"
    client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as limited:
        client.completions.create(model=MODEL, prompt="x", max_tokens=1)
    assert limited.value.response.headers["retry-after"]
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-cumulo-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bad_input_over_plain_http_is_a_clear_4xx_and_the_server_keeps_serving(server: LiveServer):
    key = new_key(server, "fuzz")
    h = {**auth(key), "content-type": "application/json"}
    url = f"{server.url}/v1/chat/completions"
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [
        (b'{"model": ', 400),
        (b"[1, 2, 3]", 400),
        (json.dumps({**ok, "messages": "not a list"}).encode(), 400),
        (json.dumps({**ok, "max_tokens": -3}).encode(), 400),
        (json.dumps({**ok, "temperature": "hot"}).encode(), 400),
        (json.dumps({**ok, "n": 1000}).encode(), 400),
        (json.dumps({**ok, "model": "ghost"}).encode(), 404),
        (
            json.dumps(
                {**ok, "messages": [{"role": "user", "content": too_long_prompt(server, key)}]}
            ).encode(),
            400,
        ),
        (b"{" + b" " * (5 * 1024 * 1024) + b"}", 413),
        ('{"model": "\udcff"}'.encode("utf-8", "surrogatepass"), 400),
    ]
    with httpx.Client(timeout=30) as client:
        for body, status in cases:
            r = client.post(url, headers=h, content=body)
            assert r.status_code == status, (body[:60], r.status_code, r.text[:200])
            assert r.json()["error"]["message"]
        assert client.post(url, headers=h, json=ok).status_code == 200
        assert client.get(f"{server.url}/health").json()["status"] == "ok"


def test_client_disconnect_mid_stream_bills_what_was_generated_and_stops(server: LiveServer):
    key = new_key(server, "leaver")
    body = {"model": MODEL, "prompt": "x", "max_tokens": 60, "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{server.url}/v1/completions", headers=auth(key), json=body) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                if seen == 5:
                    break
        rows = wait_until(
            lambda: [
                row
                for row in client.get(f"{server.url}/v1/usage", headers=auth(key)).json()["data"]
                if row["status"] != "in_progress"
            ]
        )
        assert rows[0]["status"] == "aborted"
        assert 5 <= rows[0]["completion_tokens"] < 60
        wait_until(lambda: "cumulo_requests_in_flight 0" in client.get(f"{server.url}/metrics").text)


def test_many_concurrent_clients_are_all_answered_and_the_ledger_sums_exactly(server: LiveServer):
    keys = [
        new_key(server, f"crowd-{i % 3}", plan, **terms)
        for i, (plan, terms) in enumerate(
            [
                ("crowd-a", {"rpm": 1000, "concurrency": 16, "price_in": 1.0, "price_out": 3.0}),
                ("crowd-b", {"tpm": 100_000, "price_in": 0.5, "price_out": 0.25}),
                ("crowd-a", {}),
                ("crowd-b", {}),
            ]
        )
    ]
    clients = 40

    async def one(i: int) -> tuple[str, dict]:
        key = keys[i % len(keys)]
        api = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        tokens = 5 + i % 7
        if i % 2:
            stream = await api.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"client {i}"}],
                max_tokens=tokens,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            finish, usage = None, None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    usage = chunk.usage
        else:
            out = await api.completions.create(
                model=MODEL, prompt=f"client {i}", max_tokens=tokens, extra_body={"ignore_eos": True}
            )
            finish, usage = out.choices[0].finish_reason, out.usage
        assert finish == "length" and usage.completion_tokens == tokens  # answered completely
        await api.close()
        return key, usage.model_dump()

    async def crowd() -> list[tuple[str, dict]]:
        return await asyncio.gather(*(one(i) for i in range(clients)))

    results = asyncio.run(crowd())
    assert len(results) == clients
    for key in set(keys):
        mine = [u for k, u in results if k == key]
        totals = httpx.get(f"{server.url}/v1/usage", headers=auth(key)).json()["totals"]
        assert totals["requests"] == len(mine)
        assert totals["prompt_tokens"] == sum(u["prompt_tokens"] for u in mine)
        assert totals["completion_tokens"] == sum(u["completion_tokens"] for u in mine)
    admin = auth(server.admin_key())
    everything = sum(
        httpx.get(f"{server.url}/admin/usage?org=crowd-{g}", headers=admin).json()["totals"][
            "completion_tokens"
        ]
        for g in range(3)
    )
    assert everything == sum(u["completion_tokens"] for _, u in results)


def test_usage_survives_kill_9_and_restart(tmp_path: Path):
    live = LiveServer(tmp_path / "data").start()
    try:
        key = new_key(live, "durable")
        for tokens in (3, 4, 5):
            r = httpx.post(
                f"{live.url}/v1/completions",
                headers=auth(key),
                json={"model": MODEL, "prompt": "x", "max_tokens": tokens},
            )
            assert r.status_code == 200
        live.kill()
        live.start()
        totals = httpx.get(f"{live.url}/v1/usage", headers=auth(key)).json()["totals"]
        assert totals["requests"] == 3 and totals["completion_tokens"] == 12
        assert "Created the admin key" not in live.log.read_text()  # second start: key already exists
    finally:
        live.stop()


@pytest.mark.postgres
def test_two_gateways_sharing_postgres_keep_limits_exact(tmp_path: Path, pg_database: str):
    url = fresh_pg_schema(pg_database)
    first = LiveServer(tmp_path / "data", database_url=url).launch()
    second = LiveServer(tmp_path / "data", database_url=url).launch()
    try:
        first.wait_ready()
        second.wait_ready()
        rpm_key = new_key(first, "shared", "shared-rpm", rpm=10)
        quota_key = new_key(first, "shared", "shared-quota", monthly_tokens=100)

        async def hammer(key: str, n: int, max_tokens: int) -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            f"{(first, second)[i % 2].url}/v1/completions",
                            headers=auth(key),
                            json={"model": MODEL, "prompt": "x", "max_tokens": max_tokens},
                        )
                        for i in range(n)
                    )
                )

        rpm_results = asyncio.run(hammer(rpm_key, 24, 2))
        assert sorted(r.status_code for r in rpm_results) == [200] * 10 + [429] * 14
        quota_results = asyncio.run(hammer(quota_key, 30, 8))  # 2 + 8 tokens each: exactly 10 fit in 100
        ok = [r for r in quota_results if r.status_code == 200]
        assert sum(r.json()["usage"]["total_tokens"] for r in ok) == 100
        assert all(
            r.json()["error"]["code"] == "insufficient_quota" for r in quota_results if r.status_code != 200
        )
        totals = httpx.get(f"{second.url}/v1/usage", headers=auth(quota_key)).json()["totals"]
        assert totals["prompt_tokens"] + totals["completion_tokens"] == 100
    finally:
        first.stop()
        second.stop()
