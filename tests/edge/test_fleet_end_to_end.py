"""End to end with the real service and the real broker: `cumulo edge agent --server --token` enrols, its results
travel over MQTT through the gateway's bridge into the database once each, and a rollout's desired state reaches
the agent, which switches to the new model and says so. The service runs under uvicorn on a free port (SQLite),
the agent as its own process."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from cumulo.edge.model import save_package, train_shelf_net
from cumulo.edge.outbox import Outbox
from cumulo.service.app import create_app
from cumulo.service.settings import Settings
from tests.edge.conftest import REPO, wait_for
from tests.service.fakes import FakeEngine
from tests.service.support import Service


@pytest.fixture
def service(gateway: tuple[str, str, Any]) -> tuple[str, str]:
    """(URL, an API key of org 'acme') of a running gateway that bridges the broker under `topic_root`."""
    return gateway[:2]


@pytest.fixture
def gateway(tmp_path: Path, topic_root: str) -> Iterator[tuple[str, str, Any]]:
    """(URL, an API key of org 'acme', the app) of a running gateway that bridges the broker."""
    config = Settings(  # type: ignore[call-arg]
        data_dir=tmp_path / "service",
        database_url=f"sqlite:///{tmp_path / 'service.db'}",
        edge_mqtt_url="mqtt://127.0.0.1:1883",
        edge_topic_root=topic_root,
        edge_mqtt_client_id=f"bridge-{uuid.uuid4().hex[:8]}",
        edge_session_expiry_seconds=60,
        edge_check_seconds=0.2,
    )
    app = create_app(config, {"fake-model": FakeEngine()})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, what="the gateway")
    assert app.state.edge_bridge.connected.wait(20)
    key = Service(None, app.state.service).key("acme")  # type: ignore[arg-type]
    yield f"http://127.0.0.1:{port}", key, app
    server.should_exit = True
    thread.join(30)


def _agent(data_dir: Path, url: str, root: str, *extra: str) -> str:
    command = [
        sys.executable,
        "-m",
        "cumulo.cli.edge_agent",
        "--server",
        url,
        "--mqtt",
        "mqtt://127.0.0.1:1883",
    ]
    command += ["--topic-root", root, "--data-dir", str(data_dir), "--fps", "0", "--heartbeat", "3600"]
    done = subprocess.run(command + list(extra), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _results(url: str, key: str) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{url}/v1/edge/results", params={"limit": 1000}, headers={"Authorization": f"Bearer {key}"}
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def _made(data_dir: Path) -> int:
    box = Outbox(data_dir / "outbox.db")
    try:
        return box.stats().next_seq - 1
    finally:
        box.close()


def test_agent_enrols_sends_over_the_bridge_and_follows_a_rollout(
    tmp_path: Path, service: tuple[str, str], topic_root: str, shelf_package: Path
) -> None:
    url, key = service
    made = httpx.post(
        f"{url}/v1/edge/devices", json={"device_id": "e2e-cam"}, headers={"Authorization": f"Bearer {key}"}
    )
    assert made.status_code == 201, made.text
    token = made.json()["enrollment_token"]
    device_dir = tmp_path / "device"
    run = ("--model", str(shelf_package), "--change-every", "3", "--drain", "60")
    _agent(device_dir, url, topic_root, "--token", token, "--frames", "40", *run)
    first = _made(device_dir)
    wait_for(lambda: len(_results(url, key)) >= first, what="the results in the service")
    assert sorted(r["seq"] for r in _results(url, key)) == list(range(1, first + 1))

    package = save_package(train_shelf_net(seed=1, per_class=60, epochs=1), tmp_path / "shelf-v2.safetensors")
    sha = hashlib.sha256(package.read_bytes()).hexdigest()
    rollout = {"name": "shelf", "version": "2", "sha256": sha, "url": package.as_uri(), "canary_share": 1.0}
    answer = httpx.post(f"{url}/v1/edge/rollouts", json=rollout, headers={"Authorization": f"Bearer {key}"})
    assert answer.status_code == 201, answer.text
    _agent(
        device_dir, url, topic_root, "--frames", "40", *run
    )  # enrolled now: no token; --model yields to the rollout
    total = _made(device_dir)
    wait_for(lambda: len(_results(url, key)) >= total, what="the results after the rollout")
    stored = _results(url, key)
    assert sorted(r["seq"] for r in stored) == list(range(1, total + 1))  # once each, across two runs
    switched = [r for r in stored if r["kind"] == "status" and r["body"].get("ok") and r["model"]]
    assert switched and switched[-1]["model"]["sha256"] == sha
    after = [r for r in stored if r["seq"] > switched[-1]["seq"]]
    assert after and all(r["model"]["sha256"] == sha for r in after)


def test_a_model_the_device_cannot_load_rolls_the_rollout_back(
    tmp_path: Path, service: tuple[str, str], topic_root: str, shelf_package: Path
) -> None:
    url, key = service
    headers = {"Authorization": f"Bearer {key}"}
    token = httpx.post(f"{url}/v1/edge/devices", json={"device_id": "e2e-bad"}, headers=headers).json()
    device_dir = tmp_path / "device"
    run = ("--model", str(shelf_package), "--change-every", "3", "--drain", "60", "--frames", "20")
    _agent(device_dir, url, topic_root, "--token", token["enrollment_token"], *run)
    good_sha = hashlib.sha256(shelf_package.read_bytes()).hexdigest()

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 1000)  # the sha256 matches, but it is no model
    sha = hashlib.sha256(broken.read_bytes()).hexdigest()
    rollout = {"name": "shelf", "version": "3", "sha256": sha, "url": broken.as_uri(), "canary_share": 1.0}
    created = httpx.post(f"{url}/v1/edge/rollouts", json=rollout, headers=headers)
    assert created.status_code == 201, created.text
    _agent(device_dir, url, topic_root, *run)

    def state() -> str:
        return httpx.get(f"{url}/v1/edge/rollouts/{created.json()['id']}", headers=headers).json()["state"]

    wait_for(lambda: state() == "rolled_back", what="the rollback")
    stored = _results(url, key)
    failed = [r for r in stored if r["kind"] == "status" and r["body"].get("error")]
    assert len(failed) == 1 and failed[0]["model"]["sha256"] == sha
    assert "not a model package" in failed[0]["body"]["error"]
    events = [r for r in stored if r["kind"] != "status"]
    assert events and all(r["model"]["sha256"] == good_sha for r in events)  # the old model kept running


def test_the_agent_names_its_class_and_refuses_a_pushed_model_that_does_not_fit_it(
    tmp_path: Path, gateway: tuple[str, str, Any], topic_root: str, shelf_package: Path
) -> None:
    """`--device-class imx500` sets the device's class at the service (made without one); with the fit check
    installed, the rollouts API then refuses an fp8 package for it; without the check the rollout goes out, and
    the agent refuses the package itself, which rolls the rollout back."""
    url, key, app = gateway
    headers = {"Authorization": f"Bearer {key}"}
    made = httpx.post(f"{url}/v1/edge/devices", json={"device_id": "e2e-cls"}, headers=headers).json()
    assert made["device_class"] is None
    device_dir = tmp_path / "device"
    run = ("--model", str(shelf_package), "--change-every", "3", "--drain", "60", "--frames", "20")
    run += ("--device-class", "imx500")
    _agent(device_dir, url, topic_root, "--token", made["enrollment_token"], *run)

    def device_class() -> str | None:
        return httpx.get(f"{url}/v1/edge/devices/e2e-cls", headers=headers).json()["device_class"]

    wait_for(lambda: device_class() == "imx500", what="the class the agent named")

    fp8 = save_package(
        train_shelf_net(seed=1, per_class=20, epochs=1), tmp_path / "v2-fp8.safetensors", "fp8"
    )
    sha = hashlib.sha256(fp8.read_bytes()).hexdigest()
    rollout = {"name": "shelf", "version": "2", "sha256": sha, "url": fp8.as_uri(), "canary_share": 1.0}
    from cumulo.cli import edge_fit

    edge_fit.install(app)  # as `cumulo serve` does
    try:
        refused = httpx.post(f"{url}/v1/edge/rollouts", json=rollout, headers=headers)
    finally:
        del app.state.edge_fit_check
    assert refused.status_code == 400 and "imx500 runs int8 only" in refused.json()["error"]["message"]

    created = httpx.post(f"{url}/v1/edge/rollouts", json=rollout, headers=headers)  # no check: it goes out
    assert created.status_code == 201, created.text
    _agent(device_dir, url, topic_root, *run)

    def state() -> str:
        return httpx.get(f"{url}/v1/edge/rollouts/{created.json()['id']}", headers=headers).json()["state"]

    wait_for(lambda: state() == "rolled_back", what="the rollback")
    made_total = _made(device_dir)
    wait_for(lambda: len(_results(url, key)) >= made_total, what="every result")
    failed = [r for r in _results(url, key) if r["kind"] == "status" and r["body"].get("error")]
    assert len(failed) == 1 and failed[0]["model"]["sha256"] == sha
    assert failed[0]["body"]["error"].startswith("imx500 runs int8 only; cumulo-shelf-cnn-v1")
    good = hashlib.sha256(shelf_package.read_bytes()).hexdigest()
    events = [r for r in _results(url, key) if r["kind"] != "status"]
    assert events and all(r["model"]["sha256"] == good for r in events)  # the old model kept running
