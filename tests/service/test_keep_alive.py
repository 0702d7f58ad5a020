"""Over a real keep-alive connection (uvicorn in a thread, raw HTTP/1.1 on one socket): a refused request, and even
an unexpected error, leave the connection usable for the client's next request. A 500 that uvicorn saw raised
used to close the connection, failing the next request on it too."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvicorn

from cumulo.contracts import RequestOutput, SamplingParams
from cumulo.service import crud
from cumulo.service.app import create_app
from cumulo.service.settings import Settings
from tests.service.live import free_port
from tests.service.strict_engine import StrictEngine

MODEL, BROKEN = "fake-model", "broken-model"


class BrokenEngine(StrictEngine):
    """Fails every request with an error no handler expects."""

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        raise RuntimeError("the accelerator fell off the bus")
        yield  # pragma: no cover - makes this an async generator


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    data = tmp_path_factory.mktemp("keep-alive")
    settings = Settings(data_dir=Path(data), database_url=f"sqlite:///{data / 'cumulo.db'}")
    app = create_app(settings, {MODEL: StrictEngine(MODEL), BROKEN: BrokenEngine(BROKEN)})
    state = app.state.service
    with state.sessions() as session, session.begin():
        _, key = crud.create_key(session, state.hasher, org_name="acme", plan_name="default")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    yield port, key
    server.should_exit = True
    thread.join(timeout=10)
    state.db.dispose()


class Connection:
    """HTTP/1.1 on one socket: each exchange must find it still open."""

    def __init__(self, port: int, key: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.key = key

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        content = json.dumps(body, ensure_ascii=True).encode()  # lone surrogates travel as \ud800 escapes
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {self.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + content)
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._recv()
        header, body_bytes = data.split(b"\r\n\r\n", 1)
        lines = header.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        assert headers.get("connection") != "close", headers
        length = int(headers["content-length"])
        while len(body_bytes) < length:
            body_bytes += self._recv()
        return int(lines[0].split()[1]), json.loads(body_bytes[:length])

    def _recv(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        return chunk

    def close(self) -> None:
        self.sock.close()


def _assert_openai_error(body: dict) -> dict:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize(
    ("path", "hostile", "valid"),
    [
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2},
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "a\udfffb", "max_tokens": 2},
            {"model": MODEL, "prompt": "ab", "max_tokens": 2},
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "ab", "max_tokens": 2, "seed": 2**64},
            {"model": MODEL, "prompt": "ab", "max_tokens": 2, "seed": 2**63 - 1},
        ),
    ],
    ids=["chat-surrogate", "completion-surrogate", "seed-beyond-64-bits"],
)
def test_a_refused_request_leaves_the_connection_usable(gateway, path: str, hostile: dict, valid: dict):
    conn = Connection(*gateway)
    try:
        status, body = conn.post(path, hostile)
        assert status == 400 and _assert_openai_error(body)["type"] == "invalid_request_error"
        status, body = conn.post(path, valid)
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    finally:
        conn.close()


def test_an_unexpected_error_is_a_500_in_openais_shape_and_the_connection_stays_usable(gateway):
    conn = Connection(*gateway)
    try:
        status, body = conn.post("/v1/completions", {"model": BROKEN, "prompt": "ab", "max_tokens": 2})
        assert status == 500
        error = _assert_openai_error(body)
        assert error["code"] == "internal_error" and "bus" not in error["message"]  # no internals leak
        status, body = conn.post("/v1/completions", {"model": MODEL, "prompt": "ab", "max_tokens": 2})
        assert status == 200
    finally:
        conn.close()
