"""A gateway can die too: live gateway processes over the fake engine, killed with SIGKILL mid-stream. What the
client received is billed (give or take one checkpoint period), the quota agrees with the ledger, and a second
gateway on the same database keeps serving and settles the dead one's request.

The fake engine emits one token per character, so the tokens a client received are the characters it read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from tests.service.conftest import fresh_pg_schema
from tests.service.live import LiveServer
from tests.service.support import auth

STALL = 95  # tokens a sequence streams before the stalling fake engine stops producing
DELAY = 0.01  # seconds per token of the paced fake engine
PERIOD = 1.0  # the gateway's checkpoint period (the default)


def new_key(server: LiveServer, org: str) -> str:
    r = httpx.post(f"{server.url}/admin/keys", headers=auth(server.admin_key()), json={"org": org})
    assert r.status_code == 201, r.text
    return r.json()["key"]


def wait_until(predicate, timeout: float = 60.0):  # noqa: ANN001, ANN201
    """Polls until the predicate holds (a deadline against hanging, not a speed requirement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


class Ledger:
    """Reads the shared database straight, as an auditor would."""

    def __init__(self, url: str) -> None:
        self.database = create_engine(url)

    def in_progress(self) -> list[dict]:
        return self._rows("WHERE status = 'in_progress'", {})

    def row(self, usage_id: int) -> dict:
        return self._rows("WHERE id = :id", {"id": usage_id})[0]

    def checkpointed(self, tokens: int) -> int | None:
        """The id of the one request in progress once its checkpoint says `tokens`."""
        rows = self.in_progress()
        return rows[0]["id"] if len(rows) == 1 and rows[0]["completion_tokens"] == tokens else None

    def quota_agrees(self) -> bool:
        """Every key's month counter equals the tokens its usage rows bill."""
        with self.database.connect() as conn:
            counters = dict(conn.execute(text("SELECT id, month_tokens FROM api_keys")).all())
            billed = dict(
                conn.execute(
                    text(
                        "SELECT key_id, sum(billed_tokens) FROM usage WHERE status <> 'rejected' GROUP BY key_id"
                    )
                ).all()
            )
        return all(counters[k] == billed.get(k, 0) for k in counters)

    def close(self) -> None:
        self.database.dispose()

    def _rows(self, where: str, params: dict) -> list[dict]:
        with self.database.connect() as conn:
            found = conn.execute(
                text(
                    "SELECT id, status, error_code, prompt_tokens, completion_tokens, billed_tokens, gateway "
                    f"FROM usage {where} ORDER BY id"
                ),
                params,
            ).mappings()
            return [dict(r) for r in found]


def stream(server: LiveServer, key: str, max_tokens: int = 1000) -> Iterator[str]:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    chunks = client.completions.create(model=server.model, prompt="x", max_tokens=max_tokens, stream=True)
    return (chunk.choices[0].text for chunk in chunks if chunk.choices)


def read(tokens: Iterator[str], count: int | None = None) -> int:
    """Characters (= tokens) read: `count` of them, or all until the stream ends or breaks."""
    got = 0
    try:
        while count is None or got < count:
            got += len(next(tokens))
    except (StopIteration, httpx.HTTPError, openai.APIError):
        pass
    return got


def completion_works(server: LiveServer, key: str) -> bool:
    r = httpx.post(
        f"{server.url}/v1/completions",
        headers=auth(key),
        json={"model": server.model, "prompt": "x", "max_tokens": 5},
        timeout=30,
    )
    return r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_a_killed_gateway_bills_the_tokens_its_client_received(tmp_path: Path):
    env = {
        "CUMULO_FAKE_DELAY": "0.002",
        "CUMULO_FAKE_STALL_AFTER": str(STALL),
        "CUMULO_FAKE_MAX_MODEL_LEN": "4096",
    }
    first = LiveServer(tmp_path / "data", env=env).start()
    ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'cumulo.db'}")
    second = LiveServer(tmp_path / "data", env=env)
    try:
        key = new_key(first, "survivors")
        tokens = stream(first, key)
        assert read(tokens, STALL) == STALL  # then the engine stalls: the client has exactly these
        usage_id = wait_until(lambda: ledger.checkpointed(STALL))  # the next checkpoint
        first.kill()
        second.start()  # on the same host: the dead process is seen at once
        row = ledger.row(usage_id)
        assert (row["status"], row["error_code"]) == ("interrupted", "gateway_lost")
        assert row["completion_tokens"] == STALL
        assert row["billed_tokens"] == row["prompt_tokens"] + STALL
        assert ledger.quota_agrees()
        totals = httpx.get(f"{second.url}/v1/usage", headers=auth(key)).json()["totals"]
        assert totals["completion_tokens"] == STALL
        assert completion_works(second, key)
    finally:
        ledger.close()
        first.stop()
        second.stop()


def test_a_gateway_killed_mid_stream_loses_at_most_one_checkpoint_period(tmp_path: Path):
    env = {"CUMULO_FAKE_DELAY": str(DELAY), "CUMULO_FAKE_MAX_MODEL_LEN": "4096"}
    first = LiveServer(tmp_path / "data", env=env).start()
    ledger = Ledger(f"sqlite:///{tmp_path / 'data' / 'cumulo.db'}")
    second = LiveServer(tmp_path / "data", env=env)
    try:
        key = new_key(first, "paced")
        tokens = stream(first, key, max_tokens=3000)
        received = read(tokens, 300)
        (streaming,) = ledger.in_progress()
        first.kill()
        received += read(tokens)  # what was already on its way when the gateway died
        second.start()
        row = ledger.row(streaming["id"])
        assert row["status"] == "interrupted"
        checkpointed = row["completion_tokens"]
        # A checkpoint counts chunks already written to the connection: never more than the client got.
        assert checkpointed <= received
        # The fake cannot beat one token per DELAY; what went out after the last checkpoint took at most one
        # period, plus the write of the checkpoint in flight when the gateway died (another period at most).
        assert received - checkpointed <= 2 * PERIOD / DELAY
        assert row["billed_tokens"] == row["prompt_tokens"] + checkpointed
        assert ledger.quota_agrees()
    finally:
        ledger.close()
        first.stop()
        second.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    return fresh_pg_schema(request.getfixturevalue("pg_database"))


def test_two_gateways_serve_and_the_survivor_settles_the_dead_ones_request(tmp_path: Path, shared_url: str):
    env = {
        "CUMULO_FAKE_DELAY": "0.002",
        "CUMULO_FAKE_STALL_AFTER": str(STALL),
        "CUMULO_FAKE_MAX_MODEL_LEN": "4096",
        "CUMULO_RECOVERY_SECONDS": "0.5",
    }
    # One data directory: gateways sharing a database share its key secret (on two hosts, a copy of it).
    first = LiveServer(tmp_path / "data", database_url=shared_url, env=env).launch()
    second = LiveServer(tmp_path / "data", database_url=shared_url, env=env).launch()
    ledger = Ledger(shared_url)
    try:
        first.wait_ready()
        second.wait_ready()
        key = new_key(first, "pair")
        assert completion_works(first, key) and completion_works(second, key)
        tokens = stream(first, key)
        assert read(tokens, STALL) == STALL
        usage_id = wait_until(lambda: ledger.checkpointed(STALL))
        first.kill()
        assert completion_works(second, key)  # the cloud keeps serving
        # Its periodic recovery (every 0.5 s here) finds the dead gateway and settles its request.
        wait_until(lambda: ledger.row(usage_id)["status"] != "in_progress")
        row = ledger.row(usage_id)
        assert (row["status"], row["completion_tokens"]) == ("interrupted", STALL)
        assert row["billed_tokens"] == row["prompt_tokens"] + STALL
        assert ledger.quota_agrees()
        assert completion_works(second, key)
    finally:
        ledger.close()
        first.stop()
        second.stop()
