"""The agent's HTTP side against a stand-in for the service's device endpoints (the protocol of
cumulo.contracts.edge): enrolment with a one-time token, results over HTTP when no broker is configured,
heartbeats, and desired state: a good model is fetched, checked and switched to; a bad one is reported as an
error status and the old model keeps running."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cumulo.contracts.edge import DesiredState, parse_envelope
from cumulo.edge.agent import Agent, AgentSettings, Identity, enroll
from cumulo.edge.model import save_package, train_shelf_net
from cumulo.edge.scenes import ShelfScene
from cumulo.edge.sources import SceneSource
from cumulo.errors import AuthenticationError, InvalidRequest


class FakeFleet(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.tokens = {"tok-1": "cam-1"}
        self.credentials = {"secret-1": "cam-1"}
        self.results: dict[tuple[str, int], dict[str, Any]] = {}
        self.latest: dict[str, list[dict[str, Any]]] = {"heartbeat": [], "reported": []}
        self.desired = DesiredState(device_id="cam-1", revision=0)
        self.files: dict[str, bytes] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeFleet

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: Any = None, raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _device(self) -> str | None:
        return self.server.credentials.get(self.headers.get("Authorization", "").removeprefix("Bearer "))

    def do_POST(self) -> None:
        data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        fleet = self.server
        if self.path == "/v1/edge/enroll":
            device = fleet.tokens.pop(data["token"], None)  # one-time
            if device is None:
                return self._send(401, {"error": {"message": "unknown or used token"}})
            return self._send(200, {"device_id": device, "credential": "secret-1"})
        device = self._device()
        if device is None:
            return self._send(401, {"error": {"message": "bad credential"}})
        envelopes = [parse_envelope(item) for item in data]
        with fleet.lock:
            if self.path == "/v1/edge/results":
                acks = []
                for e in envelopes:
                    new = (e.device_id, e.seq) not in fleet.results
                    fleet.results.setdefault((e.device_id, e.seq), e.model_dump(mode="json"))
                    acks.append(
                        {"device_id": e.device_id, "seq": e.seq, "status": "stored" if new else "duplicate"}
                    )
                return self._send(200, {"acks": acks})
            fleet.latest[self.path.rsplit("/", 1)[-1]] += [e.model_dump(mode="json") for e in envelopes]
        self._send(204, raw=b"")

    def do_GET(self) -> None:
        if self.path.startswith("/models/"):
            return self._send(200, raw=self.server.files[self.path])
        if self._device() is None:
            return self._send(401, {"error": {"message": "bad credential"}})
        self._send(200, self.server.desired.model_dump(mode="json"))


@pytest.fixture
def fleet() -> Iterator[FakeFleet]:
    server = FakeFleet()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def _http_agent(tmp_path: Path, fleet: FakeFleet, package: Path) -> Agent:
    identity = enroll(tmp_path, fleet.url, "tok-1")
    settings = AgentSettings(server=fleet.url, fps=0, heartbeat_s=0.0, desired_poll_s=0.0, summary_every=10)
    return Agent(tmp_path, identity, SceneSource(ShelfScene(seed=2, change_every=3)), settings, package)


def test_enrolment_keeps_the_credential_private_and_happens_once(tmp_path: Path, fleet: FakeFleet) -> None:
    with pytest.raises(InvalidRequest, match="not enrolled"):
        enroll(tmp_path, None, None)
    identity = enroll(tmp_path, fleet.url, "tok-1")
    assert (identity.device_id, identity.credential) == ("cam-1", "secret-1")
    assert oct(os.stat(tmp_path / "device.json").st_mode & 0o777) == "0o600"
    assert enroll(tmp_path, fleet.url, "tok-1") == identity  # stored: the used token is not sent again
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(AuthenticationError, match="refused"):  # a used token enrols no second device
        enroll(other, fleet.url, "tok-1")


def test_without_a_broker_results_and_heartbeats_go_over_http_once_each(
    tmp_path: Path, fleet: FakeFleet, shelf_package: Path
) -> None:
    agent = _http_agent(tmp_path, fleet, shelf_package)
    agent.run(max_frames=50)
    assert agent.drain(30)
    made = agent.outbox.stats().next_seq - 1
    assert made > 5 and sorted(seq for _, seq in fleet.results) == list(range(1, made + 1))
    assert all(r["auth"] == "secret-1" and r["device_id"] == "cam-1" for r in fleet.results.values())
    assert fleet.latest["heartbeat"] and fleet.latest["heartbeat"][-1]["body"]["frames"] > 0
    agent.close()


def test_desired_model_is_fetched_checked_and_a_bad_one_reported_as_an_error(
    tmp_path: Path, fleet: FakeFleet, shelf_package: Path
) -> None:
    agent = _http_agent(tmp_path, fleet, shelf_package)
    good = save_package(
        train_shelf_net(seed=1, per_class=60, epochs=1), tmp_path / "v2.safetensors"
    ).read_bytes()
    fleet.files = {"/models/v2": good, "/models/junk": b"not a model"}
    sha_good, sha_junk = hashlib.sha256(good).hexdigest(), hashlib.sha256(b"not a model").hexdigest()
    desired = {"name": "shelf", "version": "2", "sha256": sha_good, "url": "/models/v2"}
    fleet.desired = DesiredState(device_id="cam-1", revision=1, model=desired, rollout_id=7)
    agent.run(max_frames=2)
    assert agent.model_ref == {"name": "shelf", "version": "2", "sha256": sha_good}

    wrong_sha = desired | {"version": "3", "sha256": "0" * 64}
    fleet.desired = DesiredState(device_id="cam-1", revision=2, model=wrong_sha, rollout_id=8)
    agent.run(max_frames=4)
    junk = {"name": "shelf", "version": "4", "sha256": sha_junk, "url": "/models/junk"}
    fleet.desired = DesiredState(device_id="cam-1", revision=3, model=junk, rollout_id=9)
    agent.run(max_frames=6)
    assert agent.model_ref["sha256"] == sha_good  # the good model keeps running
    assert agent.drain(30)
    statuses = [r for r in fleet.results.values() if r["kind"] == "status" and "rollout_id" in r["body"]]
    assert [(s["body"]["rollout_id"], s["body"]["ok"]) for s in statuses] == [
        (7, True),
        (8, False),
        (9, False),
    ]
    assert "sha256" in statuses[1]["body"]["error"] and "not a model package" in statuses[2]["body"]["error"]
    assert [r["body"]["state"] for r in fleet.latest["reported"]].count("failed") == 2
    agent.close()
    # after a restart the agent runs the model the rollout installed, under its name
    again = Agent(tmp_path, Identity.load(tmp_path), SceneSource(ShelfScene(seed=2)), agent.settings)
    assert again.model_ref == {"name": "shelf", "version": "2", "sha256": sha_good}
    again.close()
