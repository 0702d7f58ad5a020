"""A large backlog after an outage reaches the database whole: more results than the broker queues for one
subscriber (Mosquitto keeps 1000 beyond those in flight and drops the rest silently, after the device had its
PUBACK and deleted them), so the gateway's bridge asks for a receive window of its own (MQTT 5 Receive Maximum)
and every result arrives once, through the real broker and the gateway under uvicorn."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import httpx

from cumulo.edge.agent import Agent, AgentSettings, enroll
from cumulo.edge.sources import open_source
from tests.edge.conftest import wait_for
from tests.edge.test_fleet_end_to_end import gateway  # noqa: F401 (the gateway fixture)

BACKLOG = 2500  # results waiting in the outbox when the broker comes back


def test_a_backlog_larger_than_the_brokers_queue_arrives_whole(
    tmp_path: Path,
    gateway: tuple[str, str, Any],  # noqa: F811
    topic_root: str,
    shelf_package: Path,
) -> None:
    url, key, app = gateway
    headers = {"Authorization": f"Bearer {key}"}
    made = httpx.post(f"{url}/v1/edge/devices", json={"device_id": "cam-b"}, headers=headers).json()
    home = tmp_path / "device"
    home.mkdir()
    identity = enroll(home, url, made["enrollment_token"])
    settings = AgentSettings(mqtt_url="mqtt://127.0.0.1:1883", topic_root=topic_root, fps=0, heartbeat_s=3600)
    agent = Agent(home, identity, open_source("synthetic:shelf", 5, 3), settings, shelf_package)
    try:
        for i in range(BACKLOG):  # made while the broker was out of reach
            agent.outbox.add("count", {"count": i})
        wait_for(lambda: agent.sender.pump() >= 0 and agent.outbox.stats().pending == 0, 300, "the PUBACKs")
        database = Path(str(app.state.service.settings.database_url).removeprefix("sqlite:///"))

        def stored() -> list[int]:
            with sqlite3.connect(database) as db:
                return [row[0] for row in db.execute("SELECT seq FROM edge_results ORDER BY seq")]

        wait_for(lambda: len(stored()) >= BACKLOG, 300, "every result in the database")
        assert stored() == list(range(1, BACKLOG + 1))
    finally:
        agent.close()
