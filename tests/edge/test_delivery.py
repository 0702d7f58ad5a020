"""Results reach the real broker in seq order, survive an unreachable broker and a cut network, and arrive
once each (a result in flight when the network was cut may come twice with the same seq and the same content:
the service keeps one per (device_id, seq))."""

from __future__ import annotations

from pathlib import Path

from cumulo.contracts.edge import Envelope, model_id
from cumulo.edge.agent import Agent, AgentSettings, Identity
from cumulo.edge.scenes import ShelfScene
from cumulo.edge.sources import SceneSource
from tests.edge.conftest import Subscriber, TcpProxy, wait_for


def _agent(tmp_path: Path, package: Path, mqtt_url: str, root: str, device: str = "dev-1") -> Agent:
    identity = Identity(device, f"cred-{device}")
    settings = AgentSettings(mqtt_url=mqtt_url, topic_root=root, fps=0, heartbeat_s=3600, summary_every=10)
    source = SceneSource(ShelfScene(seed=11, change_every=3))
    return Agent(tmp_path, identity, source, settings, package)


def _made(agent: Agent) -> int:
    return agent.outbox.stats().next_seq - 1


def _model_of(e: Envelope) -> str | None:
    return model_id(e.model.sha256) if e.model is not None else e.mid


def _once_each(received: list[Envelope], made: int) -> None:
    by_seq: dict[int, Envelope] = {}
    for e in received:
        if (
            e.seq in by_seq
        ):  # a re-send: the very same result (its model in full or by id, as the link had it)
            before = by_seq[e.seq]
            assert e.model_dump(exclude={"model", "mid"}) == before.model_dump(exclude={"model", "mid"})
            assert _model_of(e) == _model_of(before)
        by_seq[e.seq] = e
    assert sorted(by_seq) == list(range(1, made + 1))


def test_agent_publishes_results_that_arrive_in_seq_order(
    tmp_path: Path, shelf_package: Path, topic_root: str, subscriber: Subscriber
) -> None:
    agent = _agent(tmp_path, shelf_package, "mqtt://127.0.0.1:1883", topic_root)
    wait_for(lambda: agent.sender.pump() >= 0 and agent.sender.mqtt.connected, what="the broker")
    agent.run(max_frames=60)
    assert agent.drain(30)
    made = _made(agent)
    assert made > 5  # the scene changed: events and summaries were made
    wait_for(lambda: len(subscriber.seqs()) >= made, what="every result at the subscriber")
    assert subscriber.seqs() == list(range(1, made + 1))
    first = subscriber.received[0]
    assert first.device_id == "dev-1" and first.auth == "cred-dev-1" and first.model is not None
    second = subscriber.received[1]  # the model went in full once on this connection: then its short id
    assert second.model is None and second.mid == model_id(first.model.sha256)
    texts = [e.body.get("text") for e in subscriber.received if e.kind == "event"]
    assert any(t and t.endswith("empty") for t in texts)
    agent.close()


def test_results_wait_in_the_outbox_while_the_broker_is_unreachable_and_arrive_once_after(
    tmp_path: Path, shelf_package: Path, topic_root: str, subscriber: Subscriber, proxy: TcpProxy
) -> None:
    agent = _agent(tmp_path, shelf_package, proxy.url, topic_root)  # nothing listens there yet
    agent.run(max_frames=60)
    made = _made(agent)
    assert made > 5 and agent.outbox.stats().pending == made
    assert subscriber.seqs() == []
    proxy.start()
    assert agent.drain(60)
    wait_for(lambda: len(subscriber.seqs()) >= made, what="the backlog at the subscriber")
    agent.run(max_frames=80)  # and the agent goes on after the backlog
    assert agent.drain(30)
    wait_for(lambda: len(subscriber.seqs()) >= _made(agent), what="the new results")
    assert subscriber.seqs() == list(range(1, _made(agent) + 1))  # nothing was in flight: exactly once
    agent.close()


def test_a_network_cut_mid_run_loses_nothing(
    tmp_path: Path, shelf_package: Path, topic_root: str, subscriber: Subscriber, proxy: TcpProxy
) -> None:
    proxy.start()
    agent = _agent(tmp_path, shelf_package, proxy.url, topic_root)
    wait_for(lambda: agent.sender.pump() >= 0 and agent.sender.mqtt.connected, what="the broker")
    agent.run(max_frames=40)
    proxy.stop()
    agent.run(max_frames=100)
    wait_for(
        lambda: agent.sender.pump() >= 0 and not agent.sender.mqtt.connected, what="the cut to be noticed"
    )
    agent.run(max_frames=140)
    assert agent.outbox.stats().pending > 0
    proxy.start()
    assert agent.drain(60)
    made = _made(agent)
    wait_for(lambda: len(set(subscriber.seqs())) >= made, what="every result after the cut")
    _once_each(subscriber.received, made)
    agent.close()
