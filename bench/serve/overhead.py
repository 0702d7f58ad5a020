"""The gateway's own added latency (auth, admission/quota, metering, labels, JSON), measured in-process.

A zero-cost engine answers instantly. The baseline is a bare FastAPI app that parses the same request, runs the
same engine and returns the same text: what any OpenAI-style server pays for HTTP, JSON and routing. Cumulo's
app minus that baseline is what accounts, limits, metering and labels add. SQLite in a temporary data directory.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request

from bench.common import percentile
from cumulo.contracts import EngineHealth, ModelInfo, RequestOutput, SamplingParams


class _Tokenizer:
    vocab_size = 1 << 16
    bos_token_id = None
    eos_token_ids = {0}
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(t) for t in token_ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return "".join(m["content"] for m in messages)


class InstantEngine:
    info = ModelInfo("instant", "sha256:" + "0" * 64, 4096)
    tokenizer = _Tokenizer()

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        for i in range(params.max_tokens):
            done = i == params.max_tokens - 1
            yield RequestOutput(request_id or "", [97], "a", done, "length" if done else None)

    async def abort(self, request_id: str) -> None:
        return None

    async def health(self) -> EngineHealth:
        return EngineHealth(ok=True)

    def shutdown(self) -> None:
        return None


def _bare_app(engine: InstantEngine) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body = await request.json()
        prompt = engine.tokenizer.encode(body["prompt"])
        outputs = [o async for o in engine.generate(prompt, SamplingParams(max_tokens=body["max_tokens"]))]
        text = "".join(o.new_text for o in outputs)
        completion_tokens = sum(len(o.new_token_ids) for o in outputs)
        return {
            "choices": [{"index": 0, "text": text, "finish_reason": outputs[-1].finish_reason}],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens},
        }

    return app


async def _timed(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> tuple[float, float]:
    cpu, start = time.process_time(), time.perf_counter()
    response = await client.post("/v1/completions", headers=headers, json=body)
    elapsed, cpu_used = time.perf_counter() - start, time.process_time() - cpu
    assert response.status_code == 200, response.text
    return elapsed, cpu_used


async def _measure(requests: int, output_len: int, plan_limits: bool) -> dict[str, float]:
    from cumulo.service import crud
    from cumulo.service.app import create_app
    from cumulo.service.settings import Settings

    engine = InstantEngine()
    app = create_app(Settings(data_dir=Path(tempfile.mkdtemp(prefix="cumulo-bench-"))), {"instant": engine})
    state = app.state.service
    with state.sessions() as session, session.begin():
        plan = "default"
        if plan_limits:  # a plan with every limit on, so admission runs all its checks
            plan = "limited"
            crud.create_plan(
                session,
                plan,
                rpm=10**9,
                tpm=10**12,
                concurrency=10**6,
                monthly_tokens=10**15,
                price_in=0.1,
                price_out=0.4,
            )
        _, key = crud.create_key(session, state.hasher, org_name="bench", plan_name=plan)
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "instant", "prompt": "hello world", "max_tokens": output_len}
    gateway, direct = [], []
    gateway_cpu = direct_cpu = 0.0
    bare = httpx.AsyncClient(transport=httpx.ASGITransport(app=_bare_app(engine)), base_url="http://bare")
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench") as client,
        bare,
    ):
        for i in range(requests + 20):  # interleaved, so both see the same machine load
            elapsed, cpu_used = await _timed(client, headers, body)
            baseline, cpu_base = await _timed(bare, {}, body)
            if i >= 20:  # warm-up: imports, statement caches, connection pool
                gateway.append(elapsed)
                direct.append(baseline)
                gateway_cpu += cpu_used
                direct_cpu += cpu_base
    state.db.dispose()
    base = percentile(direct, 50)
    added = [g - base for g in gateway]
    return {
        "overhead_ms_p50": round(percentile(added, 50) * 1000, 3),
        "overhead_ms_p99": round(percentile(added, 99) * 1000, 3),
        # CPU time (all threads) per request: what the overhead costs on an idle machine, whatever the load.
        "overhead_cpu_ms_mean": round((gateway_cpu - direct_cpu) / requests * 1000, 3),
        "bare_server_ms_p50": round(base * 1000, 3),
        "requests": requests,
        "output_len": output_len,
        "plan_limits": plan_limits,
    }


def gateway_overhead(requests: int = 300, output_len: int = 16, plan_limits: bool = True) -> dict[str, float]:
    return asyncio.run(_measure(requests, output_len, plan_limits))
