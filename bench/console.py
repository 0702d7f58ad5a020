"""What the console's session cookie costs per request: GET /v1/models with the cookie (the key re-read from the
database every time, so revocation is immediate) against the same request with the bearer key (the anchor,
served from the 5-second principal cache), interleaved in rounds on one gateway, and the bytes of a first load.

    python -m bench.console [--requests 200] [--rounds 5]

Uses the fake engine of tests/service (no model is needed to list models). Never part of the tests or CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from tests.service.live import LiveServer

FIRST_LOAD = ("", "app.css", "app.js", "api.js", "ui.js", "pages/index.js", "pages/usage.js")
VENDOR = ("vendor/preact-htm.js", "vendor/chart.umd.js")


def per_request_ms(client: httpx.Client, n: int, **kwargs: object) -> float:
    start = time.perf_counter()
    for _ in range(n):
        client.get("/v1/models", **kwargs).raise_for_status()  # type: ignore[arg-type]
    return (time.perf_counter() - start) * 1000 / n


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    server = LiveServer(Path(tempfile.mkdtemp(prefix="bench-console-"))).start()
    try:
        key = server.admin_key()
        bearer = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"})
        cookie = httpx.Client(base_url=server.url)
        cookie.post("/console/session", json={"api_key": key}).raise_for_status()
        per_request_ms(bearer, 20), per_request_ms(cookie, 20)  # warm both paths
        ratios = []
        for i in range(args.rounds):
            anchor, console = per_request_ms(bearer, args.requests), per_request_ms(cookie, args.requests)
            ratios.append(console / anchor)
            print(
                f"round {i}: bearer {anchor:.2f} ms  cookie {console:.2f} ms  ratio {console / anchor:.2f}x"
            )
        print(
            f"cookie / bearer per request, median of {args.rounds} rounds: {statistics.median(ratios):.2f}x"
        )
        sizes = {p: len(bearer.get(f"/console/{p}").content) for p in FIRST_LOAD + VENDOR}
        own = sum(sizes[p] for p in FIRST_LOAD)
        print(
            f"first load of /console/#/usage: {own + sum(sizes[p] for p in VENDOR)} bytes ({own} ours, rest vendor)"
        )
        print(f"load average: {os.getloadavg()}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
