"""`cumulo serve` with real engine processes (a tiny random Llama), over real HTTP: it streams through the
official client, reports each engine's health, turns a dead engine into a clean 503 while the gateway stays
up, and takes its engine processes with it when it stops."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.service.live import LiveServer
from tests.service.support import auth


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, write_tiny_llama) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama", 256, 64, 128)


@pytest.fixture
def server(tmp_path: Path, tiny_model: Path) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path / "data", model=str(tiny_model), fake=False).start(timeout=180)
    yield live
    live.stop()


def engine_pids(server: LiveServer) -> list[int]:
    """The gateway's engine processes: its children started by multiprocessing's spawn."""
    assert server.process is not None
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_serves_streams_and_reports_engine_health(server: LiveServer) -> None:
    key = httpx.post(f"{server.url}/admin/keys", headers=auth(server.admin_key()), json={"org": "o"}).json()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key["key"], max_retries=0)
    [model] = [m.id for m in client.models.list().data]
    assert model == "tiny-llama"
    parts = list(
        client.completions.create(
            model=model,
            prompt="t1 t2 t3",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    whole = client.completions.create(model=model, prompt="t1 t2 t3", max_tokens=6, temperature=0)
    assert whole.usage.completion_tokens == 6 and whole.choices[0].finish_reason == "length"
    # The stream says the same as the whole answer: greedy, so the same tokens, in deltas that add up.
    assert "".join(p.choices[0].text for p in parts if p.choices) == whole.choices[0].text
    assert parts[-1].usage.completion_tokens == 6
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["models"][model]["status"] == "ok"
    assert len(engine_pids(server)) == 1


def test_a_dead_engine_is_a_clean_503_and_the_gateway_stays_up(server: LiveServer) -> None:
    key = httpx.post(f"{server.url}/admin/keys", headers=auth(server.admin_key()), json={"org": "o"}).json()
    [pid] = engine_pids(server)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503
    assert health.json()["models"]["tiny-llama"]["status"] == "down"
    r = httpx.post(
        f"{server.url}/v1/completions",
        headers=auth(key["key"]),
        json={"model": "tiny-llama", "prompt": "t1 t2", "max_tokens": 3},
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    usage = httpx.get(f"{server.url}/v1/usage", headers=auth(key["key"])).json()["data"]
    assert [row["status"] for row in usage] == ["error"]  # billed once, as an error, nothing generated


def test_stopping_the_gateway_stops_its_engines(server: LiveServer) -> None:
    pids = engine_pids(server)
    assert pids
    server.stop()
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
    assert server.process is not None and server.process.returncode == 0
