"""A rollout's model the fleet rolls back with no earlier good model to go to (desired model: none): the agent
stops it and runs the model it was made with, says so in a status result, and a restart keeps it that way."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cumulo.contracts.edge import DesiredModel, DesiredState
from cumulo.edge.agent import Agent, AgentSettings, Identity
from cumulo.edge.model import save_package, train_shelf_net
from cumulo.edge.scenes import ShelfScene
from cumulo.edge.sources import SceneSource


def _agent(home: Path, factory: Path) -> Agent:
    settings = AgentSettings(fps=0, summary_every=0)
    return Agent(home, Identity("cam-f", "cred-f"), SceneSource(ShelfScene(seed=3)), settings, factory)


def test_no_model_desired_after_a_rollout_brings_back_the_factory_model(
    tmp_path: Path, shelf_package: Path
) -> None:
    factory_sha = hashlib.sha256(shelf_package.read_bytes()).hexdigest()
    new = save_package(train_shelf_net(seed=5, per_class=20, epochs=1), tmp_path / "v2.safetensors")
    new_sha = hashlib.sha256(new.read_bytes()).hexdigest()
    home = tmp_path / "device"
    agent = _agent(home, shelf_package)
    try:
        assert agent.model_ref["sha256"] == factory_sha and agent.model_ref["version"] == "local"
        model = DesiredModel(name="shelf", version="2", sha256=new_sha, url=new.as_uri())
        agent.apply_desired(DesiredState(device_id="cam-f", revision=1, model=model, rollout_id=7))
        assert agent.model_ref["sha256"] == new_sha and agent.model_ref["version"] == "2"
        agent.step()

        agent.apply_desired(DesiredState(device_id="cam-f", revision=2, model=None))
        assert agent.model_ref["sha256"] == factory_sha and agent.model_ref["version"] == "local"
        agent.step()  # the factory model classifies the next frame
        statuses = [p for p in agent.outbox.pending(limit=1000) if p.kind == "status"]
        assert [s.body.get("type") for s in statuses] == [None, "factory_model"]
        assert statuses[0].body == {"ok": True, "rollout_id": 7}
        assert statuses[1].body["stopped"]["version"] == "2" and statuses[1].model["sha256"] == factory_sha
        state = json.loads((home / "state.json").read_text())
        assert "model" not in state and "model_path" not in state and state["revision"] == 2

        agent.apply_desired(DesiredState(device_id="cam-f", revision=3, model=None))  # nothing more to stop
        assert len([p for p in agent.outbox.pending(limit=1000) if p.kind == "status"]) == 2
    finally:
        agent.close()
    again = _agent(home, shelf_package)  # a restart runs the factory model too
    try:
        assert again.model_ref["sha256"] == factory_sha
    finally:
        again.close()
