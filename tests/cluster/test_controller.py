"""The controller over fake nodes and in-process replicas: it places replicas on distinct nodes, places lost ones
again, drains what is no longer wanted without cutting a request, reports a placement that does not fit and
retries it, follows the replica count, and learns from measured speed where to place next."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from cumulo.chips.predict import predict
from cumulo.cluster.controller import Wanted
from cumulo.cluster.placement import Corrections
from cumulo.contracts import SamplingParams
from tests.support.controller_fakes import Rig, node

MODEL = "smollm2-135m"  # a preset: placement knows its shape; the fake replicas run a tiny engine


@pytest.fixture
def make() -> Iterator:
    made: list[Rig] = []

    def build(wanted: list[Wanted], nodes: list, **options) -> Rig:
        made.append(Rig(wanted, nodes, MODEL, **options))
        return made[-1]

    yield build
    for s in made:
        s.launcher.stop_all()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


async def collect(pool, prompt: list[int], n: int) -> tuple[list[int], str | None]:
    tokens, reason = [], None
    async for out in pool.generate(prompt, greedy(n)):
        tokens += out.new_token_ids
        reason = out.finish_reason
    return tokens, reason


def test_replicas_of_a_deployment_go_to_distinct_nodes_and_serve(make) -> None:
    s = make([Wanted(MODEL, MODEL, 3)], [node("a"), node("b"), node("c")])
    s.reconcile()
    rows = s.rows("ready")
    assert sorted(r["node"] for r in rows) == ["a", "b", "c"]
    assert all(r["reason"] for r in rows)
    pool = s.engines[MODEL]
    assert sorted(m["name"] for m in pool.status()) == [f"{MODEL}#0", f"{MODEL}#1", f"{MODEL}#2"]
    tokens, reason = asyncio.run(collect(pool, pool.tokenizer.encode("hello"), 5))
    assert (len(tokens), reason) == (5, "length")
    # what placement decided reaches the engine: its cache and batch
    started = s.launcher.started[0]
    assert started.options["max_num_seqs"] >= 1 and started.options["kv_cache_gib"] > 0


@pytest.mark.parametrize("how", ["the replica died", "its node left"])
def test_a_lost_replica_leaves_the_pool_and_is_placed_again(make, how: str) -> None:
    s = make([Wanted(MODEL, MODEL, 2)], [node("a"), node("b"), node("c")])
    s.reconcile()
    victim = s.launcher.running[f"{MODEL}#0"]
    victim_node = next(r["node"] for r in s.rows() if r["replica"] == victim.name)
    if how == "the replica died":
        victim.die()
    else:
        s.nodes = [n for n in s.nodes if n.name != victim_node]
    s.reconcile()
    assert victim.stopped
    replacement = s.launcher.running[victim.name]
    assert replacement is not victim and replacement.alive
    pool = s.engines[MODEL]
    members = {m.name: m for m in pool._members.values()}
    assert members[victim.name].client is replacement
    assert [m["state"] for m in pool.status()] == ["ready", "ready"]
    nodes = sorted(r["node"] for r in s.rows("ready"))
    assert len(set(nodes)) == 2  # still spread
    if how == "its node left":
        assert victim_node not in nodes


def test_undeploy_drains_the_open_stream_to_its_end_then_stops_the_replica(make) -> None:
    s = make([Wanted(MODEL, MODEL, 1)], [node("a")])
    s.reconcile()
    pool = s.engines[MODEL]
    replica = s.launcher.running[f"{MODEL}#0"]

    async def scenario() -> tuple[list[int], str | None, dict]:
        stream = pool.generate(pool.tokenizer.encode("long"), greedy(60))
        first = await anext(stream)
        s.wanted = []
        await asyncio.to_thread(s.reconcile)  # the controller's pass, from its own thread
        during = {"published": dict(s.engines), "stopped": replica.stopped, "rows": s.rows()}
        tokens, reason = list(first.new_token_ids), first.finish_reason
        async for out in stream:
            tokens += out.new_token_ids
            reason = out.finish_reason
        return tokens, reason, during

    tokens, reason, during = asyncio.run(scenario())
    assert MODEL not in during["published"]  # new requests no longer reach the model
    assert not during["stopped"]  # the replica was kept for the open stream
    assert [r["state"] for r in during["rows"]] == ["draining"]
    assert (len(tokens), reason) == (60, "length")  # the stream was not cut
    s.reconcile()
    assert replica.stopped and s.rows() == []


def test_a_placement_that_does_not_fit_says_why_and_is_retried_later(make) -> None:
    s = make([Wanted(MODEL, MODEL, 1)], [node("tiny", memory_gb=0.05)], retry_s=5.0)
    s.reconcile()
    (row,) = s.rows()
    assert row["state"] == "failed"
    assert "cannot place replica 1 of 1" in row["error"] and "tiny" in row["error"]
    assert MODEL not in s.engines and s.launcher.started == []
    s.nodes = [node("big")]
    s.reconcile()  # not yet: the retry waits retry_s
    assert s.rows()[0]["state"] == "failed"
    s.clock.advance(5.0)
    s.reconcile()
    (row,) = s.rows()
    assert (row["state"], row["node"], row["error"]) == ("ready", "big", "")


def test_a_replica_that_did_not_start_fails_with_the_reason(make) -> None:
    s = make([Wanted(MODEL, MODEL, 1)], [node("a")], retry_s=5.0)
    s.launcher.fail = "replica failed to load: out of memory"
    s.reconcile()
    assert s.rows()[0]["state"] == "failed" and "out of memory" in s.rows()[0]["error"]
    s.launcher.fail = None
    s.clock.advance(5.0)
    s.reconcile()
    assert s.rows()[0]["state"] == "ready"


def test_a_change_of_replica_count_adds_and_retires_replicas(make) -> None:
    s = make([Wanted(MODEL, MODEL, 1)], [node("a"), node("b"), node("c")])
    s.reconcile()
    assert len(s.rows("ready")) == 1
    s.wanted = [Wanted(MODEL, MODEL, 3)]
    s.reconcile()
    assert len(s.rows("ready")) == 3 and len(s.engines[MODEL].status()) == 3
    s.wanted = [Wanted(MODEL, MODEL, 1)]
    s.reconcile()
    assert [r["replica"] for r in s.rows()] == [f"{MODEL}#0"]
    assert [m["name"] for m in s.engines[MODEL].status()] == [f"{MODEL}#0"]
    assert sorted(r.name for r in s.launcher.started if r.stopped) == [f"{MODEL}#1", f"{MODEL}#2"]


def predicted_tpot_ms(chip: str, fmt: str, batch: int) -> float:
    return predict(MODEL, fmt, chip, batch, 512 + 128).tpot_s * 1e3


@pytest.mark.parametrize("slower", [1.0, 50.0])
def test_a_replica_measured_slower_than_predicted_moves_the_next_placement(make, slower: float) -> None:
    corrections = Corrections(alpha=1.0)
    # fp32 asked, so that only the node can change (a correction is per chip and format: unasked, placement
    # would also move to another format on the same chip)
    s = make([Wanted(MODEL, MODEL, 1, format="fp32")], [node("fast"), node("slow", chip="cpu-avx2-2core")],
             corrections=corrections)  # fmt: skip
    s.reconcile()
    (row,) = s.rows("ready")
    assert row["node"] == "fast"  # predicted far faster than the two-core CPU
    replica = s.launcher.running[f"{MODEL}#0"]
    replica.decode = {"tpot_ms": predicted_tpot_ms(row["chip"], row["format"], 4) * slower, "batch": 4.0,
                      "steps": 64}  # fmt: skip
    s.reconcile()
    assert corrections.factor(MODEL, row["chip"], row["format"]) == pytest.approx(1 / slower)
    replica.die()  # the next placement of this deployment
    s.reconcile()
    (again,) = s.rows("ready")
    assert again["node"] == ("slow" if slower > 1 else "fast")


def test_measured_speed_is_folded_in_once_per_new_window_of_steps(make) -> None:
    corrections = Corrections(alpha=0.5)
    s = make(
        [Wanted(MODEL, MODEL, 1, format="fp32")], [node("a")], corrections=corrections
    )  # one format to learn
    s.reconcile()
    (row,) = s.rows("ready")
    replica = s.launcher.running[f"{MODEL}#0"]
    tpot = predicted_tpot_ms(row["chip"], row["format"], 2)
    replica.decode = {"tpot_ms": tpot * 2, "batch": 2.0, "steps": 64}
    s.reconcile()
    s.reconcile()  # the same figures again: not new evidence
    assert corrections.factor(MODEL, row["chip"], row["format"]) == pytest.approx(0.5)
    replica.decode = {"tpot_ms": tpot * 4, "batch": 2.0, "steps": 128}
    s.reconcile()
    assert corrections.factor(MODEL, row["chip"], row["format"]) == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)
    replica.die()
    s.reconcile()
    replacement = s.launcher.running[f"{MODEL}#0"]
    replacement.decode = {"tpot_ms": tpot, "batch": 2.0, "steps": 32}  # a new replica counts from zero
    s.reconcile()
    assert corrections.factor(MODEL, row["chip"], row["format"]) == pytest.approx(0.375 * 0.5 + 0.5 * 1.0)


def test_a_replica_reports_its_measured_decode_speed_in_its_status(monkeypatch) -> None:
    import ray

    from cumulo.cluster.replica import ReplicaActor
    from tests.support.tiny import make_tiny_engine

    class Context:  # the actor asks Ray which node it is on; here it runs in the test's process
        def get_node_id(self) -> str:
            return "node-x"

    monkeypatch.setattr(ray, "get_runtime_context", Context)
    actor = ReplicaActor(MODEL, lambda **_: make_tiny_engine(), {}, {"model": MODEL})

    async def run() -> tuple[dict, dict]:
        before = await actor.status()

        async def one(i: int) -> None:
            async for _ in actor.stream(f"r{i}", [5, 6, 7], greedy(20)):
                pass

        await asyncio.gather(*(one(i) for i in range(4)))
        return before, await actor.status()

    try:
        before, after = asyncio.run(run())
    finally:
        actor.stop()
    assert before["decode"] is None  # nothing measured before any decode step
    decode = after["decode"]
    assert decode["steps"] == 4 * 19  # every output after a stream's first is one decode step
    assert 1.0 <= decode["batch"] <= 4.0 and decode["tpot_ms"] > 0
