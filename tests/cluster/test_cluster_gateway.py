"""`cumulo serve --cluster` over HTTP on a real local Ray pool: the official client streams from replicas on two
nodes, one node is SIGKILLed mid-load, and every stream still completes as an undisturbed run, billed once."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from tests.support.ray_pool import free_port, node_with, shared_pool

CHIP = "cpu-avx512-32core"  # as in test_ray_pool: only these test nodes offer it
MODEL = "tiny-llama"


def cumulo(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cumulo.cli.main", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


class Gateway:
    def __init__(self, data_dir: Path, address: str) -> None:
        self.data_dir, self.port = data_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "gateway.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cumulo.cli.main", "--data-dir", str(data_dir), "serve", "--cluster",
                 "--address", address, "--port", str(self.port), "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {(self.data_dir / 'admin_key').read_text().strip()}"}

    def create_key(self, org: str, timeout: float = 60.0) -> str:
        """An API key for `org`, once the gateway listens: it writes the admin key before it starts the pool's
        controller and binds its port, so the first request may find the port still closed."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                got = httpx.post(
                    f"{self.url}/admin/keys", headers=self.admin(), json={"org": org}, timeout=10
                )
                return got.json()["key"]
            except httpx.ConnectError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def wait_serving(self, key: str, timeout: float = 240.0) -> None:
        """Until the deployment's replicas are all ready (the model is listed once the first one is)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            with contextlib.suppress(httpx.TransportError):
                got = httpx.get(f"{self.url}/admin/deployments/{MODEL}", headers=self.admin(), timeout=5)
                states = [r["state"] for r in got.json().get("replicas_status", [])] if got.is_success else []
                if states == ["ready", "ready"]:
                    return
            time.sleep(0.3)
        raise AssertionError(f"replicas not ready:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, write_tiny_llama) -> Iterator[tuple[Gateway, str]]:
    import ray

    tiny = write_tiny_llama(tmp_path_factory.mktemp("models") / MODEL, 256, 64, 128, weight_std=0.5)
    data = tmp_path_factory.mktemp("data")
    pool = shared_pool()
    for name in ("a", "b"):
        node_with(name, 2, CHIP)
    deployed = cumulo(data, "deploy", str(tiny), "--replicas", "2", "--chip", CHIP, "--format", "fp32")
    assert deployed.returncode == 0, deployed.stderr
    gw = Gateway(data, pool.address)
    try:
        for _ in range(300):
            if (data / "admin_key").exists():
                break
            time.sleep(0.2)
        key = gw.create_key("o")
        gw.wait_serving(key)
        yield gw, key
    finally:
        gw.stop()
        for index in range(2):  # a gateway that joined a pool leaves its replicas to the pool: clean up here
            with contextlib.suppress(Exception):
                ray.kill(ray.get_actor(f"{MODEL}#{index}", namespace="cumulo"))


def stream_all(url: str, key: str, prompts: list[str], on_chunk=None) -> list[tuple[str, str | None, int]]:
    """Streams every prompt at once through the official client: (text, finish reason, completion tokens)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    results: list = [None] * len(prompts)
    counts = [0] * len(prompts)

    def one(i: int) -> None:
        parts, reason, used = [], None, 0
        for chunk in client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=200, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):  # fmt: skip
            if chunk.choices:
                parts.append(chunk.choices[0].text)
                reason = chunk.choices[0].finish_reason or reason
                counts[i] += 1
                if on_chunk is not None:
                    on_chunk(counts)
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        results[i] = ("".join(parts), reason, used)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return results


def test_a_node_dies_under_http_load_and_every_stream_completes_billed_once(gateway) -> None:
    gw, key = gateway
    prompts = [f"t{i} t{i + 5} t{3 * i + 2}" for i in range(8)]
    undisturbed = stream_all(gw.url, key, prompts)
    assert all(reason in ("length", "stop") for _, reason, _ in undisturbed)

    killed: list[str] = []
    lock = threading.Lock()

    def kill_once_under_way(counts: list[int]) -> None:
        with lock:
            if killed or min(counts) < 3:
                return
            replicas = httpx.get(f"{gw.url}/admin/deployments/{MODEL}", headers=gw.admin()).json()
            busy = next(r for r in replicas["replicas_status"] if r["in_flight"] > 0)
            killed.append(busy["node"])
            shared_pool().nodes[busy["node"]].kill()

    disturbed = stream_all(gw.url, key, prompts, kill_once_under_way)
    assert killed, "the load never got under way"
    assert (
        disturbed == undisturbed
    )  # same text, same finish, same billed tokens: one uninterrupted stream each

    # The ledger: every request settled once as completed, billing exactly what the client was told.
    database = create_engine(f"sqlite:///{gw.data_dir / 'cumulo.db'}")
    with database.connect() as conn:
        rows = conn.execute(text("SELECT status, completion_tokens FROM usage ORDER BY id")).all()
        month = conn.execute(text("SELECT month_tokens FROM api_keys WHERE month_tokens > 0")).scalars().all()
        billed = conn.execute(text("SELECT sum(billed_tokens) FROM usage")).scalar()
    database.dispose()
    assert [status for status, _ in rows] == ["completed"] * 16
    assert sum(tokens for _, tokens in rows) == 2 * sum(used for _, _, used in undisturbed)
    assert month == [billed]
    node_with(killed[0], 2, CHIP)  # the machine comes back


def test_a_second_gateway_shares_the_pool_and_serves_when_the_first_is_killed(gateway) -> None:
    import ray

    gw, key = gateway
    second = Gateway(gw.data_dir, shared_pool().address)  # the same database and the same pool
    try:
        second.wait_serving(key)
        replicas = [n for n in ray.util.list_named_actors() if n.startswith(f"{MODEL}#")]
        assert sorted(replicas) == [f"{MODEL}#0", f"{MODEL}#1"]  # it attached to the replicas, started none
        gw.process.kill()  # SIGKILL: the first gateway is gone without a word
        gw.process.wait(10)
        [(text_, reason, used)] = stream_all(second.url, key, ["t1 t2 t3"])
        assert reason in ("length", "stop") and used > 0 and text_
    finally:
        second.stop()
