"""Load generator of bench.serve: streams /v1/completions at a fixed concurrency and measures each request
the way `vllm bench serve` does (TTFT, TPOT, ITL, end-to-end latency, output tokens/s)."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx

from bench.common import percentile


@dataclass(slots=True)
class RequestTiming:
    ttft: float
    e2e: float
    output_tokens: int
    itl: list[float] = field(default_factory=list)  # gaps between streamed chunks after the first

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass(slots=True)
class LevelResult:
    system: str
    concurrency: int
    requests: int
    duration: float
    output_tokens: int
    timings: list[RequestTiming]

    def summary(self) -> dict[str, float | int | str]:
        def pct(values: list[float], p: float) -> float:
            return percentile(values, p) * 1000

        ttft = [t.ttft for t in self.timings]
        tpot = [t.tpot for t in self.timings if t.tpot is not None]
        itl = [gap for t in self.timings for gap in t.itl]
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "duration_s": round(self.duration, 3),
            "output_tok_s": round(self.output_tokens / self.duration, 2),
            "request_s": round(self.requests / self.duration, 3),
            "ttft_ms_mean": round(statistics.fmean(ttft) * 1000, 2),
            "ttft_ms_p50": round(pct(ttft, 50), 2),
            "ttft_ms_p99": round(pct(ttft, 99), 2),
            "tpot_ms_mean": round(statistics.fmean(tpot) * 1000, 2) if tpot else 0.0,
            "tpot_ms_p50": round(pct(tpot, 50), 2) if tpot else 0.0,
            "itl_ms_p50": round(pct(itl, 50), 2) if itl else 0.0,
            "itl_ms_p99": round(pct(itl, 99), 2) if itl else 0.0,
        }


async def _one(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict) -> RequestTiming:
    start = time.perf_counter()
    first: float | None = None
    last = start
    gaps: list[float] = []
    chunks = 0
    usage_tokens: int | None = None
    async with client.stream("POST", f"{url}/v1/completions", headers=headers, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage_tokens = event["usage"].get("completion_tokens")
            if not event.get("choices") or not event["choices"][0].get("text"):
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps.append(now - last)
            last = now
            chunks += 1
    end = time.perf_counter()
    return RequestTiming(
        ttft=(first or end) - start, e2e=end - start, output_tokens=usage_tokens or chunks, itl=gaps
    )


async def run_level(
    system: str,
    url: str,
    headers: dict[str, str],
    model: str,
    prompts: list[list[int]],
    output_len: int,
    concurrency: int,
) -> LevelResult:
    """Sends every prompt once, keeping `concurrency` requests in flight."""
    queue: asyncio.Queue[list[int]] = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    timings: list[RequestTiming] = []
    # No keep-alive: llama.cpp's server drops idle connections after a few seconds, and a reused dead
    # connection fails the request. A fresh local connection per request costs both systems the same ~0.1 ms.
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=0)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": output_len,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                timings.append(await _one(client, url, headers, body))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - start
    return LevelResult(
        system, concurrency, len(timings), duration, sum(t.output_tokens for t in timings), timings
    )
